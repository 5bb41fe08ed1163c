"""What every sub-command shares: the typer app, consoles, exit codes and the user-error wrapper."""

from __future__ import annotations

import enum
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from onboardlm.compat import transformers_range_warning
from onboardlm.errors import OnboardlmError

app = typer.Typer(
    help="Onboard HuggingFace causal LMs into lean models on canonical ops, prove them, run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


@app.callback()
def warn_on_untested_transformers() -> None:
    """Before any sub-command: one warning line when the installed transformers is untested."""
    warning = transformers_range_warning()
    if warning is not None:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


F = TypeVar("F", bound=Callable[..., Any])


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    def to_torch(self) -> Any:
        import torch

        return getattr(torch, self.value)


class Quantize(str, enum.Enum):
    none = "none"
    fp8 = "fp8"


def print_error(message: str) -> None:
    """``error: <message>`` in red on stderr, always one line (line breaks inside become spaces)."""
    line = " ".join(message.split())
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def reports_user_errors(command: F) -> F:
    """Turn an :class:`OnboardlmError` into one red line on stderr and exit code 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OnboardlmError as err:
            print_error(str(err))
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


CUSTOM_MODEL_DIR_HELP = (
    "Folder of out-of-tree lean model files (modeling_<type>.py ending in register_custom_model_cls) to "
    "import before anything else; repeatable. This RUNS THE PYTHON CODE IN THAT FOLDER: name only folders "
    "you trust. Installed packages' 'onboardlm.models' entry points are always imported."
)


def load_custom_model_dirs(directories: list[Any] | None) -> list[str]:
    """Import the out-of-tree models (entry points, then each folder); one warning line per entry point
    that failed to import."""
    from onboardlm.models.plugins import load_custom_models, plugin_problems

    registered = load_custom_models(list(directories or []))
    for problem in plugin_problems():
        err_console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    return registered
