"""Errors that reach the user: each names the input at fault and what to do about it."""

from __future__ import annotations


class OnboardlmError(Exception):
    """Base class for errors caused by user input; the CLI prints ``str(err)`` and exits non-zero."""

    def __init__(self, subject: str, problem: str, hint: str = "") -> None:
        self.subject = subject
        self.problem = problem
        self.hint = hint
        message = f"{subject}: {problem}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class ModelSourceError(OnboardlmError):
    """A model id, path, GGUF file or model_type that cannot be resolved to a config."""


class WeightsError(OnboardlmError):
    """A weights file that is missing, corrupt, of an unsupported format, or whose keys do not match."""


class UnsupportedFeature(OnboardlmError):
    """A construct of a model that onboardlm cannot handle yet, named by module path and feature."""

    def __init__(self, module_path: str, feature: str, hint: str = "") -> None:
        self.module_path = module_path
        self.feature = feature
        super().__init__(module_path, f"unsupported feature: {feature}", hint)
