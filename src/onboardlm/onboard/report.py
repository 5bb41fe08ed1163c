"""Phase 12: the onboarding report, as data (report.json) and for people (report.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from onboardlm.onboard.result import OnboardResult
from onboardlm.registry.atomic import atomic_write_text

JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"


def report_data(result: OnboardResult) -> dict[str, Any]:
    """The report as JSON-ready data; keys model, model_type, status, phases, tests, files first."""
    return {
        "model": result.model,
        "source": result.source,  # what was onboarded, as given on the command line
        "model_type": result.model_type,
        "status": result.status,
        "phases": [
            {"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "summary": r.summary}
            for r in result.phases
        ],
        "tests": [{**dataclasses.asdict(test), "margin": margin(test)} for test in result.tests],
        "files": [str(path) for path in result.files],
        "text_decoder_of": result.text_decoder_of,  # the multimodal model_type, or None
        "registered_as": result.registered_as,  # the registry entry (hub id), or None
        "spec": _plain(result.spec),
        "fit": _plain(result.fit),
        "coverage": _plain(result.coverage),
        "review": result.review.to_dict() if result.review is not None else None,
        "prompts": [dataclasses.asdict(p) for p in result.prompts],
        "not_done": result.not_done,
        "seconds": round(result.seconds, 3),
    }


def write_report(result: OnboardResult, folder: Path) -> list[Path]:
    """Write report.json and report.md into ``folder``; return their paths."""
    json_path, md_path = folder / JSON_NAME, folder / MARKDOWN_NAME
    atomic_write_text(json_path, json.dumps(report_data(result), indent=2, default=str) + "\n")
    atomic_write_text(md_path, render_markdown(result))
    return [json_path, md_path]


def render_markdown(result: OnboardResult) -> str:
    lines = [
        f"# Onboarding report: {result.model}",
        "",
        f"- model_type: `{result.model_type}`",
        f"- status: **{result.status.upper()}** in {result.seconds:.1f} s",
    ]
    if result.scope is not None:
        lines.append(f"- scope: {result.scope}")
    if result.fit is not None:
        fit = result.fit
        lines.append(
            f"- size: {fit.parameters / 1e9:.3f} B parameters, "
            f"{fit.bytes_per_dtype['bfloat16'] / 2**30:.2f} GiB in bf16, world size {fit.world_size}, "
            f"{'fits' if fit.fits else 'does not fit'} this machine"
        )
    if result.coverage is not None:
        coverage = result.coverage
        lines.append(f"- already supported before: {coverage.custom_class or 'no'}")
        if coverage.registry_family:
            lines.append(f"- registry family: {', '.join(coverage.registry_family)}")
        if coverage.derived_from:
            lines.append(f"- transformers lineage: derived from {', '.join(coverage.derived_from)}")
    lines += ["", "## Phases", "", "| phase | status | seconds | summary |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.2f} | {_cell(r.summary)} |" for r in result.phases]
    if result.tests:
        lines += [
            "",
            "## Tests",
            "",
            "margin = tolerance / metric: how many times the measured error fits under the tolerance.",
            "",
            "| level | test | metric | tolerance | margin | result |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        lines += [
            f"| {t.level} | `{t.name}` | {_number(t.metric)} | {_number(t.tolerance)} | {_margin_text(t)} | "
            f"{'pass' if t.passed else 'FAIL'} |"
            for t in result.tests
        ]
    if result.review is not None:
        review = result.review
        lines += ["", "## Review", "", f"REVIEW RESULT: {'PASS' if review.passed else 'FAIL'}"]
        lines += [f"- {f.rule_id} {f.location}: {f.reason}" for f in review.failures]
    if result.prompts:
        lines += ["", "## End-to-end run", "", "```"]
        lines += [f"[PROMPT {p.index}] {p.prompt}: {p.output}" for p in result.prompts]
        lines += ["```"]
    if result.spec is not None:
        lines += [
            "",
            "## Architecture spec",
            "",
            "```json",
            json.dumps(_plain(result.spec), indent=2, default=str),
        ]
        lines += ["```"]
    lines += ["", "## Files", ""] + [f"- `{path}`" for path in result.files]
    if result.not_done:
        lines += ["", "## Not done", ""] + [f"- {item}" for item in result.not_done]
    return "\n".join(lines) + "\n"


def margin(test: Any) -> float | None:
    """``tolerance / metric`` of a test (above 1 passes); None without both numbers or at metric 0."""
    metric, tolerance = getattr(test, "metric", None), getattr(test, "tolerance", None)
    if metric is None or tolerance is None or metric <= 0:
        return None
    return tolerance / metric


def _margin_text(test: Any) -> str:
    if getattr(test, "metric", None) == 0 and getattr(test, "tolerance", None) is not None:
        return "exact"
    value = margin(test)
    return "-" if value is None else f"{value:.3g}x"


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
