"""examples/cookbook: the committed notebooks are what the template and the records give, valid nbformat
without outputs; the SmolLM2 notebook runs under nbclient: `onboardlm serve` on a free port on the
standalone settings YAML, /health, a chat completion and the same answer streamed, then shutdown."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import nbclient
import nbformat
import pytest

from onboardlm.registry.checkout import CheckoutLayout
from onboardlm.registry.cookbook import MAX_TOKENS, cookbook_entries, render_notebook, stale_notebooks

CHECKOUT = CheckoutLayout.at()
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_NOTEBOOK = CHECKOUT.cookbook_dir / "smollm2-135m-instruct.ipynb"


def test_committed_notebooks_are_current_valid_and_without_outputs() -> None:
    assert stale_notebooks(CHECKOUT) == [], "run `onboardlm registry cookbook` and commit the notebooks"
    expected = {entry.path(CHECKOUT) for entry in cookbook_entries(CHECKOUT)}
    assert set(CHECKOUT.cookbook_dir.glob("*.ipynb")) == expected  # none without a record
    assert SMOL_NOTEBOOK in expected
    for path in expected:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_the_notebook_serves_the_standalone_settings_of_its_entry() -> None:
    (entry,) = [entry for entry in cookbook_entries(CHECKOUT) if entry.name == SMOL]
    text = render_notebook(entry)
    assert f'MODEL = \\"{SMOL}\\"' in text and f"MAX_TOKENS = {MAX_TOKENS}" in text
    assert "render_standalone_yaml(MODEL)" in text and '\\"--args.yaml-extra\\", str(settings_file)' in text
    assert "`dashboard_default.yaml` + `world_size_1.yaml` + `smollm2-135m-instruct.yaml`" in text


def _printed(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.mark.slow
def test_smollm2_cookbook_runs_end_to_end(tmp_path: Path) -> None:
    notebook = nbformat.read(SMOL_NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    printed = [_printed(cell) for cell in notebook.cells if cell.cell_type == "code"]
    parameters, settings, started, chat, stream, stopped = printed
    assert "dtype: bfloat16" in settings and "world_size: 1" in settings
    match = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1 \(pid (\d+)\)", started)
    assert match, started
    assert f"models: ['{SMOL}']" in chat
    answer = re.search(r"answer: (.*)\nfinish_reason: (\w+)", chat)
    assert answer and answer.group(1).strip() and answer.group(2) in ("stop", "length")
    assert "the same text as the answer above" in stream
    assert "onboardlm serve exited with 0" in stopped
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", int(match.group(1))))
