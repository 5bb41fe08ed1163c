"""What an onboarding produced: every phase with its data, the tests, the files, what was not done."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onboardlm.models.multimodal import TOWERS_NOT_ONBOARDED
from onboardlm.onboard.fit import FitReport
from onboardlm.onboard.phases import PhaseRecord
from onboardlm.onboard.survey import Coverage


@dataclass(frozen=True)
class TestRecord:
    """One test of the generated test file: its level, its worst metric and the tolerance."""

    __test__ = False  # not a pytest class

    level: str  # block | layer | model | export
    name: str
    metric: float | None
    tolerance: float | None
    passed: bool


@dataclass(frozen=True)
class PromptRecord:
    index: int
    prompt: str
    output: str
    run: str  # e.g. "reduced (2 layers)" or "full"


@dataclass
class OnboardResult:
    model: str
    model_type: str
    out_dir: Path
    phases: list[PhaseRecord]
    files: list[Path] = field(default_factory=list)
    tests: list[TestRecord] = field(default_factory=list)
    prompts: list[PromptRecord] = field(default_factory=list)
    not_done: list[str] = field(default_factory=list)
    spec: Any = None
    fit: FitReport | None = None
    coverage: Coverage | None = None
    review: Any = None  # onboardlm.review.findings.ReviewReport
    seconds: float = 0.0
    text_decoder_of: str | None = None  # the multimodal model_type whose text decoder this is
    registered_as: str | None = None  # the registry entry's name (hub id), None when not registered
    source: str = ""  # the MODEL argument as given: hub id, folder, .gguf file or model_type

    @property
    def scope(self) -> str | None:
        """What a multimodal checkpoint's onboarding covers, in words; None for a text-only model."""
        if self.text_decoder_of is None:
            return None
        return f"text decoder of {self.text_decoder_of}; {TOWERS_NOT_ONBOARDED}"

    @property
    def status(self) -> Literal["pass", "fail"]:
        """pass only when every phase that ran passed."""
        return "pass" if all(record.status != "fail" for record in self.phases) else "fail"
