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
from rich.markup import escape
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
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper  # type: ignore[return-value]


@app.command("ops")
def ops_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
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
        typer.Option(
            "--model", "-m", help="Model dir, .gguf file, cached hub id or model_type [default: SmolLM2]"
        ),
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
        f"[green]loaded[/] {report.model_class} ({kind}) from {report.weights_source}",
        highlight=False,
        soft_wrap=True,
    )
    stops = stop_token_ids(tokenizer)
    for i, text in enumerate(prompt or [DEFAULT_PROMPT]):
        with console.status(f"generating for prompt {i} ..."):
            result = greedy_generate(
                lean_model, encode_chat_prompt(tokenizer, text), max_new_tokens=max_new_tokens, stop_ids=stops
            )
        answer = tokenizer.decode(result.new_ids, skip_special_tokens=True).strip()
        console.print(f"[PROMPT {i}] {text}: {answer}", highlight=False, markup=False, soft_wrap=True)


registry_app = typer.Typer(
    help="The model registry: models.yaml + configs/*.yaml, deep-merged left to right per model.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")

RegistryDirOption = Annotated[
    Path | None,
    typer.Option(
        "--registry-dir", help="Registry directory (models.yaml + configs/); default: the shipped one."
    ),
]


@registry_app.command("list")
@reports_user_errors
def registry_list_command(registry_dir: RegistryDirOption = None) -> None:
    """List the registered models with their world size and config files."""
    from onboardlm.registry import RegistryLayout, read_entries
    from onboardlm.registry.layout import WORLD_SIZE_PATTERN

    layout = RegistryLayout.at(registry_dir)
    entries = read_entries(layout.root)
    table = Table(title=f"{len(entries)} models in {layout.models_file}")
    table.add_column("model", style="bold", no_wrap=True)
    table.add_column("world size", justify="right")
    table.add_column("yaml_extra", style="dim", overflow="fold")
    for entry in entries:
        sizes = [m.group(1) for f in entry.yaml_extra if (m := WORLD_SIZE_PATTERN.match(f))]
        table.add_row(entry.name, ", ".join(sizes) or "?", " + ".join(entry.yaml_extra))
    console.print(table)


@registry_app.command("show")
@reports_user_errors
def registry_show_command(
    name: Annotated[str, typer.Argument(help="Model name, as `onboardlm registry list` shows it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print settings and sources as JSON.")] = False,
    as_yaml: Annotated[
        bool,
        typer.Option(
            "--yaml", help="Print one standalone config equal to the entry (for --args.yaml-extra)."
        ),
    ] = False,
    registry_dir: RegistryDirOption = None,
) -> None:
    """Show a model's merged settings and which file set each key."""
    from onboardlm.registry import explain_settings, render_standalone_yaml

    if as_yaml:
        typer.echo(render_standalone_yaml(name, registry_dir), nl=False)
        return
    explained = explain_settings(name, registry_dir)
    if as_json:
        console.print_json(json.dumps(explained.to_json()))
        return
    table = Table(title=f"{name}: {' + '.join(path.name for path in explained.files)}")
    table.add_column("key", style="cyan", no_wrap=True)
    table.add_column("value", style="bold", overflow="fold")
    table.add_column("set by", no_wrap=True)
    for row in explained.rows:
        table.add_row(row.key, json.dumps(row.value), row.source.name if row.source else "[dim]default[/]")
    console.print(table)


@registry_app.command("add")
@reports_user_errors
def registry_add_command(
    name: Annotated[str, typer.Argument(help="Model name (HuggingFace id) to register.")],
    world_size: Annotated[int | None, typer.Option("--world-size", min=1, help="GPUs for the run.")] = None,
    params: Annotated[
        str | None,
        typer.Option(
            help="Parameter count (e.g. 135M, 8B) that picks the world size: 1 <2B, 2 <=15B, 4 <=80B, else 8."
        ),
    ] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option(
            "--extra", help="Model config: a name under configs/ or a YAML file to copy there (repeatable)."
        ),
    ] = None,
    registry_dir: RegistryDirOption = None,
) -> None:
    """Add a model (dashboard_default.yaml + world_size_N.yaml + extras), keeping every other line."""
    from onboardlm.registry import RegistryError, add_entry, parse_param_count, world_size_for_params

    if world_size is None:
        if params is None:
            raise RegistryError("--world-size", "give --world-size N or --params COUNT (e.g. --params 8B)")
        world_size = world_size_for_params(parse_param_count(params))
    result = add_entry(name, world_size, extra or [], registry_dir)
    for path in result.copied_configs:
        console.print(f"[green]copied[/] {path}", highlight=False, soft_wrap=True)
    console.print(
        f"[green]added[/] {name} to {result.models_file}: {' + '.join(result.yaml_extra)}",
        highlight=False,
        soft_wrap=True,
    )


@registry_app.command("validate")
@reports_user_errors
def registry_validate_command(registry_dir: RegistryDirOption = None) -> None:
    """Check every entry: files present, dashboard_default first, settings valid, names unique."""
    from onboardlm.registry import RegistryLayout, has_errors, validate_registry

    problems = validate_registry(registry_dir)
    if not problems:
        console.print(f"[green]valid[/]: {RegistryLayout.at(registry_dir).models_file}", highlight=False)
        return
    for problem in problems:
        style = "red" if problem.severity == "error" else "yellow"
        console.print(
            f"[{style}]{problem.severity}[/] [bold]{escape(problem.subject)}[/]: {escape(problem.message)}",
            highlight=False,
            soft_wrap=True,
        )
    if has_errors(problems):
        errors = sum(problem.severity == "error" for problem in problems)
        err_console.print(f"[bold red]error:[/] registry has {errors} error(s)", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command("review")
@reports_user_errors
def review_command(
    model_file: Annotated[Path, typer.Argument(help="The lean model file (modeling_<type>.py).")],
    test_file: Annotated[
        Path | None,
        typer.Option("--test-file", help="Its test file (the F, G and H2 rules fail without one)."),
    ] = None,
    checkpoint_keys: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-keys", help="Keys for BA1: a JSON list, a safetensors index or a .safetensors file."
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference", help="transformers model_type whose state dict BA1 loads [default: the config's]."
        ),
    ] = None,
    run_tests: Annotated[
        bool, typer.Option("--run-tests", help="Also run the test file with pytest.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Review a lean model file and its tests against the rule catalogue; exit 1 on FAIL."""
    from onboardlm.review import render_report, review_model_file

    report = review_model_file(
        model_file, test_file, reference=reference, checkpoint_keys=checkpoint_keys, run_tests=run_tests
    )
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(render_report(report), highlight=False, soft_wrap=True)
    if not report.passed:
        raise typer.Exit(1)  # FAIL: a verdict, not bad input


def main() -> None:
    app()
