"""``onboardlm ops``: the canonical op table."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from onboardlm.cli.common import (
    app,
    console,
)


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
