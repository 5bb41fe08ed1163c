"""The default prompts: the ten queries of the seed's runner (AutoDeploy ``build_and_run_ad.py``)."""

from __future__ import annotations

DEFAULT_PROMPTS: tuple[str, ...] = (
    "How big is the universe? ",
    "In simple words and a single sentence, explain the concept of gravity: ",
    "How to fix slicing in golf? ",
    "Where is the capital of Iceland? ",
    "What are the three laws of thermodynamics? ",
    "Summarize the plot of Romeo and Juliet in two sentences: ",
    "Write a Python function that checks if a number is prime.",
    "Explain the difference between a compiler and an interpreter: ",
    "What causes the northern lights? ",
    "What are the health benefits of drinking green tea?",
)


def default_prompts() -> list[str]:
    """A fresh list of the ten default prompts."""
    return list(DEFAULT_PROMPTS)
