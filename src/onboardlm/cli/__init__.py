"""The ``onboardlm`` command line: parses options, calls library functions, renders their results.

One module per sub-command; importing them attaches their commands to ``app``.
"""

from onboardlm.cli import debug, onboard, ops, pr, registry, review, run, serve, viz  # noqa: F401  (import = command registration)
from onboardlm.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
