"""``onboardlm debug``: the debugging toolbox (accuracy bisection against transformers and across transforms)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from onboardlm.cli.common import (
    CUSTOM_MODEL_DIR_HELP,
    DType,
    app,
    console,
    load_custom_model_dirs,
    reports_user_errors,
)
from onboardlm.errors import OnboardlmError

debug_app = typer.Typer(
    help="Debugging tools: where the lean model leaves transformers, which transform moves the logits.",
    no_args_is_help=True,
)
app.add_typer(debug_app, name="debug")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


@debug_app.command("accuracy")
@reports_user_errors
def debug_accuracy_command(
    model: Annotated[
        str,
        typer.Argument(
            help="Registry name, model dir, .gguf file, cached hub id or model_type (as for `run`)."
        ),
    ],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Input text (default: 'The capital of France is').")
    ] = None,
    dtype: Annotated[DType, typer.Option(help="Compute dtype of both models.")] = DType.float32,
    tolerance: Annotated[
        float | None,
        typer.Option(min=0.0, help="RMSE-ratio tolerance (default: 1e-5 in float32, 0.05 in bf16/fp16)."),
    ] = None,
    num_hidden_layers: Annotated[int | None, typer.Option(min=1, help="Compare with fewer layers.")] = None,
    transforms: Annotated[
        bool,
        typer.Option(
            "--transforms",
            help="Also run the cached graph with the runtime's transforms turned on one at a time (KV cache, "
            "folded weights, fused linears, fusion, kernels, sharding over 2 gloo ranks) and name the first "
            "that moves the logits past the tolerance.",
        ),
    ] = False,
    no_sharding: Annotated[
        bool, typer.Option("--no-sharding", help="With --transforms: skip the two-rank sharding stage.")
    ] = False,
    custom_model_dir: Annotated[
        list[Path] | None, typer.Option("--custom-model-dir", help=CUSTOM_MODEL_DIR_HELP)
    ] = None,
) -> None:
    """Run the lean model and transformers on the same tokens with hooks on every module of the same name;
    print each module's RMSE ratio, the first past tolerance and the greedy top-1 agreement; exit 1 when
    they differ past tolerance."""

    from onboardlm.debug.accuracy import check_accuracy
    from onboardlm.debug.transform_bisect import ShardJob, bisect_transforms

    torch_dtype = dtype.to_torch()
    if num_hidden_layers is not None and num_hidden_layers < 1:
        raise OnboardlmError("--num-hidden-layers", "must be at least 1")
    load_custom_model_dirs(custom_model_dir)
    kwargs = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else None
    with console.status(f"loading {model} twice (lean and transformers) ..."):
        report, pair, input_ids = check_accuracy(
            model, prompt=prompt, dtype=torch_dtype, tolerance=tolerance, model_kwargs=kwargs
        )
    console.print(
        f"lean {report.lean_class} vs transformers {report.reference_class}; {report.dtype}; "
        f"{report.input_note}; weights: {report.weights}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    table = Table(title=f"RMSE ratio per module (lean vs transformers), tolerance {report.tolerance:g}")
    table.add_column("module", no_wrap=True)
    table.add_column("output", no_wrap=True)
    table.add_column("rmse ratio", justify="right")
    table.add_column("", no_wrap=True)
    first = report.first_past_tolerance
    for row in report.modules:
        mark = "[red]PAST[/]" if row.past_tolerance else "ok" if row.ratio is not None else escape(row.note)
        name = f"[bold red]{escape(row.name)}[/]" if row is first else escape(row.name)
        table.add_row(name, "x".join(map(str, row.shape)), _ratio(row.ratio), mark)
    console.print(table)
    if report.only_lean or report.only_reference:
        console.print(
            f"modules in one model only: lean {len(report.only_lean)}, transformers {len(report.only_reference)}"
            f" (e.g. {', '.join((report.only_lean + report.only_reference)[:3])})",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    console.print(
        f"logits: rmse ratio {report.logits_ratio:.2e}; greedy top-1 agreement "
        f"{report.top1_agreement:.1%} of {report.num_tokens} positions",
        highlight=False,
        soft_wrap=True,
    )
    if first is not None:
        console.print(
            f"[bold red]first module past tolerance:[/] {escape(first.name)} (rmse ratio {first.ratio:.2e} > "
            f"{report.tolerance:g})",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"[green]every module within tolerance[/] {report.tolerance:g}", highlight=False)
    failed = not report.passed
    if transforms:
        job = None
        if not no_sharding:
            dirs = tuple(str(path.resolve()) for path in custom_model_dir or [])
            job = ShardJob(model, kwargs, dtype.value, dirs)
        with console.status("running the cached graph with each transform turned on ..."):
            stages = bisect_transforms(pair.lean, input_ids, report.tolerance, shard_job=job)
        stage_table = Table(
            title="logits per transform stage (vs the eager lean model), each keeps the earlier on"
        )
        stage_table.add_column("stage", no_wrap=True)
        stage_table.add_column("what", overflow="fold")
        stage_table.add_column("rmse ratio", justify="right")
        stage_table.add_column("top-1", justify="right")
        stage_table.add_column("", overflow="fold")
        for stage in stages:
            mark = (
                "[red]PAST[/]"
                if stage.past_tolerance
                else "ok"
                if stage.ratio is not None
                else escape(stage.note)
            )
            top1 = "-" if stage.top1_agreement is None else f"{stage.top1_agreement:.0%}"
            stage_table.add_row(stage.name, escape(stage.description), _ratio(stage.ratio), top1, mark)
        console.print(stage_table)
        culprit = next((stage for stage in stages if stage.past_tolerance), None)
        if culprit is None:
            console.print("[green]no transform moves the logits past tolerance[/]", highlight=False)
        else:
            failed = True
            console.print(
                f"[bold red]first transform past tolerance:[/] {culprit.name} ({escape(culprit.description)}; "
                f"rmse ratio {culprit.ratio:.2e})",
                highlight=False,
                soft_wrap=True,
            )
    if failed:
        raise typer.Exit(1)
