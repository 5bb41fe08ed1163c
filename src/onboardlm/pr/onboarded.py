"""Read the output folder of ``onboardlm onboard`` (report.json, the model file, its test, the registry copy)."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboardlm.pr.layout import PrError
from onboardlm.registry.errors import RegistryError
from onboardlm.registry.loader import load_yaml_file

REPORT_KEYS = ("model", "model_type", "status", "phases", "tests")


@dataclass(frozen=True)
class OnboardedModel:
    """One passing onboarding, as ``onboardlm pr`` needs it."""

    folder: Path
    report: dict[str, Any]
    module: str  # modeling_<type>
    model_text: str
    test_text: str
    test_name: str  # test_<type>_modeling.py
    causal_lm_class: str  # the class the file registers with the factory
    registered_as: str | None  # the hub id of its registry entry, None without one
    world_size: int | None

    @property
    def model(self) -> str:
        return self.report["model"]

    @property
    def model_type(self) -> str:
        return self.report["model_type"]


def read_onboarded(folder: Path) -> OnboardedModel:
    """The onboarding in ``folder``; refuses anything that is not the output of a passing onboarding."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise PrError(str(folder), "onboarding output folder not found")
    report = _read_report(folder)
    if report["status"] != "pass":
        failed = [p["name"] for p in report["phases"] if isinstance(p, dict) and p.get("status") == "fail"]
        raise PrError(
            str(folder),
            f"the onboarding did not pass (failed: {', '.join(failed) or 'unknown'})",
            "fix it first",
        )
    module = f"modeling_{report['model_type'].replace('-', '_')}"
    test_name = f"test_{module.removeprefix('modeling_')}_modeling.py"
    model_text, test_text = _read(folder / f"{module}.py"), _read(folder / test_name)
    fit = report.get("fit") or {}
    return OnboardedModel(
        folder=folder,
        report=report,
        module=module,
        model_text=model_text,
        test_text=test_text,
        test_name=test_name,
        causal_lm_class=registered_class(model_text, folder / f"{module}.py"),
        registered_as=_registered_as(folder, report),
        world_size=fit.get("world_size") if isinstance(fit.get("world_size"), int) else None,
    )


def registered_class(text: str, path: Path) -> str:
    """The class a lean model file passes to ``register_custom_model_cls`` (its last argument)."""
    try:
        tree = ast.parse(text)
    except SyntaxError as err:
        raise PrError(str(path), f"does not parse: line {err.lineno}: {err.msg}") from None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "register_custom_model_cls"
            and node.args
            and isinstance(node.args[-1], ast.Name)
        ):
            return node.args[-1].id
    raise PrError(str(path), "registers no model class (no register_custom_model_cls call)")


def _read_report(folder: Path) -> dict[str, Any]:
    path = folder / "report.json"
    if not path.is_file():
        raise PrError(str(folder), "not an onboarding output: no report.json in it")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrError(str(path), f"cannot be read as JSON: {err}") from None
    missing = [key for key in REPORT_KEYS if not isinstance(report, dict) or key not in report]
    if missing:
        raise PrError(str(path), f"not an onboarding report: no {', '.join(missing)}")
    return report


def _read(path: Path) -> str:
    if not path.is_file():
        raise PrError(str(path.parent), f"not a complete onboarding output: {path.name} is missing")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PrError(str(path), f"cannot be read: {err}") from None


def _registered_as(folder: Path, report: dict[str, Any]) -> str | None:
    """The registry name: report.json's ``registered_as``, else the entry of the registry copy whose
    name is the model's (reports written before the key existed)."""
    if "registered_as" in report:
        return report["registered_as"]
    copy = folder / "registry" / "models.yaml"
    if not copy.is_file():
        return None
    try:
        models = load_yaml_file(copy).get("models") or []
    except RegistryError:
        return None
    wanted = str(report["model"]).lower()
    names = [entry.get("name") for entry in models if isinstance(entry, dict)]
    return next((name for name in names if isinstance(name, str) and name.lower() == wanted), None)
