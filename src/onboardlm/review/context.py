"""Everything a rule may look at, parsed once: the model file, its test file and the review options."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import PretrainedConfig

from onboardlm.review.loading import LoadCheck, check_strict_load, read_checkpoint_keys
from onboardlm.review.model_index import ModelIndex
from onboardlm.review.pytest_run import TestRun, run_pytest
from onboardlm.review.source import ReviewInputError, SourceFile
from onboardlm.review.testfile_index import TestIndex


@dataclass
class ReviewContext:
    """The parsed inputs of one review; dynamic results (load, test run) are computed on first use."""

    model: ModelIndex
    tests: TestIndex | None
    reference: str | None = None
    checkpoint_keys: frozenset[str] | None = None
    run_tests: bool = False
    config: PretrainedConfig | None = None  # the config being onboarded (BA1 builds its tiny copy)

    @classmethod
    def load(
        cls,
        model_file: Path,
        test_file: Path | None = None,
        reference: str | None = None,
        checkpoint_keys: Path | None = None,
        run_tests: bool = False,
        config: PretrainedConfig | None = None,
    ) -> ReviewContext:
        """Parse and validate the inputs; :class:`ReviewInputError` when one is unusable."""
        if reference is not None and checkpoint_keys is not None:
            raise ReviewInputError("--reference/--checkpoint-keys", "give one of them, not both")
        model = ModelIndex(SourceFile.parse(model_file, "model file"))
        if model.causal_lm is None:
            raise ReviewInputError(str(model_file), "model file has no *ForCausalLM (or *LMHeadModel) class")
        tests = TestIndex(SourceFile.parse(test_file, "test file"), model) if test_file is not None else None
        if reference is not None:
            _check_model_type(reference)
        keys = read_checkpoint_keys(checkpoint_keys) if checkpoint_keys is not None else None
        return cls(model, tests, reference, keys, run_tests, config)

    @property
    def src(self) -> SourceFile:
        return self.model.src

    @cached_property
    def strict_load(self) -> LoadCheck:
        """BA1's dynamic check: build the model on a tiny config and load the reference strictly."""
        return check_strict_load(self.model, self.reference, self.checkpoint_keys, self.config)

    @cached_property
    def test_run(self) -> TestRun | None:
        """The outcome of running the test file with pytest (``--run-tests`` only)."""
        if not self.run_tests or self.tests is None:
            return None
        return run_pytest(self.tests.src.path)


def _check_model_type(model_type: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ReviewInputError(model_type, "--reference is not a model_type known to transformers")
