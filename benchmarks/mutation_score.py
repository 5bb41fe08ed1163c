"""Mutation score of generated lean model files: does each file's generated test catch plausible bugs?

For every type, each kind of the catalogue in ``onboardlm.testing.mutations`` that applies to
``src/onboardlm/models/custom/modeling_<type>.py`` is applied (an AST edit) and the generated test
``tests/models/generated/test_<type>_modeling.py`` is run against the mutant (pytest -x, one forked
child per mutant). Writes, per file, the applicable mutants, how many were caught and the test that
caught each (with its metric and tolerance), the mutants that do not change the numbers and why,
and the kinds whose construct the file lacks, to
benchmarks/results/mutation_score.json (or ``--out``). Exit status 1 when any applicable mutant
survives or errors.

    .venv/bin/python benchmarks/mutation_score.py [TYPE ...] [--kinds K1,K2] [--tests-dir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from onboardlm.registry.atomic import atomic_write_text
from onboardlm.testing.mutations import KINDS, Kind, kinds_by_name, mutants
from onboardlm.testing.mutations.runner import MutantOutcome, score_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src/onboardlm/models/custom"
TESTS = ROOT / "tests/models/generated"
RESULTS = ROOT / "benchmarks/results/mutation_score.json"


def shipped_types() -> list[str]:
    return sorted(path.stem.removeprefix("modeling_") for path in MODELS.glob("modeling_*.py"))


def kinds_without_site(model_file: Path, kinds: list[Kind]) -> list[str]:
    """The kinds whose construct the file does not have (no mutant to make)."""
    applied = {mutant.kind for mutant in mutants(model_file.read_text(), kinds)}
    return [kind.name for kind in kinds if kind.name not in applied]


def _line(outcome: MutantOutcome) -> str:
    where = f" by {outcome.caught_by}" if outcome.caught_by else ""
    metric = (
        f" ({outcome.metric:.2e} > {outcome.tolerance:g})" if outcome.metric and outcome.tolerance else ""
    )
    detail = f": {outcome.detail[:100]}" if outcome.status != "caught" else ""
    return f"  {outcome.kind:28s} {outcome.status}{where}{metric}{detail}"


def _earlier_files(path: Path) -> dict[str, dict]:
    """Per-file results of an earlier run written to ``path`` (none if it does not exist)."""
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text())["files"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every shipped generated file)")
    parser.add_argument("--kinds", help="comma-separated mutation kinds (default: the whole catalogue)")
    parser.add_argument("--tests-dir", type=Path, default=TESTS, help="folder of test_<type>_modeling.py")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    kinds = kinds_by_name(args.kinds.split(",")) if args.kinds else kinds_by_name()
    types = [name.replace("-", "_") for name in args.types] or shipped_types()
    unknown = [name for name in types if not (MODELS / f"modeling_{name}.py").is_file()]
    if unknown:
        parser.error(f"no generated file for {', '.join(unknown)} (shipped: {', '.join(shipped_types())})")
    start = time.monotonic()
    # a run over some types updates their entries and keeps the others of an earlier run
    files = _earlier_files(args.out) if args.types else {}
    for model_type in types:
        print(model_type, flush=True)
        score = score_file(
            MODELS / f"modeling_{model_type}.py",
            args.tests_dir / f"test_{model_type}_modeling.py",
            kinds,
            timeout_s=args.timeout,
            progress=lambda outcome: print(_line(outcome), flush=True),
        )
        if score.control is not None and score.control.status != "passed":
            print(f"  control failed: {score.control.detail}", flush=True)
        print(f"  {len(score.caught)}/{len(score.applicable)} caught in {score.seconds:.1f} s", flush=True)
        files[model_type] = score.to_dict()
        files[model_type]["kinds_without_site"] = kinds_without_site(
            MODELS / f"modeling_{model_type}.py", kinds
        )
        for key in ("model_file", "test_file"):
            path = Path(files[model_type][key]).resolve()
            files[model_type][key] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    applicable = sum(f["applicable"] for f in files.values())
    caught = sum(f["caught"] for f in files.values())
    controls_ok = all(f["control"] and f["control"]["status"] == "passed" for f in files.values())
    data = {
        "machine": f"{platform.machine()} {platform.system()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.monotonic() - start, 1),  # of this run
        "kinds": [{"name": kind.name, "bug": kind.bug} for kind in KINDS if kind in kinds],
        "total": {"files": len(files), "applicable": applicable, "caught": caught},
        "files": files,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    print(f"total {caught}/{applicable} caught in {data['seconds']} s; wrote {args.out}")
    return 0 if controls_ok and caught == applicable else 1


if __name__ == "__main__":
    sys.exit(main())
