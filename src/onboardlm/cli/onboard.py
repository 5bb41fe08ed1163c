"""``onboardlm onboard``: run the onboarding phases with live progress, then render the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from onboardlm.cli.common import app, console, print_error, reports_user_errors
from onboardlm.onboard.phases import PhaseRecord

#: Exit code of an onboarding stopped by Ctrl-C (SIGINT), as shells report it: 128 + 2.
EXIT_INTERRUPTED = 130

_MARKS = {"pass": "[green]✓[/]", "fail": "[bold red]✗[/]", "skipped": "[yellow]-[/]"}


class _Progress:
    """A spinner while a phase runs and one line when it ends (nothing at all with --json)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.status: Status | None = None

    def __call__(self, name: str, event: str, record: PhaseRecord | None) -> None:
        if self.quiet:
            return
        if event == "start":
            self.status = console.status(f"{name} ...")
            self.status.start()
            return
        self.stop()
        if record is None:  # aborted: the error is reported by the caller
            return
        console.print(
            f"{_MARKS[record.status]} {record.name:<9} {record.seconds:6.2f} s  {record.summary}",
            highlight=False,
            soft_wrap=True,
            markup=True,
        )

    def stop(self) -> None:
        """End the spinner, if one runs."""
        if self.status is not None:
            self.status.stop()
            self.status = None


@app.command("onboard")
@reports_user_errors
def onboard_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Hub id (local cache), model dir, .gguf file or model_type [default: the shipped SmolLM2 GGUF]."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder [default: onboarded/<name>]")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing output folder / files.")
    ] = False,
    offline: Annotated[
        bool, typer.Option("--offline/--online", help="Use only the local HuggingFace cache (default).")
    ] = True,
    allow_remote_code: Annotated[
        bool, typer.Option("--allow-remote-code", help="Allow a model's own Python code (trust_remote_code).")
    ] = False,
    into_package: Annotated[
        bool, typer.Option("--into-package", help="Write the model and its test into the onboardlm tree.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Onboard a causal LM: analyze, generate the lean model and its tests, verify, review, register."""
    from onboardlm.models.source import default_model_path
    from onboardlm.onboard.pipeline import OnboardOptions, onboard
    from onboardlm.onboard.report import report_data

    options = OnboardOptions(
        out_dir=out,
        force=force,
        offline=offline,
        allow_remote_code=allow_remote_code,
        into_package=into_package,
    )
    progress = _Progress(quiet=as_json)
    try:
        result = onboard(model or str(default_model_path()), options, listener=progress)
    except KeyboardInterrupt:  # Ctrl-C: the pipeline has already removed its staging folder
        progress.stop()
        print_error(f"{out or 'onboard'}: interrupted; the output folder is left as it was")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        typer.echo(json.dumps(report_data(result), indent=2, default=str))
    else:
        _render(result)
    if result.status != "pass":
        raise typer.Exit(1)


def _render(result) -> None:  # noqa: ANN001 - OnboardResult, imported lazily
    if result.tests:
        table = Table(title="equivalence tests")
        for column in ("level", "test", "metric", "tolerance", "result"):
            table.add_column(column)
        for test in result.tests:
            table.add_row(
                test.level,
                escape(test.name),
                "-" if test.metric is None else f"{test.metric:.3g}",
                "-" if test.tolerance is None else f"{test.tolerance:.3g}",
                "[green]pass[/]" if test.passed else "[bold red]FAIL[/]",
            )
        console.print(table)
    for prompt in result.prompts:
        console.print(
            f"[PROMPT {prompt.index}] {prompt.prompt}: {prompt.output}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    for item in result.not_done:
        console.print(f"[yellow]not done:[/] {item}", highlight=False, soft_wrap=True)
    verdict = "[green]PASS[/]" if result.status == "pass" else "[bold red]FAIL[/]"
    kind = result.model_type if result.scope is None else f"{result.model_type}, {result.scope}"
    console.print(
        f"{verdict} {result.model} ({escape(kind)}) in {result.seconds:.1f} s; report: {result.out_dir}/report.md",
        highlight=False,
        soft_wrap=True,
    )
