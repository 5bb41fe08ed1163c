"""onboardlm: onboard HuggingFace causal LMs into lean models on canonical ops, and run them."""

__version__ = "0.1.0"
