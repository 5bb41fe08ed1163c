"""``onboardlm registry``: list, show, add and validate registry entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from onboardlm.cli.common import (
    CUSTOM_MODEL_DIR_HELP,
    EXIT_BAD_INPUT,
    app,
    console,
    err_console,
    load_custom_model_dirs,
    print_error,
    reports_user_errors,
)

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


@registry_app.command("models")
@reports_user_errors
def registry_models_command(
    custom_model_dir: Annotated[
        list[Path] | None, typer.Option("--custom-model-dir", help=CUSTOM_MODEL_DIR_HELP)
    ] = None,
    out_of_tree: Annotated[
        bool, typer.Option("--out-of-tree", help="Only the models from entry points and custom folders.")
    ] = False,
) -> None:
    """List the lean model classes the factory uses, by config class, with where each came from."""
    from onboardlm.models.plugins import registered_models

    load_custom_model_dirs(custom_model_dir)
    models = [m for m in registered_models() if not out_of_tree or m.origin != "shipped"]
    table = Table(title=f"{len(models)} lean models")
    table.add_column("config class", style="bold", no_wrap=True)
    table.add_column("lean class", no_wrap=True)
    table.add_column("from", overflow="fold")
    for model in models:
        origin = model.origin if model.origin == "shipped" else f"{model.origin}: {model.source_file}"
        table.add_row(model.config_class, model.model_class.__name__, origin)
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


CheckOption = Annotated[
    bool, typer.Option("--check", help="Write nothing; exit 1 when the committed files are out of date.")
]
RootOption = Annotated[
    Path | None, typer.Option("--root", help="The onboardlm checkout [default: the one imported].")
]


@registry_app.command("matrix")
@reports_user_errors
def registry_matrix_command(check: CheckOption = False, root: RootOption = None) -> None:
    """Regenerate docs/support-matrix.md from the registry, the lean files, coverage.json and the records."""
    from onboardlm.registry.checkout import CheckoutLayout
    from onboardlm.registry.matrix import matrix_is_current, write_matrix

    layout = CheckoutLayout.at(root)
    if not check:
        console.print(f"[green]wrote[/] {write_matrix(layout)}", highlight=False, soft_wrap=True)
    elif matrix_is_current(layout):
        console.print(f"[green]up to date[/]: {layout.matrix_file}", highlight=False, soft_wrap=True)
    else:
        print_error(f"{layout.matrix_file}: out of date (run `onboardlm registry matrix`)")
        raise typer.Exit(1)


@registry_app.command("cookbook")
@reports_user_errors
def registry_cookbook_command(check: CheckOption = False, root: RootOption = None) -> None:
    """Regenerate examples/cookbook/<model>.ipynb for every onboarded registry entry (serve + openai client)."""
    from onboardlm.registry.checkout import CheckoutLayout
    from onboardlm.registry.cookbook import stale_notebooks, write_cookbook

    layout = CheckoutLayout.at(root)
    if not check:
        for path in write_cookbook(layout):
            console.print(f"[green]wrote[/] {path}", highlight=False, soft_wrap=True)
        return
    stale = stale_notebooks(layout)
    if stale:
        names = ", ".join(path.name for path in stale)
        print_error(f"{layout.cookbook_dir}: {names} out of date (run `onboardlm registry cookbook`)")
        raise typer.Exit(1)
    console.print(f"[green]up to date[/]: {layout.cookbook_dir}", highlight=False, soft_wrap=True)


@registry_app.command("record")
@reports_user_errors
def registry_record_command(
    report: Annotated[Path, typer.Argument(help="A report.json written by `onboardlm onboard`.")],
    root: RootOption = None,
) -> None:
    """Record an onboarding report in docs/onboarded/, then regenerate the support matrix and the cookbook."""
    from onboardlm.registry.checkout import CheckoutLayout
    from onboardlm.registry.docs import record_and_refresh
    from onboardlm.registry.records import read_report

    layout = CheckoutLayout.at(root)  # checked first: outside a checkout nothing is read
    update = record_and_refresh(read_report(report), layout)
    if update.record is None:
        console.print("[yellow]no record[/]: the report's model is not in the registry", highlight=False)
    for path in update.files:
        console.print(f"[green]wrote[/] {path}", highlight=False, soft_wrap=True)
