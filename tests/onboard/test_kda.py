"""Kimi Delta Attention (gated delta rule with a per-channel decay): measured specs and their emitted
block classes against transformers' own modules (the independent reference), and the MLA features
its hybrids bring (NoPE in Kimi Linear, Ling 3's per-head output gate).

Expected spec values are facts of the transformers implementations: Kimi Linear's forget gate is a
low-rank ``f_a_proj -> f_b_proj`` with ``A_log`` shaped ``[1, 1, H, 1]`` and the softplus decay, its
output gate the low-rank ``g_a_proj -> g_b_proj``; Bailing-Hybrid (Ling 3) has one ``f_proj``,
``A_log [H]``, the bounded sigmoid decay behind ``kda_safe_gate`` with ``kda_lower_bound``, and one
``g_proj``; both gate the per-head norm with a sigmoid.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_kda import _gate_form, analyze_channel_delta
from onboardlm.onboard.analyze_mixers import build_mixer, relative_rmse
from onboardlm.onboard.analyze_moe import analyze_mla
from onboardlm.onboard.emit_mixers import emit_channel_delta
from onboardlm.onboard.spec_mixers import ChannelDeltaSpec
from onboardlm.onboard.spec_moe import MLASpec
from onboardlm.testing.reference import installed_model_type
from onboardlm.testing.tiny_config import tiny_config

TYPES = [t for t in ("kimi_linear", "bailing_hybrid") if installed_model_type(t)]
pytestmark = pytest.mark.skipif(not TYPES, reason="transformers has neither kimi_linear nor bailing_hybrid")


def _model(model_type: str, **overrides):
    config = tiny_config(CONFIG_MAPPING[model_type]())
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config).eval()


def _randomised(module: nn.Module) -> nn.Module:
    """Weights that make every part matter: rates near 1, biases reaching both softplus tails."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            scale = 0.5 if param.dim() < 2 or param.shape[-1] == 1 else param.shape[-1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return module


def _spec(model_type: str, **overrides) -> tuple[ChannelDeltaSpec, nn.Module, object]:
    config, model = _model(model_type, **overrides)
    mixer = model.model.layers[0].self_attn
    return analyze_channel_delta(config, mixer, "model.layers.0.self_attn", 0), mixer, config


def _block_error(spec: ChannelDeltaSpec, mixer: nn.Module, config) -> float:
    mixer = _randomised(mixer)
    lean = build_mixer(spec, config, 0)
    lean.load_state_dict(mixer.state_dict(), strict=True)  # module names equal the checkpoint keys
    x = torch.randn(2, 21, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return relative_rmse(lean(x), mixer(x))


@pytest.mark.skipif("kimi_linear" not in TYPES, reason="no kimi_linear in this transformers")
def test_kimi_linear_spec_is_measured_from_the_module() -> None:
    spec, _, _ = _spec("kimi_linear")
    assert (spec.q.name, spec.k.name, spec.v.name, spec.out.name) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert [linear.name for linear in spec.gate_chain] == ["f_a_proj", "f_b_proj"]
    assert spec.gate_chain[0].out_width == "config.linear_head_dim"  # the low-rank width
    assert [linear.name for linear in spec.out_gate] == ["g_a_proj", "g_b_proj"]
    assert spec.A_log_shape == ("1", "1", "self.num_heads", "1")
    assert (spec.bound_flag, spec.lower_bound, spec.decay_in_input_dtype) == (None, None, False)
    assert spec.norm_gate_act == "sigmoid" and spec.conv_activation == "config.hidden_act"
    assert (spec.num_heads, spec.head_k_dim, spec.kernel_size) == (
        "config.linear_num_heads",
        "config.linear_head_dim",
        "config.linear_conv_kernel_dim",
    )


@pytest.mark.skipif("bailing_hybrid" not in TYPES, reason="no bailing_hybrid in this transformers")
def test_bailing_hybrid_spec_has_the_bounded_decay_behind_its_flag() -> None:
    spec, _, _ = _spec("bailing_hybrid")
    assert [linear.name for linear in spec.gate_chain] == ["f_proj"]
    assert [linear.name for linear in spec.out_gate] == ["g_proj"]
    assert spec.A_log_shape == ("self.num_heads",)
    assert (spec.bound_flag, spec.lower_bound) == ("config.kda_safe_gate", "config.kda_lower_bound")
    assert spec.decay_in_input_dtype  # its forget gate casts the decay to the hidden states' dtype


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("kimi_linear", {}),
        ("kimi_linear", {"linear_num_heads": 2, "linear_head_dim": 24, "linear_conv_kernel_dim": 3}),
        ("bailing_hybrid", {}),
        ("bailing_hybrid", {"kda_safe_gate": False}),
        ("bailing_hybrid", {"kda_lower_bound": -2.0, "linear_num_heads": 2}),
    ],
)
def test_the_emitted_block_equals_transformers(model_type: str, overrides: dict) -> None:
    """Measured on the tiny config, built for a config with other widths / flags: still equal."""
    if model_type not in TYPES:
        pytest.skip(f"no {model_type} in this transformers")
    spec, _, _ = _spec(model_type)
    config, model = _model(model_type, **overrides)
    assert _block_error(spec, model.model.layers[0].self_attn, config) < 1e-5


class _Gate(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.f_proj = nn.Linear(8, 12, bias=False)
        self.dt_bias = nn.Parameter(torch.zeros(12))
        self.A_log = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f_proj(x).view(*x.shape[:2], 3, 4) + self.dt_bias.view(3, 4)
        rate = self.A_log.exp().view(3, 1)
        if self.form == "softplus":
            return -rate * nn.functional.softplus(f)
        if self.form == "bounded":
            return -3.0 * torch.sigmoid(rate * f)
        return -rate * torch.tanh(f).abs()


@pytest.mark.parametrize(("form", "expected"), [("softplus", "softplus"), ("bounded", -3.0), ("tanh", None)])
def test_the_forget_gate_form_is_measured_on_the_child(form: str, expected: object) -> None:
    gate = _Gate(form)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    assert _gate_form(gate, [("f_proj", gate.f_proj)], "A_log", "dt_bias", x) == expected


@pytest.mark.skipif("kimi_linear" not in TYPES, reason="no kimi_linear in this transformers")
def test_an_unknown_forget_gate_is_refused_by_path() -> None:
    config, model = _model("kimi_linear")
    mixer = model.model.layers[0].self_attn
    gate = mixer.forget_gate
    gate.forward = lambda h: (
        -torch.tanh(gate.f_b_proj(gate.f_a_proj(h))).view(*h.shape[:2], -1, gate.head_dim)
    )
    with pytest.raises(UnsupportedFeature, match=r"model.layers.0.self_attn.forget_gate .*neither"):
        analyze_channel_delta(config, mixer, "model.layers.0.self_attn", 0)


@pytest.mark.skipif(set(TYPES) != {"kimi_linear", "bailing_hybrid"}, reason="needs both hybrids")
def test_mla_of_a_hybrid_is_read_on_its_attention_layer() -> None:
    """Layer 0 of the tiny configs is the KDA layer: the MLA is read on layer 1. Ling 3's MLA gates
    each head's output (g_proj: hidden -> one value per head); Kimi Linear's has no such child."""
    config, model = _model("kimi_linear")
    assert analyze_mla(config, model) is None
    kimi = analyze_mla(config, model, 1)
    assert kimi is not None and kimi.head_gate is None and kimi.attr == "self_attn"
    config, model = _model("bailing_hybrid")
    assert analyze_mla(config, model, 1).head_gate == "g_proj"


@pytest.mark.parametrize("model_type", TYPES)
def test_the_bare_type_is_a_hybrid_of_kda_and_mla(model_type: str) -> None:
    """transformers' default config: KDA layers beside MLA (without RoPE in Kimi Linear: the model has
    no rotary embedding) and MoE layers."""
    spec = analyze(CONFIG_MAPPING[model_type]())
    assert spec.hybrid is not None
    assert isinstance(spec.hybrid.block("kda"), ChannelDeltaSpec)
    attention = spec.hybrid.block("attention")
    assert isinstance(attention, MLASpec)
    assert attention.nope == (model_type == "kimi_linear") == (spec.rope is None)


@pytest.mark.skipif("bailing_hybrid" not in TYPES, reason="no bailing_hybrid in this transformers")
def test_a_bounded_gate_without_a_switch_keeps_one_branch() -> None:
    """No bool field turns the bounded decay off: the file computes it alone (no dead softplus branch)."""
    spec, mixer, config = _spec("bailing_hybrid")
    always = dataclasses.replace(spec, bound_flag="True")
    source = emit_channel_delta(always, type(config).__name__)
    assert "softplus" not in source and "self.bounded" not in source
    assert _block_error(always, mixer, config) < 1e-5  # the tiny config has kda_safe_gate=True
