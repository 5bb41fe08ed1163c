"""``onboardlm pr``: write an onboarded model into a TensorRT-LLM checkout as a commit on a new branch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from onboardlm.cli.common import app, console, reports_user_errors


@app.command("pr")
@reports_user_errors
def pr_command(
    onboarded_dir: Annotated[
        Path,
        typer.Argument(
            help="The output folder of `onboardlm onboard` (report.json, modeling_<type>.py, ...)."
        ),
    ],
    into: Annotated[Path, typer.Option("--into", help="A clean TensorRT-LLM source checkout (git).")],
    branch: Annotated[
        str | None, typer.Option("--branch", help="New branch name (default: onboardlm/<model_type>).")
    ] = None,
    message_file: Annotated[
        Path | None,
        typer.Option("--message-file", help="Where to write the PR message (default: ONBOARDED_DIR/PR.md)."),
    ] = None,
) -> None:
    """Commit the model file, its tests, their helpers and the registry entry on a new branch; write PR.md."""
    from onboardlm.pr import make_pr

    result = make_pr(onboarded_dir, into, branch=branch, message_file=message_file)
    console.print(f"[bold]{escape(result.title)}[/]", highlight=False, soft_wrap=True)
    for path, how in result.files:
        console.print(f"  {how:8}  {escape(path)}", highlight=False, soft_wrap=True)
    for old, new in result.imports:
        console.print(f"  import    {escape(old)}  ->  {escape(new)}", highlight=False, soft_wrap=True)
    for what, note in result.notes.items():
        console.print(f"{what}: {escape(note)}", highlight=False, soft_wrap=True)
    where = "checked out" if result.switched else "not checked out (git switch failed)"
    console.print(
        f"commit {result.commit[:12]} on new branch {escape(result.branch)} (from {result.base[:12]}), {where}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"PR message: {escape(str(result.message_file))}", highlight=False, soft_wrap=True)
