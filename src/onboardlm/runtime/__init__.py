"""Inference on lean models: exported graph with a KV cache, sampling, generate loop, end-to-end runs.

``run_prompts(model, prompts, settings)`` answers prompts (``None``: the ten default prompts of
:func:`default_prompts`) and returns one :class:`PromptResult` per prompt, whose ``log_line()`` is
``[PROMPT i] <prompt>: <output>``.
"""

from onboardlm.runtime.prompts import DEFAULT_PROMPTS, default_prompts
from onboardlm.runtime.runner import DEFAULT_MODEL_ID, PromptResult, Runner, run_prompts

__all__ = ["DEFAULT_MODEL_ID", "DEFAULT_PROMPTS", "PromptResult", "Runner", "default_prompts", "run_prompts"]
