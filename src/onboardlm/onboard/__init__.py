"""`onboardlm onboard`: the onboarding phases, one module each, chained by pipeline.py."""
