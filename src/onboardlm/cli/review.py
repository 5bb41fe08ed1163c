"""``onboardlm review``: the rule-catalogue review of a lean model file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from onboardlm.cli.common import (
    CUSTOM_MODEL_DIR_HELP,
    app,
    console,
    load_custom_model_dirs,
    reports_user_errors,
)


@app.command("review")
@reports_user_errors
def review_command(
    model_file: Annotated[
        Path,
        typer.Argument(
            help="The lean model file (modeling_<type>.py), or the model_type or config class name of a "
            "registered lean model (an out-of-tree one among them)."
        ),
    ],
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
    custom_model_dir: Annotated[
        list[Path] | None, typer.Option("--custom-model-dir", help=CUSTOM_MODEL_DIR_HELP)
    ] = None,
) -> None:
    """Review a lean model file and its tests against the rule catalogue; exit 1 on FAIL."""
    from onboardlm.review import render_report, review_model_file

    load_custom_model_dirs(custom_model_dir)
    model_file = registered_model_file(model_file)

    report = review_model_file(
        model_file, test_file, reference=reference, checkpoint_keys=checkpoint_keys, run_tests=run_tests
    )
    if as_json:
        console.print_json(json.dumps(report.to_dict()))
    else:
        console.print(render_report(report), highlight=False, soft_wrap=True)
    if not report.passed:
        raise typer.Exit(1)  # FAIL: a verdict, not bad input


def registered_model_file(model_file: Path) -> Path:
    """``model_file`` itself, or, when no such file exists and it names a registered lean model (by
    model_type or config class name), that model's source file."""
    from onboardlm.models.plugins import find_registered

    if model_file.exists() or model_file.suffix == ".py" or len(model_file.parts) > 1:
        return model_file
    found = find_registered(str(model_file))
    if found is None or found.source_file is None:
        return model_file  # the review reports the missing file
    return found.source_file
