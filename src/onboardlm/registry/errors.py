"""The registry's user-facing error."""

from __future__ import annotations

from onboardlm.errors import OnboardlmError


class RegistryError(OnboardlmError):
    """A registry file, entry or setting that is missing, malformed or invalid; names the file and key."""
