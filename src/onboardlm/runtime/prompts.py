"""The default prompts: the ten queries of the seed's runner (AutoDeploy ``build_and_run_ad.py``)."""

from __future__ import annotations

from collections.abc import Sequence

from onboardlm.errors import OnboardlmError

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


def check_prompts(prompts: Sequence[str]) -> None:
    """Refuse an empty or blank prompt (the model would answer nothing in particular)."""
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise OnboardlmError(
                f"prompt {index}",
                "empty or blank",
                "give it some text, or leave out --prompt for the default prompts",
            )
