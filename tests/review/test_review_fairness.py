"""Whole reviews: the golden Llama and the MoE fixture pass with no finding, and so do files that
follow the contract in another layout (other class names, positional op arguments through an
imported alias, attention in a module-level helper)."""

from __future__ import annotations

import pytest

from onboardlm.review import RULES, Status, review_model_file

RENAMES = {
    "LlamaAttention": "LlamaTokenMixer",
    "LlamaRMSNorm": "LlamaScale",
    "LlamaMLP": "LlamaDense",
    "LlamaRotaryEmbedding": "LlamaPositions",
    "LlamaDecoderLayer": "LlamaBlock",
}
HELPER = """

def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: float):
    q, k = ad.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
    return ad.torch_attention(q, k, v, None, 0.0, True, scale, None, None, None, "bsnd")


@dataclass"""
ROPE_AND_ATTENTION = """        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")
"""


def test_golden_llama_and_its_tests_pass_with_no_finding(files) -> None:
    report = review_model_file(files.llama, files.llama_tests)
    assert report.passed, report.failures
    not_applicable = {r.rule.id for r in report.results if r.status is Status.NA}
    assert not_applicable == {"B3", "BA2", "D4", "D5", "H1"}  # no bundled config, no experts
    assert len(report.results) == len(RULES)


def test_moe_fixture_in_another_layout_passes_with_no_finding(files) -> None:
    report = review_model_file(files.moe, files.moe_tests)
    assert report.passed, report.failures
    assert {r.rule.id for r in report.results if r.status is Status.NA} == {"B3"}


@pytest.fixture
def relaid_llama(files, edit):
    """The golden Llama with other class names, an imported op alias, positional op arguments and
    RoPE + attention in a module-level helper; its test file follows the renames."""
    model_edits = [(old, new) for old, new in RENAMES.items()]
    model_edits += [
        (
            "import onboardlm.ops  # noqa",
            "from torch.ops import auto_deploy as ad\n\nimport onboardlm.ops  # noqa",
        ),
        ("\n\n@dataclass", HELPER),
        ("        ops = torch.ops.auto_deploy\n", "        ops = ad\n"),
        (ROPE_AND_ATTENTION, "        attn = _attend(q, k, v, cos, sin, self.scaling)\n"),
        (
            "torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)",
            "ad.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)",
        ),
    ]
    model = edit(files.llama, *model_edits, name="modeling_llama.py")
    test_edits = [(f"lean.{old}", f"lean.{new}") for old, new in RENAMES.items()]
    tests = edit(files.llama_tests, *test_edits, name="test_llama_relaid.py")
    return model.path, tests.path


def test_contract_following_file_in_another_layout_passes(relaid_llama) -> None:
    model, tests = relaid_llama
    report = review_model_file(model, tests)
    assert report.passed, report.failures


@pytest.mark.slow
def test_run_tests_runs_the_fixture_tests_and_they_pass(files) -> None:
    report = review_model_file(
        files.moe, files.moe_tests, run_tests=True, rule_ids={"G1", "G2", "G3", "G4", "G5"}
    )
    assert report.passed, report.failures
