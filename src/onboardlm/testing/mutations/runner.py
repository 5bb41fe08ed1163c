"""Run a generated test file against each mutant of its lean model file.

The parent process imports torch, transformers and the lean module once and never computes; each
mutant then runs in a forked child, which replaces the lean module (``sys.modules`` and its package
attribute) with the mutated source and runs the test file with pytest ``-x`` and the metrics
plugin. A mutant is *caught* when a test fails or errors, and the first such test is named with its
metric and tolerance. A mutant that survives is probed: the original and the mutated lean model,
loaded with the same reference weights, are compared on the test config and its variants; equal
logits make it *equivalent* (the configs do not reach the change), different ones *survived*.
The unmutated file runs first as a control: if its tests fail, no mutant is scored.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from onboardlm.testing.mutations.catalog import Kind, Mutant, kinds_by_name, mutants

__all__ = ["FileScore", "MutantOutcome", "lean_module_name", "score_file", "literal_config_fields"]

CAUGHT, SURVIVED, EQUIVALENT, NOT_APPLICABLE, ERROR = (
    "caught",
    "survived",
    "equivalent",
    "not applicable",
    "error",
)
PASSED = "passed"  # the control: the unmutated file passes its tests


@dataclass(frozen=True)
class MutantOutcome:
    kind: str
    bug: str
    status: str
    lines: tuple[int, ...] = ()
    caught_by: str | None = None
    metric: float | None = None
    tolerance: float | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclass
class FileScore:
    model_file: str
    test_file: str
    control: MutantOutcome | None = None
    outcomes: list[MutantOutcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def applicable(self) -> list[MutantOutcome]:
        return [o for o in self.outcomes if o.status in (CAUGHT, SURVIVED, ERROR)]

    @property
    def caught(self) -> list[MutantOutcome]:
        return [o for o in self.outcomes if o.status == CAUGHT]

    @property
    def score(self) -> float | None:
        return len(self.caught) / len(self.applicable) if self.applicable else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_file": self.model_file,
            "test_file": self.test_file,
            "applicable": len(self.applicable),
            "caught": len(self.caught),
            "score": self.score,
            "seconds": round(self.seconds, 2),
            "control": asdict(self.control) if self.control else None,
            "mutants": [asdict(o) for o in self.outcomes],
        }


# -------------------------------------------------------------------------------- reading the test


def lean_module_name(test_source: str) -> str:
    """The module the test file imports ``as lean``."""
    for node in ast.parse(test_source).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if alias.asname == "lean":
                    return f"{node.module}.{alias.name}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname == "lean":
                    return alias.name
    raise ValueError("the test file imports no module as `lean`")


def literal_config_fields(test_source: str) -> dict[str, Any]:
    """The literal config fields of the test file's ``make_config`` (a dict or keyword literals)."""
    for node in ast.parse(test_source).body:
        if isinstance(node, ast.FunctionDef) and node.name == "make_config":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Dict):
                    try:
                        return ast.literal_eval(inner)
                    except ValueError:
                        continue
            calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and c.keywords]
            fields = {}
            for kw in calls[0].keywords if calls else []:
                if kw.arg is not None:
                    try:
                        fields[kw.arg] = ast.literal_eval(kw.value)
                    except ValueError:
                        continue
            return fields
    return {}


# -------------------------------------------------------------------------------- in the child


def _install(module_name: str, source: str, folder: Path) -> types.ModuleType:
    """Execute ``source`` as ``module_name`` in place of the imported module."""
    path = folder / f"{module_name.rpartition('.')[2]}_mutant.py"
    path.write_text(source)
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    package, _, short = module_name.rpartition(".")
    if package:
        module.__package__ = package
    sys.modules[module_name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    if package:
        setattr(sys.modules[package], short, module)
    return module


def _first_failure(metrics: Path) -> tuple[str | None, float | None, float | None, str]:
    data = json.loads(metrics.read_text())
    for test in data["tests"]:
        if test["outcome"] in ("failed", "error"):
            failed = [c for c in test["checks"] if not c["passed"]]
            check = failed[0] if failed else None
            return (
                test["name"],
                check["metric"] if check else None,
                check["tolerance"] if check else None,
                test["message"][:300],
            )
    if data["errors"]:
        return "collection", None, None, "; ".join(data["errors"])[:300]
    return None, None, None, ""


def _probe(test_file: Path, original: types.ModuleType) -> tuple[bool, float, list[str]]:
    """(equal logits on every config, largest RMSE ratio of mutant vs original logits, config ids)."""
    import torch

    from onboardlm.testing import rmse_ratio, transfer_weights

    spec = importlib.util.spec_from_file_location("_mutation_probe", test_file)
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    named = {"base": {}, **getattr(tests, "CONFIG_VARIANTS", {})}
    variants = list(named.values())
    equal, worst = True, 0.0
    with torch.no_grad():
        for overrides in variants:
            reference = tests.make_reference(torch.float32, **overrides)
            mutant = tests.make_lean(reference, **overrides)
            clean = getattr(original, type(mutant).__name__)(tests.make_config(**overrides))
            transfer_weights(reference, clean)
            clean = clean.eval().to(torch.float32)
            ids = tests.token_ids(2, tests.SEQ_LEN, seed=1)
            pos = tests.positions(2, tests.SEQ_LEN)
            got = mutant(input_ids=ids, position_ids=pos).logits
            want = clean(input_ids=ids, position_ids=pos).logits
            equal = equal and torch.equal(got, want)
            worst = max(worst, rmse_ratio(got, want))
    return equal, worst, list(named)


def _pytest_args(test_file: Path, metrics: Path) -> list[str]:
    folder = str(test_file.parent)
    return [
        str(test_file),
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "onboardlm.testing.pytest_plugin",
        f"--onboardlm-metrics={metrics}",
        f"--rootdir={folder}",
        f"--confcutdir={folder}",
        "-W",
        "ignore",
    ]


def _child(conn: Connection, module_name: str, mutant: Mutant | None, test_file: Path, probe: bool) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        import pytest
        import torch

        torch.set_num_threads(1)
        original = sys.modules[module_name]
        with tempfile.TemporaryDirectory(prefix="onboardlm-mutant-") as tmp:
            if mutant is not None:
                try:
                    _install(module_name, mutant.source, Path(tmp))
                except Exception as err:  # a broken edit, not a caught bug
                    conn.send({"status": ERROR, "detail": f"mutant does not import: {err!r}"[:300]})
                    return
            metrics = Path(tmp) / "metrics.json"
            code = pytest.main(_pytest_args(test_file, metrics))
            name, metric, tolerance, message = _first_failure(metrics)
            if code == 0:
                result: dict[str, Any] = {"status": SURVIVED}
                if probe and mutant is not None:
                    equal, worst, configs = _probe(test_file, original)
                    result = {
                        "status": EQUIVALENT if equal else SURVIVED,
                        "metric": worst,
                        "detail": f"logits equal to the original's on every test config: {', '.join(configs)}"
                        if equal
                        else f"logits differ from the original's (RMSE ratio {worst:.2e}) yet every test passed",
                    }
                conn.send(result)
            elif name == "collection" or name is None:
                conn.send({"status": ERROR, "detail": f"pytest exit {int(code)}: {message}"})
            else:
                conn.send(
                    {
                        "status": CAUGHT,
                        "caught_by": name,
                        "metric": metric,
                        "tolerance": tolerance,
                        "detail": message,
                    }
                )
    except BaseException as err:  # report whatever happened; the parent must get an answer
        conn.send({"status": ERROR, "detail": repr(err)[:300]})
    finally:
        conn.close()
        os._exit(0)


def _run(
    module_name: str, mutant: Mutant | None, test_file: Path, probe: bool, timeout_s: float
) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, module_name, mutant, test_file, probe))
    process.start()
    send.close()
    result: dict[str, Any] = {"status": ERROR, "detail": f"no answer within {timeout_s:g} s"}
    if receive.poll(timeout_s):
        try:
            result = receive.recv()
        except EOFError:
            result = {"status": ERROR, "detail": "the child exited without an answer"}
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    return result


# -------------------------------------------------------------------------------- the parent


def _import_for_children(module_name: str, model_file: Path) -> None:
    """Import what every child needs, so each fork starts warm; no tensor math runs here."""
    import pytest  # noqa: F401
    import torch  # noqa: F401

    import onboardlm.testing.pytest_plugin  # noqa: F401

    if "." not in module_name and str(model_file.parent) not in sys.path:
        sys.path.insert(0, str(model_file.parent))
    importlib.import_module(module_name)


def score_file(
    model_file: Path,
    test_file: Path,
    kinds: Iterable[Kind] | None = None,
    *,
    timeout_s: float = 300.0,
    progress: Callable[[MutantOutcome], None] | None = None,
) -> FileScore:
    """Mutate ``model_file`` with each applicable kind and run ``test_file`` against every mutant."""
    start = time.monotonic()
    test_source = test_file.read_text()
    module_name = lean_module_name(test_source)
    fields = literal_config_fields(test_source)
    score = FileScore(str(model_file), str(test_file))
    _import_for_children(module_name, model_file)
    control = _run(module_name, None, test_file, False, timeout_s)
    if control["status"] == SURVIVED:  # for the unmutated file that means: its tests pass
        control["status"] = PASSED
    score.control = MutantOutcome("control", "the file as generated", **_outcome_fields(control))
    if control["status"] != PASSED:
        score.seconds = time.monotonic() - start
        return score
    kind_list = list(kinds) if kinds is not None else kinds_by_name()
    requirements = {kind.name: kind.requires for kind in kind_list}
    for mutant in mutants(model_file.read_text(), kind_list):
        began = time.monotonic()
        requirement = requirements[mutant.kind]
        reason = requirement(fields) if requirement is not None else None
        if reason is not None:
            result: dict[str, Any] = {"status": NOT_APPLICABLE, "detail": reason}
        else:
            result = _run(module_name, mutant, test_file, True, timeout_s)
        outcome = MutantOutcome(
            mutant.kind,
            mutant.bug,
            lines=mutant.lines,
            seconds=round(time.monotonic() - began, 2),
            **_outcome_fields(result),
        )
        score.outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    score.seconds = time.monotonic() - start
    return score


def _outcome_fields(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("status", "caught_by", "metric", "tolerance", "detail")
    return {key: result[key] for key in keys if key in result}
