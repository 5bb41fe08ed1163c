"""OLMo Hybrid: post-norm residual steps in a hybrid stack and a doubled delta-rule write strength,
measured from transformers' modules (the independent reference)."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_mixers import build_mixer, relative_rmse
from onboardlm.testing import transfer_weights
from onboardlm.testing.reference import requires_reference
from onboardlm.testing.tiny_config import tiny_config


@cache
def _spec():
    return analyze(CONFIG_MAPPING["olmo_hybrid"]())


@requires_reference("olmo_hybrid")
def test_post_norm_steps_and_write_scale_are_measured() -> None:
    spec = _spec()
    assert spec.hybrid is not None
    steps = {kind.name: kind.steps for kind in spec.hybrid.kinds}
    attention = next(s for name, s in steps.items() if name.startswith("attention"))
    linear = next(s for name, s in steps.items() if name.startswith("gated_delta"))
    assert [(s.attr, s.norm, s.post) for s in attention] == [
        ("self_attn", "post_attention_layernorm", True),
        ("mlp", "post_feedforward_layernorm", True),
    ]
    assert [(s.attr, s.norm, s.post) for s in linear] == [
        ("linear_attn", "input_layernorm", False),
        ("mlp", "post_attention_layernorm", False),
    ]
    assert spec.hybrid.block("gated_delta").write_scale == "2.0 if config.linear_allow_neg_eigval else 1.0"


@requires_reference("olmo_hybrid")
@pytest.mark.parametrize("neg_eigval", [True, False])
def test_lean_mixer_follows_the_write_strength_flag(neg_eigval: bool) -> None:
    """The block emitted for the measured spec equals transformers' OlmoHybridGatedDeltaNet both ways."""
    spec = _spec().hybrid.block("gated_delta")
    config = tiny_config(CONFIG_MAPPING["olmo_hybrid"]())
    config.linear_allow_neg_eigval = neg_eigval
    model = AutoModelForCausalLM.from_config(config).eval()
    index = config.layer_types.index("linear_attention")
    reference = model.model.layers[index].linear_attn
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.2 * torch.randn_like(param))
    lean = build_mixer(spec, config, index)
    transfer_weights(reference, lean)
    x = torch.randn(2, 21, config.hidden_size)
    with torch.no_grad():
        expected = reference(x)
        actual = lean(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert relative_rmse(actual, expected) < 1e-5
