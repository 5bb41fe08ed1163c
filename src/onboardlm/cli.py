"""The ``onboardlm`` command line: parses options, calls library functions, renders their results."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from onboardlm.errors import OnboardlmError

app = typer.Typer(
    help="Onboard HuggingFace causal LMs into lean models on canonical ops, prove them, run them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

DEFAULT_PROMPT = "What is the capital of France?"
EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable[..., Any])


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    def to_torch(self) -> Any:
        import torch

        return getattr(torch, self.value)


def reports_user_errors(command: F) -> F:
    """Turn an :class:`OnboardlmError` into one red line on stderr and exit code 2."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except OnboardlmError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


@app.command("ops")
def ops_command(as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False) -> None:
    """List the canonical ops (torch.ops.auto_deploy.*) with their signatures."""
    from onboardlm.ops.catalog import op_catalog

    entries = op_catalog()
    if as_json:
        console.print_json(json.dumps([entry.__dict__ for entry in entries]))
        return
    table = Table(title=f"{len(entries)} canonical ops (torch.ops.auto_deploy)", show_lines=False)
    table.add_column("category", style="cyan")
    table.add_column("op", style="bold")
    table.add_column("signature")
    table.add_column("provider", style="dim")
    for entry in entries:
        table.add_row(entry.category, entry.name, entry.signature, entry.provider)
    console.print(table)


@app.command("run")
@reports_user_errors
def run_command(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model dir, .gguf file, cached hub id or model_type [default: SmolLM2]"),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="Prompt (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 32,
    num_hidden_layers: Annotated[int | None, typer.Option(min=1, help="Run with fewer layers.")] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype.")] = DType.float32,
    device: Annotated[str, typer.Option(help="Device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Load a model into its lean implementation and answer prompts greedily."""
    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.models.source import default_model_path
    from onboardlm.runtime.chat import encode_chat_prompt, stop_token_ids
    from onboardlm.runtime.generate import greedy_generate

    model_name = model or str(default_model_path())
    model_kwargs = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
    factory = AutoModelForCausalLMFactory(model_name, model_kwargs)
    with console.status(f"loading {Path(model_name).name} ..."):
        tokenizer = factory.tokenizer()
        lean_model, report = factory.build_and_load(device=device, dtype=dtype.to_torch())
    kind = "lean onboardlm model" if report.is_custom else "transformers model (no lean model registered)"
    console.print(
        f"[green]loaded[/] {report.model_class} ({kind}) from {report.weights_source}", highlight=False, soft_wrap=True
    )
    stops = stop_token_ids(tokenizer)
    for i, text in enumerate(prompt or [DEFAULT_PROMPT]):
        with console.status(f"generating for prompt {i} ..."):
            result = greedy_generate(
                lean_model, encode_chat_prompt(tokenizer, text), max_new_tokens=max_new_tokens, stop_ids=stops
            )
        answer = tokenizer.decode(result.new_ids, skip_special_tokens=True).strip()
        console.print(f"[PROMPT {i}] {text}: {answer}", highlight=False, markup=False, soft_wrap=True)


def main() -> None:
    app()
