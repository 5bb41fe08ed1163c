"""Onboard every type of transformers' causal-LM mapping, twice, and record each verdict.

Per model type two inputs: the bare ``model_type`` (transformers' default config, completed as
onboardlm completes it) and a complete tiny config (``tiny_config`` of the completed default config,
as a real checkpoint's would be) written to a directory. Each onboarding runs in a fresh process
with a time limit; its verdict is one of

- ``pass``: every phase passed;
- ``refused``: resolve refused the input in one line (encoder-only, seq2seq, no causal-LM class);
- ``unsupported``: a phase stopped on a named unsupported feature (module path + feature);
- ``fail``: a phase failed otherwise (an equivalence test or a review rule), with its summary;
- ``internal_error``: a traceback reached the report or the process died;
- ``timeout``: the per-type time limit ran out;
- ``skipped``: no tiny config could be written (transformers' default config does not validate).

``benchmarks/results/coverage.json`` gets, per type and input, the verdict, the failing phase and
its reason, the seconds and the worst RMSE ratio per test level; it is rewritten atomically after
each type, and a rerun skips the types it already holds (``--force`` redoes them). The support table
is rendered from it into the marked block of ``docs/coverage.md``.

    .venv/bin/python benchmarks/coverage.py [--types a,b,c] [--jobs 1] [--timeout 300] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "coverage.json"
DOC = ROOT / "docs" / "coverage.md"
VARIANTS = ("bare", "tiny")
VERDICTS = ("pass", "refused", "unsupported", "fail", "internal_error", "timeout", "skipped")
BLOCK_START, BLOCK_END = "<!-- coverage:start -->", "<!-- coverage:end -->"
#: Tests whose tolerance is at least this are RMSE-ratio tests (the others are assert_close).
RMSE_TOLERANCE_FLOOR = 0.01
DEFAULT_TIMEOUT_S = 300.0
TINY_DIR = "<tiny config dir>"  # the directory of the tiny config, as reasons name it


@dataclass
class Outcome:
    """How one onboarding ended."""

    verdict: str
    seconds: float
    phase: str | None = None  # the first phase that failed
    reason: str | None = None  # its one-line summary (or the refusal, or the crash)
    tests: str | None = None  # "passed/total" of the generated tests, when verify ran
    worst_rmse: dict[str, float] = field(default_factory=dict)  # level -> worst RMSE ratio
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ worker


def _tiny_directory(model_type: str, directory: Path) -> list[str]:
    """Write the complete tiny config of ``model_type`` to ``directory``; return notes."""
    from transformers import AutoConfig

    from onboardlm.models.config_completion import complete_default_config
    from onboardlm.testing import tiny_config

    config = AutoConfig.for_model(model_type)
    notes = complete_default_config(config)
    try:
        config = tiny_config(config)
    except Exception as err:  # noqa: BLE001 - composite configs, validators: the whole config instead
        reason = " ".join(str(err.__cause__ or err).split())
        notes.append(f"no tiny copy ({type(err).__name__}: {reason}); the complete default config written")
    directory.mkdir(parents=True)
    config.save_pretrained(directory)
    return notes


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def classify(result: Any) -> Outcome:
    """The outcome of an :class:`~onboardlm.onboard.result.OnboardResult`."""
    tests = result.tests
    worst: dict[str, float] = {}
    for test in tests:
        if test.metric is not None and test.tolerance is not None and test.tolerance >= RMSE_TOLERANCE_FLOOR:
            worst[test.level] = max(worst.get(test.level, 0.0), float(f"{test.metric:.3g}"))
    outcome = Outcome(
        verdict="pass", seconds=round(result.seconds, 2), worst_rmse=dict(sorted(worst.items()))
    )
    if tests:
        outcome.tests = f"{sum(t.passed for t in tests)}/{len(tests)}"
    failed = next((record for record in result.phases if record.status == "fail"), None)
    internal = next((record for record in result.phases if "internal error" in record.summary), None)
    if internal is not None:  # in any phase, even after another phase failed first
        outcome.verdict, outcome.phase, outcome.reason = (
            "internal_error",
            internal.name,
            _first_line(internal.summary),
        )
    elif failed is not None:
        outcome.phase, outcome.reason = failed.name, _first_line(failed.summary)
        outcome.verdict = "unsupported" if "unsupported feature" in failed.summary else "fail"
    return outcome


def run_worker(model_type: str, variant: str, work: Path, result_file: Path) -> None:
    """Onboard one input in this process and write its :class:`Outcome` as JSON to ``result_file``."""
    from onboardlm.errors import OnboardlmError, UnsupportedFeature
    from onboardlm.onboard.pipeline import OnboardOptions, onboard

    start = time.perf_counter()
    notes: list[str] = []
    try:
        model = model_type
        if variant == "tiny":
            try:
                notes = _tiny_directory(model_type, work / "config")
            except Exception as err:  # noqa: BLE001 - no config to onboard: the input does not exist
                reason = " ".join(str(err.__cause__ or err).split())
                outcome = Outcome(
                    "skipped", 0.0, "harness", f"no config to write ({type(err).__name__}: {reason})"
                )
                outcome.seconds = round(time.perf_counter() - start, 2)
                result_file.write_text(json.dumps(asdict(outcome)))
                return
            model = str(work / "config")
        result = onboard(model, OnboardOptions(out_dir=work / "out", force=True))
        outcome = classify(result)
    except UnsupportedFeature as err:
        outcome = Outcome("unsupported", 0.0, "resolve", _first_line(str(err)))
    except OnboardlmError as err:
        internal = "internal error" in str(err)
        outcome = Outcome("internal_error" if internal else "refused", 0.0, "resolve", _first_line(str(err)))
    except Exception as err:  # noqa: BLE001 - the sweep records every crash as a verdict
        where = traceback.extract_tb(err.__traceback__)[-1]
        reason = f"{type(err).__name__}: {_first_line(str(err))} (at {where.filename}:{where.lineno})"
        outcome = Outcome("internal_error", 0.0, "harness", reason)
    outcome.seconds = round(time.perf_counter() - start, 2)
    outcome.notes = notes + outcome.notes
    if outcome.reason:  # no temporary paths in the results
        outcome.reason = outcome.reason.replace(str(work / "config"), TINY_DIR).replace(str(work), "<work>")
    result_file.write_text(json.dumps(asdict(outcome)))


# ------------------------------------------------------------------------------------------ parent


def onboard_in_subprocess(model_type: str, variant: str, timeout_s: float) -> Outcome:
    """Run the worker for one input in a fresh process (its own session, killed whole on timeout)."""
    with tempfile.TemporaryDirectory(prefix=f"coverage-{model_type}-{variant}-") as tmp:
        work, result_file = Path(tmp), Path(tmp) / "outcome.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, variant, str(work)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return Outcome("timeout", round(time.perf_counter() - start, 2), reason=f"over {timeout_s:.0f} s")
        seconds = round(time.perf_counter() - start, 2)
        if not result_file.is_file():
            last = stderr.strip().splitlines()[-1:] or [f"exit {process.returncode}"]
            return Outcome("internal_error", seconds, "process", f"worker died: {last[0]}")
        outcome = Outcome(**json.loads(result_file.read_text()))
        outcome.seconds = seconds  # the whole process, imports included
        return outcome


def all_types() -> dict[str, str]:
    """model_type -> causal-LM class name, for every type of transformers' causal-LM mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
    }


def counts(types: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per input variant: how many types ended in each verdict."""
    table = {variant: dict.fromkeys(VERDICTS, 0) for variant in VARIANTS}
    for row in types.values():
        for variant in VARIANTS:
            if variant in row:
                table[variant][row[variant]["verdict"]] += 1
    return table


class Sweep:
    """The results file: loaded at start, rewritten atomically after every finished type."""

    def __init__(self, path: Path, mapping: dict[str, str], timeout_s: float) -> None:
        self.path, self.mapping, self.timeout_s = path, mapping, timeout_s
        self.lock = threading.Lock()
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.types: dict[str, dict[str, Any]] = data.get("types", {})

    def record(self, model_type: str, row: dict[str, Any]) -> None:
        with self.lock:
            self.types[model_type] = row
            self.types = dict(sorted(self.types.items()))
            self.write()

    def write(self) -> None:
        from onboardlm.registry.atomic import atomic_write_text

        data = {
            **_environment(),
            "timeout_s": self.timeout_s,
            "mapping_size": len(self.mapping),
            "done": len(self.types),
            "complete": set(self.mapping) <= set(self.types),
            "counts": counts(self.types),
            "types": self.types,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(data, indent=2) + "\n")


def code_revision() -> str | None:
    """The git commit of this checkout (``-dirty`` with uncommitted changes), None outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if status.strip() else commit


def sweep_one(
    model_type: str, causal_lm_class: str, variants: tuple[str, ...], timeout_s: float, revision: str | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"class": causal_lm_class, "revision": revision}
    for variant in variants:
        row[variant] = asdict(onboard_in_subprocess(model_type, variant, timeout_s))
    return row


#: The analyzer's hint on every unsupported feature, left out of the table.
_GENERIC_HINT = re.compile(r" \(add a template for it in onboardlm/onboard/templates[^)]*\)")


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def render_table(data: dict[str, Any]) -> str:
    """The markdown support table (counts, then one row per type) from coverage.json's data."""
    types: dict[str, dict[str, Any]] = data["types"]
    revisions = sorted({str(row.get("revision"))[:12] for row in types.values()})
    lines = [
        f"transformers {data.get('transformers')}, torch {data.get('torch')}; "
        f"{data.get('done')} of {data.get('mapping_size')} types of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` "
        f"{'(complete)' if data.get('complete') else '(partial run)'}; onboardlm at {', '.join(revisions)}.",
        "",
        "| input | " + " | ".join(VERDICTS) + " |",
        "| --- | " + " | ".join("---:" for _ in VERDICTS) + " |",
    ]
    for variant, by_verdict in data["counts"].items():
        lines.append(f"| {variant} | " + " | ".join(str(by_verdict.get(v, 0)) for v in VERDICTS) + " |")
    lines += [
        "",
        "| model_type | bare | tiny config | seconds (tiny) | worst RMSE ratio (tiny) | why not (first failing phase) |",
        "| --- | --- | --- | ---: | --- | --- |",
    ]
    for model_type, row in types.items():
        bare, tiny = row.get("bare", {}), row.get("tiny", {})
        failing = next((o for o in (tiny, bare) if o and o["verdict"] != "pass"), None)
        why = f"{failing['phase']}: {_GENERIC_HINT.sub('', failing['reason'] or '')}" if failing else ""
        rmse = ", ".join(f"{level} {value:.3g}" for level, value in tiny.get("worst_rmse", {}).items())
        lines.append(
            f"| {model_type} | {bare.get('verdict', '-')} | {tiny.get('verdict', '-')} | "
            f"{tiny.get('seconds', '-')} | {rmse} | {_cell(why)} |"
        )
    return "\n".join(lines)


def write_doc(data: dict[str, Any], doc: Path) -> None:
    """Replace the marked block of ``doc`` with the table (the file is created if missing)."""
    from onboardlm.registry.atomic import atomic_write_text

    block = f"{BLOCK_START}\n{render_table(data)}\n{BLOCK_END}"
    if doc.is_file():
        text = doc.read_text()
        head, _, rest = text.partition(BLOCK_START)
        _, found, tail = rest.partition(BLOCK_END)
        text = f"{head}{block}{tail}" if found else f"{text.rstrip()}\n\n{block}\n"
    else:
        text = (
            "# Coverage of transformers' causal LMs\n\n"
            "Written by `benchmarks/coverage.py` from `benchmarks/results/coverage.json`: each type of\n"
            "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` onboarded from its bare `model_type` and from a complete\n"
            "tiny config in a directory. Verdicts: pass; refused (not a decoder-only causal LM);\n"
            "unsupported (a named feature no template covers); fail (a test or a review rule);\n"
            "internal_error; timeout; skipped (no tiny config could be written). The reasons drop\n"
            "the analyzer's generic hint; coverage.json has them whole.\n\n"
            f"{block}\n"
        )
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", help="comma-separated model types (default: the whole mapping)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="bare,tiny (default: both)")
    parser.add_argument("--jobs", type=int, default=1, help="onboardings at once (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per onboarding")
    parser.add_argument("--force", action="store_true", help="redo types already in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file with the marked table block")
    parser.add_argument("--revision", help="the commit the code under test is at (default: git rev-parse)")
    parser.add_argument("--worker", nargs=3, metavar=("TYPE", "VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        model_type, variant, work = args.worker
        run_worker(model_type, variant, Path(work), Path(work) / "outcome.json")
        return 0

    mapping = all_types()
    wanted = args.types.split(",") if args.types else list(mapping)
    unknown = [t for t in wanted if t not in mapping]
    if unknown:
        parser.error(f"not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {', '.join(unknown)}")
    variants = tuple(v for v in args.variants.split(",") if v)
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants takes {', '.join(VARIANTS)}")
    sweep = Sweep(args.out, mapping, args.timeout)
    revision = args.revision or code_revision()
    todo = [t for t in wanted if args.force or t not in sweep.types]
    print(f"{len(todo)} type(s) to onboard, {len(wanted) - len(todo)} already in {args.out}", flush=True)

    def one(model_type: str) -> None:
        row = sweep_one(model_type, mapping[model_type], variants, args.timeout, revision)
        sweep.record(model_type, row)
        verdicts = "  ".join(f"{v} {row[v]['verdict']:<14} {row[v]['seconds']:6.1f} s" for v in variants)
        failing = next((row[v] for v in variants if row[v]["verdict"] != "pass"), None)
        why = f"  {failing['phase']}: {failing['reason']}"[:160] if failing else ""
        print(f"{model_type:<28} {verdicts}{why}", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    sweep.write()
    data = json.loads(args.out.read_text())
    write_doc(data, args.doc)
    print(json.dumps(data["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
