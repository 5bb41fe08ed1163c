"""C9: sharding hints on every linear and reshape of attention and MLP blocks (issue 8's reviewer rule)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onboardlm.review import Status, review_model_file

LLAMA = Path(__file__).parents[2] / "src" / "onboardlm" / "models" / "custom" / "modeling_llama.py"
CUSTOM = LLAMA.parent

GATE = 'gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")'
Q_VIEW = 'q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")'
CASES = {
    "nn.Linear called directly": (GATE, "gate = self.gate_proj(x)", "nn.Linear called directly"),
    "no tp_mode": (
        GATE,
        'gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, layer_type="mlp")',
        "no tp_mode",
    ),
    "opening projection rowwise": (GATE, GATE.replace("colwise", "rowwise"), "the wrong side"),
    "plain reshape": (
        Q_VIEW,
        "q = q.reshape(batch, seq_len, self.num_heads, self.head_dim)",
        "plain reshape()",
    ),
    "plain F.linear": (GATE, "gate = torch.nn.functional.linear(x, self.gate_proj.weight)", "plain linear"),
    "no all_reduce": (
        'return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")',
        "return down",
        "no all_reduce",
    ),
}


def _review_c9(path: Path):  # noqa: ANN202 - RuleResult
    return review_model_file(path, rule_ids=["C9"]).results[0]


@pytest.mark.parametrize("path", sorted(CUSTOM.glob("modeling_*.py")), ids=lambda p: p.stem)
def test_every_shipped_model_file_passes(path: Path) -> None:
    assert _review_c9(path).status is Status.PASS


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_edit_that_drops_a_hint_fails_at_its_line(case: str, tmp_path: Path) -> None:
    old, new, reason = CASES[case]
    text = LLAMA.read_text()
    assert old in text
    edited = tmp_path / "modeling_llama.py"
    edited.write_text(text.replace(old, new, 1))
    result = _review_c9(edited)
    assert result.status is Status.FAIL
    failures = [f for f in result.findings if f.status is Status.FAIL]
    assert any(reason in f.reason for f in failures), failures
    lines = edited.read_text().splitlines()
    if case != "no all_reduce":  # that finding points at the function, the others at the call
        assert all(new.split("(")[0].strip() in lines[f.line - 1] for f in failures)
