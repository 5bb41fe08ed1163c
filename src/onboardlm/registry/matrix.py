"""The support matrix (``docs/support-matrix.md``), generated from committed files only:

- the lean model files shipped in ``onboardlm.models.custom`` (the architecture's features are read
  from the canonical ops each file calls and the arguments it passes them),
- ``benchmarks/results/coverage.json`` (the sweep's verdict, test count and worst RMSE ratio per
  model_type),
- ``tests/transforms/test_sharding.py`` (the lean files tensor parallelism is tested on),
- the registry (``models.yaml`` + ``configs/``) and the onboarding records (``docs/onboarded/``).

``python -m onboardlm.registry.matrix --write`` (or ``onboardlm registry matrix``) rewrites it;
``--check`` exits 1 when the committed file differs from what the inputs give.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboardlm.errors import OnboardlmError
from onboardlm.registry.atomic import atomic_write_text
from onboardlm.registry.checkout import CheckoutLayout
from onboardlm.registry.loader import read_entries, settings_for_model
from onboardlm.registry.records import OnboardRecord, read_records

#: Calls of canonical ops that mark a feature, and keyword arguments of the attention op that do.
_OP_FEATURES = {
    "torch_mla": "MLA",
    "torch_sparse_mla": "MLA",
    "torch_moe": "MoE",
    "torch_moe_dense_mlp": "MoE",
    "torch_moe_router": "MoE",
}
_ATTENTION_KEYWORD_FEATURES = {
    "sliding_window": "sliding window",
    "sinks": "attention sinks",
    "logit_cap": "attention soft-cap",
}
_QK_NORM_ATTRIBUTES = {"q_norm", "q_layernorm", "query_layernorm"}
_FEATURE_ORDER = (
    "MoE",
    "MLA",
    "sliding window",
    "attention sinks",
    "attention soft-cap",
    "ALiBi",
    "q/k norm",
)
_LEAN_IN_TEST = re.compile(r"modeling_([a-z0-9_]+)|_custom\(['\"]([a-z0-9_]+)['\"]\)")


@dataclass(frozen=True)
class LeanFile:
    """One shipped ``modeling_<stem>.py``: the class it registers and the features its code uses."""

    stem: str
    lean_class: str
    features: tuple[str, ...]


@dataclass(frozen=True)
class ArchitectureRow:
    model_type: str
    architecture: str  # the transformers class (``architectures`` in a config.json)
    features: tuple[str, ...]
    shipped: bool  # a lean file and its generated test are committed
    verdict: str  # the coverage sweep's verdict on a tiny config, e.g. "pass (15/15)"
    worst_model_rmse: float | None
    tensor_parallel: bool
    checkpoints: tuple[str, ...]  # onboarded registry entries of this model_type


@dataclass(frozen=True)
class CheckpointRow:
    name: str
    world_size: int
    dtype: str
    record: OnboardRecord | None
    cookbook: str | None  # the notebook's path from docs/, when one is committed


@dataclass(frozen=True)
class SupportMatrix:
    transformers: str  # the release the coverage sweep ran on
    architectures: list[ArchitectureRow]
    checkpoints: list[CheckpointRow]
    coverage_counts: dict[str, int] = field(default_factory=dict)


def scan_lean_file(path: Path) -> LeanFile:
    """The registered class and the features of a lean file, from its syntax tree (nothing imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    features: set[str] = set()
    lean_class = ""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if (
                name == "register_custom_model_cls"
                and len(node.args) == 2
                and isinstance(node.args[1], ast.Name)
            ):
                lean_class = node.args[1].id
            if name in _OP_FEATURES:
                features.add(_OP_FEATURES[name])
            if name == "torch_attention":
                features.update(
                    _ATTENTION_KEYWORD_FEATURES[k.arg]
                    for k in node.keywords
                    if k.arg in _ATTENTION_KEYWORD_FEATURES
                )
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and node.attr in _QK_NORM_ATTRIBUTES
        ):
            features.add("q/k norm")
        if isinstance(node, ast.FunctionDef) and "alibi" in node.name:
            features.add("ALiBi")
    if not lean_class:
        raise OnboardlmError(str(path), "no register_custom_model_cls(...) call: not a lean model file")
    ordered = tuple(f for f in _FEATURE_ORDER if f in features)
    return LeanFile(path.stem.removeprefix("modeling_"), lean_class, ordered)


def tensor_parallel_stems(sharding_test: Path) -> set[str]:
    """The lean files (by stem) that the TP=2 vs TP=1 test loads."""
    if not sharding_test.is_file():
        return set()
    text = sharding_test.read_text(encoding="utf-8")
    return {a or b for a, b in _LEAN_IN_TEST.findall(text)}


def load_coverage(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["types"]  # noqa: B018 - the one key every use needs
    except FileNotFoundError:
        raise OnboardlmError(str(path), "file not found", "run benchmarks/coverage.py") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise OnboardlmError(str(path), f"not a coverage sweep: {err!r}") from None
    return data


def _verdict(result: dict[str, Any] | None) -> str:
    if not result:
        return "not swept"
    return f"{result['verdict']} ({result['tests']})" if result.get("tests") else str(result["verdict"])


def build_matrix(layout: CheckoutLayout) -> SupportMatrix:
    """Read every input of the matrix from the checkout."""
    coverage = load_coverage(layout.coverage_file)
    types: dict[str, dict[str, Any]] = coverage["types"]
    by_stem = {name.replace("-", "_"): name for name in types}
    records = read_records(layout.records_dir)
    onboarded: dict[str, list[str]] = {}
    for record in records:
        if record.registered_as and record.status == "pass":
            onboarded.setdefault(record.model_type, []).append(record.registered_as)
    tp = tensor_parallel_stems(layout.sharding_test)

    rows = []
    lean = [scan_lean_file(path) for path in sorted(layout.custom_dir.glob("modeling_*.py"))]
    for file in lean:
        model_type = by_stem.get(file.stem, file.stem)
        swept = types.get(model_type, {})
        rows.append(_row(model_type, swept, file.features, True, file.stem in tp, onboarded, file.lean_class))
    shipped = {row.model_type for row in rows}
    for model_type, swept in sorted(types.items()):
        if model_type not in shipped and swept.get("tiny", {}).get("verdict") == "pass":
            rows.append(_row(model_type, swept, (), False, False, onboarded, "?"))

    by_name = {record.registered_as: record for record in records if record.registered_as}
    checkpoints = []
    for entry in read_entries(layout.registry_dir):
        settings = settings_for_model(entry.name, layout.registry_dir)
        record = by_name.get(entry.name)
        notebook = layout.cookbook_dir / f"{record.slug}.ipynb" if record else None
        cookbook = (
            f"../{notebook.relative_to(layout.root).as_posix()}" if notebook and notebook.is_file() else None
        )
        checkpoints.append(CheckpointRow(entry.name, settings.world_size, settings.dtype, record, cookbook))
    counts = dict(coverage.get("counts", {}).get("tiny", {}))
    return SupportMatrix(str(coverage.get("transformers", "?")), rows, checkpoints, counts)


def _row(
    model_type: str,
    swept: dict[str, Any],
    features: tuple[str, ...],
    shipped: bool,
    tensor_parallel: bool,
    onboarded: dict[str, list[str]],
    fallback_class: str,
) -> ArchitectureRow:
    tiny = swept.get("tiny")
    worst = (tiny or {}).get("worst_rmse", {}).get("model")
    return ArchitectureRow(
        model_type=model_type,
        architecture=swept.get("class") or fallback_class,
        features=features,
        shipped=shipped,
        verdict=_verdict(tiny),
        worst_model_rmse=worst,
        tensor_parallel=tensor_parallel,
        checkpoints=tuple(sorted(onboarded.get(model_type, []))),
    )


def render_matrix(matrix: SupportMatrix) -> str:
    """The markdown page; the same inputs always give the same text."""
    shipped = [row for row in matrix.architectures if row.shipped]
    others = [row for row in matrix.architectures if not row.shipped]
    counts = ", ".join(
        f"{n} {verdict.replace('_', ' ')}" for verdict, n in matrix.coverage_counts.items() if n
    )
    lines = [
        "# Support matrix",
        "",
        "<!-- Generated by `onboardlm registry matrix` (src/onboardlm/registry/matrix.py); do not edit. -->",
        "",
        "Generated from the lean model files in `src/onboardlm/models/custom/`, the coverage sweep",
        f"(`benchmarks/results/coverage.json`, transformers {matrix.transformers}), the TP test",
        "(`tests/transforms/test_sharding.py`), the registry (`src/onboardlm/registry/`) and the onboarding",
        "records in `docs/onboarded/` (`onboardlm onboard --into-package` writes them;",
        "`onboardlm registry record REPORT.json` imports a report). `tests/registry/test_matrix.py` fails when",
        "this page is out of date.",
        "",
        "- **features**: read from the canonical ops each lean file calls (`torch_moe*` MoE, `torch_mla` MLA) and",
        "  the attention arguments it passes (sliding window, sinks, soft-cap); q/k norm and ALiBi from its modules.",
        "- **coverage**: the sweep's verdict on a tiny config of the model_type (tests passed / run); **worst RMSE**:",
        "  the largest full-model RMSE ratio of its fp32/bf16 logits tests.",
        "- **TP**: TP=2 equals TP=1 on the CPU over gloo in `tests/transforms/test_sharding.py` (no multi-GPU run yet).",
        "- **checkpoints**: registry entries onboarded from a real checkpoint (an onboarding record with status pass).",
        "",
        f"## Shipped architectures ({len(shipped)})",
        "",
        "Lean file committed, its generated tests run in CI.",
        "",
        "| model_type | architecture | features | coverage | worst RMSE | TP | checkpoints |",
        "| --- | --- | --- | --- | ---: | :---: | --- |",
    ]
    lines += [_architecture_line(row) for row in shipped]
    lines += [
        "",
        f"## Also onboard, not shipped ({len(others)})",
        "",
        "`onboardlm onboard <model_type or checkpoint>` generates, verifies and reviews these; no lean file is",
        "committed for them.",
        "",
        "| model_type | architecture | coverage | worst RMSE |",
        "| --- | --- | --- | ---: |",
    ]
    lines += [
        f"| {row.model_type} | {row.architecture} | {row.verdict} | {_rmse(row.worst_model_rmse)} |"
        for row in others
    ]
    lines += [
        "",
        f"All {sum(matrix.coverage_counts.values())} causal-LM types of transformers {matrix.transformers}: {counts}",
        "([coverage.md](coverage.md) gives the reason for each).",
        "",
        f"## Registry checkpoints ({len(matrix.checkpoints)})",
        "",
        "| checkpoint | world size | dtype | model_type | onboarded | tests | worst RMSE per level | cookbook |",
        "| --- | ---: | --- | --- | --- | ---: | --- | --- |",
    ]
    lines += [_checkpoint_line(row) for row in matrix.checkpoints]
    return "\n".join(lines) + "\n"


def _architecture_line(row: ArchitectureRow) -> str:
    cells = [
        row.model_type,
        row.architecture,
        ", ".join(row.features) or "-",
        row.verdict,
        _rmse(row.worst_model_rmse),
        "yes" if row.tensor_parallel else "-",
        ", ".join(row.checkpoints) or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def _checkpoint_line(row: CheckpointRow) -> str:
    record = row.record
    if record is None:
        cells = ["-", "not yet", "-", "-"]
    else:
        worst = ", ".join(f"{level} {_rmse(value)}" for level, value in record.worst_metric.items()) or "-"
        status = (
            f"{record.status} (transformers {record.transformers})" if record.transformers else record.status
        )
        cells = [record.model_type, status, f"{record.tests_passed}/{record.tests_total}", worst]
    notebook = f"[{Path(row.cookbook).name}]({row.cookbook})" if row.cookbook else "-"
    return "| " + " | ".join([row.name, str(row.world_size), row.dtype, *cells, notebook]) + " |"


def _rmse(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.3g}"


def matrix_text(layout: CheckoutLayout) -> str:
    return render_matrix(build_matrix(layout))


def write_matrix(layout: CheckoutLayout) -> Path:
    """Regenerate ``docs/support-matrix.md`` (atomically); return its path."""
    layout.matrix_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(layout.matrix_file, matrix_text(layout))
    return layout.matrix_file


def matrix_is_current(layout: CheckoutLayout) -> bool:
    """Whether the committed page equals what the inputs give now."""
    path = layout.matrix_file
    return path.is_file() and path.read_text(encoding="utf-8") == matrix_text(layout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onboardlm.registry.matrix", description=__doc__.split("\n")[0]
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite docs/support-matrix.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when it is out of date")
    parser.add_argument("--root", type=Path, default=None, help="the checkout [default: this package's]")
    args = parser.parse_args(argv)
    try:
        layout = CheckoutLayout.at(args.root)
        if args.write:
            print(f"wrote {write_matrix(layout)}")
            return 0
        if matrix_is_current(layout):
            print(f"{layout.matrix_file} is up to date")
            return 0
    except OnboardlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{layout.matrix_file} is out of date: run python -m onboardlm.registry.matrix --write",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
