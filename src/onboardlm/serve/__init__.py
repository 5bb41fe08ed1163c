"""OpenAI-compatible HTTP serving: a FastAPI app in front of the continuous-batching engine.

:func:`onboardlm.serve.app.create_app` builds the app over a :class:`~onboardlm.runtime.serving.ServingEngine`;
:mod:`onboardlm.serve.server` runs it under uvicorn (``onboardlm serve``) or in a background thread.
"""
