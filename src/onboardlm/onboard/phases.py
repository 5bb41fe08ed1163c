"""Bookkeeping for a sequence of phases: timing, status, dependencies and the reason for a skip."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from onboardlm.errors import OnboardlmError

PhaseStatus = Literal["pass", "fail", "skipped"]


@dataclass(frozen=True)
class PhaseOutcome:
    """What a phase function returns: its data, a one-line summary and whether it passed."""

    data: Any
    summary: str
    passed: bool = True


@dataclass
class PhaseRecord:
    name: str
    status: PhaseStatus
    seconds: float
    summary: str
    data: Any = None


#: Called with (phase name, "start" | "end" | "abort", record or None) so a UI can show progress;
#: "abort" means the phase raised a usage error that the caller reports itself.
PhaseListener = Callable[[str, str, PhaseRecord | None], None]


@dataclass
class PhaseLog:
    """Runs phases in order; a phase whose inputs failed or were skipped is skipped with the reason."""

    listener: PhaseListener | None = None
    records: list[PhaseRecord] = field(default_factory=list)

    def run(
        self, name: str, fn: Callable[[], PhaseOutcome], needs: tuple[str, ...] = (), reraise: bool = False
    ) -> Any:
        """Run ``fn`` unless a phase in ``needs`` did not pass; return its data (None if not passed).

        With ``reraise``, a user error (:class:`OnboardlmError`) is recorded and then raised again.
        """
        blocked = [record.name for record in self.records if record.name in needs and record.status != "pass"]
        if blocked:
            self._add(PhaseRecord(name, "skipped", 0.0, f"needs {', '.join(blocked)}"))
            return None
        self._notify(name, "start", None)
        start = time.perf_counter()
        try:
            outcome = fn()
        except OnboardlmError as err:
            record = PhaseRecord(name, "fail", time.perf_counter() - start, str(err))
            if reraise:
                self._notify(name, "abort", None)
                raise
        except Exception as err:  # a bug in a phase must not lose the report of the others
            where = traceback.extract_tb(err.__traceback__)[-1]
            summary = f"internal error {type(err).__name__}: {err} (at {where.filename}:{where.lineno})"
            record = PhaseRecord(name, "fail", time.perf_counter() - start, summary)
        else:
            status: PhaseStatus = "pass" if outcome.passed else "fail"
            record = PhaseRecord(name, status, time.perf_counter() - start, outcome.summary, outcome.data)
        self._add(record)
        return record.data if record.status == "pass" else None

    def skip(self, name: str, reason: str) -> None:
        self._add(PhaseRecord(name, "skipped", 0.0, reason))

    def get(self, name: str) -> PhaseRecord | None:
        return next((record for record in self.records if record.name == name), None)

    @property
    def passed(self) -> bool:
        return all(record.status != "fail" for record in self.records)

    def _add(self, record: PhaseRecord) -> None:
        self.records.append(record)
        self._notify(record.name, "end", record)

    def _notify(self, name: str, event: str, record: PhaseRecord | None) -> None:
        if self.listener is not None:
            self.listener(name, event, record)
