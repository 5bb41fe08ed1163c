"""Onboarding records: the part of an onboarding's ``report.json`` that the committed docs are made from.

``onboardlm onboard`` writes ``report.json`` into its output folder, which is not committed and holds
timings. A record keeps what does not change from run to run (model, model type, the registry entry
it belongs to, status, test counts, the worst metric per test level, the review and end-to-end
summaries, the transformers release) as ``docs/onboarded/<slug>.json``; the support matrix and the
cookbook read these records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboardlm.errors import OnboardlmError
from onboardlm.registry.atomic import atomic_write_text
from onboardlm.registry.layout import model_config_file

#: Suffixes a converted file's name adds to its model's name (``SmolLM2-135M-Instruct.Q4_1``).
_CONVERTED_SUFFIXES = (".", "-q", "_q")


@dataclass(frozen=True)
class OnboardRecord:
    """One model onboarded into the package, as its report saw it."""

    model: str  # what was onboarded: a hub id, or the name of a local folder or GGUF file
    model_type: str
    status: str  # "pass" | "fail"
    registered_as: str | None  # the registry entry it belongs to
    tests_passed: int
    tests_total: int
    worst_metric: dict[str, float] = field(default_factory=dict)  # test level -> worst RMSE ratio
    review: str = ""  # the review phase's summary
    e2e: str = ""  # the end-to-end phase's summary
    transformers: str = ""  # the release the record was made with
    text_decoder_of: str | None = None  # the multimodal model_type whose text decoder this is

    @property
    def slug(self) -> str:
        """The file stem: the registry entry's (or the model's) config-file stem."""
        return model_config_file(self.registered_as or self.model).removesuffix(".yaml")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def match_entry(model: str, entry_names: Sequence[str]) -> str | None:
    """The registry entry ``model`` belongs to: the same id (any case), or the longest entry whose
    name starts a converted file's name (``SmolLM2-135M-Instruct.Q4_1`` -> ``.../SmolLM2-135M-Instruct``)."""
    lowered = model.lower()
    for name in entry_names:
        if name.lower() == lowered:
            return name
    base = lowered.rsplit("/", 1)[-1]
    found = [
        name
        for name in entry_names
        if base.startswith(stem := name.rsplit("/", 1)[-1].lower())
        and base[len(stem) :].startswith(_CONVERTED_SUFFIXES)
    ]
    return max(found, key=len, default=None)


def record_from_report(
    report: Mapping[str, Any], entry_names: Sequence[str], transformers_version: str
) -> OnboardRecord:
    """The record of a ``report.json`` (as loaded); ``entry_names`` are the registry's names."""
    try:
        model, model_type, status = str(report["model"]), str(report["model_type"]), str(report["status"])
        phases = {phase["name"]: phase for phase in report.get("phases", [])}
        tests = list(report.get("tests", []))
        worst: dict[str, float] = {}
        for test in tests:
            metric = test.get("metric")
            if metric is not None:
                worst[test["level"]] = max(worst.get(test["level"], 0.0), float(f"{metric:.3g}"))
    except (KeyError, TypeError, ValueError) as err:
        raise OnboardlmError(
            "report.json", f"not an onboarding report: {err!r} is missing or malformed"
        ) from None
    return OnboardRecord(
        model=model,
        model_type=model_type,
        status=status,
        registered_as=match_entry(model, entry_names),
        tests_passed=sum(bool(test.get("passed")) for test in tests),
        tests_total=len(tests),
        worst_metric=dict(sorted(worst.items())),
        review=str(phases.get("review", {}).get("summary", "")),
        e2e=str(phases.get("e2e", {}).get("summary", "")),
        transformers=transformers_version,
        text_decoder_of=report.get("text_decoder_of"),
    )


def read_report(path: Path) -> dict[str, Any]:
    """Load a ``report.json`` written by ``onboardlm onboard``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OnboardlmError(str(path), "file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnboardlmError(str(path), f"not a JSON report: {err}") from None
    if not isinstance(data, dict):
        raise OnboardlmError(str(path), "not an onboarding report: expected a JSON object")
    return data


def write_record(record: OnboardRecord, records_dir: Path) -> Path:
    """Write ``records_dir/<slug>.json`` (atomically); return its path."""
    records_dir.mkdir(parents=True, exist_ok=True)
    path = records_dir / f"{record.slug}.json"
    atomic_write_text(path, record.to_json())
    return path


def read_records(records_dir: Path) -> list[OnboardRecord]:
    """Every record under ``records_dir``, by file name; a malformed one is a one-line error."""
    records = []
    for path in sorted(records_dir.glob("*.json")) if records_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records.append(OnboardRecord(**data))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
            raise OnboardlmError(str(path), f"not an onboarding record: {err}") from None
    return records
