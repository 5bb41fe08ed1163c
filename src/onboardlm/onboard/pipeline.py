"""``onboardlm onboard``: the phases chained, from MODEL to a reviewed, tested, registered model.

resolve -> fit -> survey -> analyze -> generate -> testgen -> verify -> review -> register -> e2e
-> report.
Usage errors (unknown model, non-causal LM, existing output without ``force``) raise before anything
is written. After that, every phase records its outcome; a phase whose inputs failed is skipped with
the reason, and the report always says what was and was not done. Files are written into a staging
folder that replaces the output folder only at the end; the output folder is locked meanwhile, so a
second onboarding into it is refused (:func:`onboardlm.onboard.staging.claim_output`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from onboardlm.errors import OnboardlmError
from onboardlm.onboard import generate, testgen
from onboardlm.onboard import verify as verify_phase
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.e2e import run_e2e, uncached_stateful_ops
from onboardlm.onboard.fit import fit
from onboardlm.onboard.install import PackageTargets
from onboardlm.onboard.phases import PhaseListener, PhaseLog, PhaseOutcome
from onboardlm.onboard.register import RegisterOutcome, register
from onboardlm.onboard.report import report_data, write_report
from onboardlm.onboard.resolve import ResolveResult, resolve
from onboardlm.onboard.result import OnboardResult
from onboardlm.onboard.staging import DEFAULT_ROOT, claim_output, output_name
from onboardlm.onboard.survey import survey
from onboardlm.registry.atomic import atomic_write_text
from onboardlm.review import review_model_file

#: Longest a generated test file may run before verify gives up.
VERIFY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class OnboardOptions:
    out_dir: Path | None = None  # default: onboarded/<name>/
    force: bool = False
    offline: bool = True
    allow_remote_code: bool = False
    into_package: bool = False
    registry_dir: Path | None = None  # default: the shipped registry


def onboard(
    model: str, options: OnboardOptions | None = None, listener: PhaseListener | None = None
) -> OnboardResult:
    """Onboard ``model``; raises :class:`OnboardlmError` for usage errors, else returns the result."""
    options = options or OnboardOptions()
    start = time.perf_counter()
    log = PhaseLog(listener)
    if options.into_package:
        PackageTargets.checkout_root()  # a wheel install is told before any phase runs
    resolved: ResolveResult | None = log.run("resolve", lambda: _resolve(model, options), reraise=True)
    if resolved is None:  # not a usage error: a failure inside resolve, recorded by the log
        record = log.get("resolve")
        raise OnboardlmError(model, f"cannot be resolved: {record.summary if record else 'unknown error'}")
    out_dir = options.out_dir or DEFAULT_ROOT / output_name(resolved.name)
    targets = PackageTargets.for_model_type(resolved.model_type) if options.into_package else None
    if targets is not None:
        targets.check(options.force)

    with claim_output(out_dir, options.force) as staging:  # checks the destination first
        run = _Run(resolved, options, log, staging.path, out_dir)
        result = run.phases()
        result.source = model
        if targets is not None:
            if result.status == "pass":
                result.files += targets.install(run.model_text, run.package_test_text)
                result.files += _refresh_docs(result)
            else:
                result.not_done.append("--into-package: nothing written into the package, a phase failed")
        result.seconds = time.perf_counter() - start
        result.files += [out_dir / path.name for path in write_report(result, staging.path)]
        staging.publish()
    return result


def _resolve(model: str, options: OnboardOptions) -> PhaseOutcome:
    resolved = resolve(model, offline=options.offline, allow_remote_code=options.allow_remote_code)
    tokenizer = "tokenizer found" if resolved.has_tokenizer else "no tokenizer"
    summary = f"{resolved.config_class} ({resolved.model_type}); weights {resolved.weights}; {tokenizer}"
    summary += "".join(f"; {note}" for note in resolved.source.notes)
    return PhaseOutcome(resolved, summary)


class _Run:
    """One onboarding after resolve: the phases in order, writing into the staging folder."""

    def __init__(
        self, resolved: ResolveResult, options: OnboardOptions, log: PhaseLog, staging: Path, out_dir: Path
    ) -> None:
        self.resolved, self.options, self.log = resolved, options, log
        self.staging, self.out_dir = staging, out_dir
        self.module_name = f"modeling_{resolved.model_type.replace('-', '_')}"
        self.model_text = ""
        self.package_test_text = ""
        multimodal = resolved.source.multimodal
        self.result = OnboardResult(
            model=resolved.name,
            model_type=resolved.model_type,
            out_dir=out_dir,
            phases=log.records,
            text_decoder_of=multimodal.model_type if multimodal is not None else None,
        )

    def phases(self) -> OnboardResult:
        config, result, log = self.resolved.source.config, self.result, self.log
        result.fit = log.run("fit", lambda: _fit_outcome(config))
        result.coverage = log.run("survey", self._survey)
        result.spec = log.run("analyze", lambda: _analyze_outcome(config))
        model_file = log.run("generate", self._generate, needs=("analyze",))
        test_file = log.run("testgen", self._testgen, needs=("generate",))
        log.run("verify", lambda: self._verify(test_file), needs=("testgen",))
        log.run("review", lambda: self._review(model_file, test_file), needs=("testgen",))
        registered = log.run("register", self._register, needs=("verify", "review"))
        # an SSM / convolution / recurrence the runtime cannot cache yet: decoding would stop there
        uncached = uncached_stateful_ops(model_file) if model_file is not None else []
        if uncached:
            reason = f"e2e skipped: runtime has no cached state for {', '.join(uncached)} yet"
            log.skip("e2e", reason)
            result.not_done.append(reason)
        elif self.resolved.has_tokenizer:
            log.run("e2e", lambda: self._e2e(model_file, registered), needs=("register",))
        else:
            log.skip("e2e", "no tokenizer: a bare model_type has no text to run")
            result.not_done.append(
                "e2e: not run, the model has no tokenizer (random weights from a model_type)"
            )
        failed = next((record for record in log.records if record.status == "fail"), None)
        if result.text_decoder_of is not None and failed is not None:
            result.not_done.append(
                f"{result.model_type}, the text decoder of {result.text_decoder_of}, does not onboard yet: "
                f"{failed.name}: {failed.summary}"
            )
        return result

    # ----------------------------------------------------------------- phases
    def _survey(self) -> PhaseOutcome:
        coverage = survey(self.resolved.source.config, self.resolved.name, self.options.registry_dir)
        parts = [f"lean model: {coverage.custom_class}" if coverage.custom_class else "no lean model yet"]
        if coverage.registry_family:
            parts.append(f"registry family: {len(coverage.registry_family)} model(s)")
        if coverage.derived_from:
            parts.append(f"derived from {', '.join(coverage.derived_from)}")
        return PhaseOutcome(coverage, "; ".join(parts))

    def _generate(self) -> PhaseOutcome:
        self.model_text = generate.generate_model_file(self.result.spec)
        path = self._stage(f"{self.module_name}.py", self.model_text)
        return PhaseOutcome(path, f"{path.name}: {self.model_text.count(chr(10))} lines")

    def _testgen(self) -> PhaseOutcome:
        config, model_type = self.resolved.source.config, self.resolved.model_type
        lean = self.model_text
        text = testgen.generate_test_file(config, self.module_name, model_type, lean_source=lean)
        self.package_test_text = testgen.generate_test_file(
            config, f"onboardlm.models.custom.{self.module_name}", model_type, lean_source=lean
        )
        path = self._stage(f"test_{self.module_name.removeprefix('modeling_')}_modeling.py", text)
        return PhaseOutcome(path, f"{path.name}: {text.count('def test_')} tests")

    def _verify(self, test_file: Path) -> PhaseOutcome:
        report = verify_phase.verify(test_file, pythonpath=self.staging, timeout_s=VERIFY_TIMEOUT_S)
        self.result.tests = list(report.tests)
        failed = [t.name for t in report.tests if not t.passed]
        summary = f"{len(report.tests) - len(failed)}/{len(report.tests)} tests passed"
        if failed:
            summary += f"; failed: {', '.join(failed)}"
        elif not report.passed:
            summary += f"; {report.reason}"
        return PhaseOutcome(report, summary, passed=report.passed)

    def _review(self, model_file: Path, test_file: Path) -> PhaseOutcome:
        report = review_model_file(model_file, test_file, config=self.resolved.source.config)
        self.result.review = report  # kept on FAIL too: the report lists every finding
        verdict = "PASS" if report.passed else f"FAIL ({len(report.failures)} finding(s))"
        summary = f"REVIEW RESULT: {verdict}, {report.num_passed}/{len(report.applicable)} rules passed"
        return PhaseOutcome(report, summary, passed=report.passed)

    def _register(self) -> PhaseOutcome:
        outcome = register(
            self.resolved,
            self.result.fit,
            self.result.coverage,
            into_package=self.options.into_package,
            registry_dir=self.options.registry_dir,
            staging=self.staging,
        )
        self.result.files += [self.out_dir / p.relative_to(self.staging) for p in outcome.staged_files]
        self.result.files += outcome.package_files
        self.result.not_done += outcome.not_done
        self.result.registered_as = outcome.registered_as
        return PhaseOutcome(outcome, outcome.summary)

    def _e2e(self, model_file: Path, registered: RegisterOutcome) -> PhaseOutcome:
        outcome = run_e2e(
            self.resolved, self.result.fit, model_file, registered.registered_as, self.options.registry_dir
        )
        self.result.prompts = outcome.prompts
        self.result.not_done += outcome.not_done
        return PhaseOutcome(outcome, outcome.summary)

    def _stage(self, name: str, text: str) -> Path:
        path = self.staging / name
        atomic_write_text(path, text)
        self.result.files.append(self.out_dir / name)
        return path


def _refresh_docs(result: OnboardResult) -> list[Path]:
    """Phases 10-11 for ``--into-package``: record the model in ``docs/onboarded/``, regenerate
    ``docs/support-matrix.md`` and the cookbook; a failure here is noted, the onboarding stands."""
    from onboardlm.registry.checkout import CheckoutLayout
    from onboardlm.registry.docs import record_and_refresh

    try:
        layout = CheckoutLayout.at(PackageTargets.checkout_root())
        return record_and_refresh(report_data(result), layout).files
    except OnboardlmError as err:
        result.not_done.append(f"docs: support matrix and cookbook not refreshed: {err}")
        return []


def _analyze_outcome(config) -> PhaseOutcome:  # noqa: ANN001 - a transformers config
    spec = analyze(config)
    return PhaseOutcome(spec, "; ".join(spec.notes) or "architecture measured")


def _fit_outcome(config) -> PhaseOutcome:  # noqa: ANN001 - a transformers config
    report = fit(config)
    gib = report.bytes_per_dtype["bfloat16"] / 2**30
    device = report.run_device
    where = f"{device.name} has {device.free_bytes / 2**30:.1f} GiB free" if device else "no memory reading"
    verdict = "fits" if report.fits else "does not fit"
    summary = (
        f"{report.parameters / 1e6:.1f}M parameters, {gib:.2f} GiB in bf16, world size {report.world_size}; "
        f"{verdict} ({where})"
    )
    return PhaseOutcome(report, summary)
