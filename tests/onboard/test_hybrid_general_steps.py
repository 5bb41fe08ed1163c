"""General residual steps of hybrid layers: blocks in parallel on one normed input, multipliers on a
block's input and output, sandwich norms and a residual multiplier, measured from recorded calls
(``analyze_hybrid._general_step``) and emitted by ``emit_hybrid``; GraniteMoeHybrid against
transformers (the independent reference)."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_hybrid import _layer_steps
from onboardlm.onboard.emit_hybrid import _general_step_lines, _scales
from onboardlm.onboard.generate import generate_model_file
from onboardlm.onboard.spec_hybrid import BranchSpec, LayerKindSpec, StepSpec
from onboardlm.testing.reference import requires_reference
from onboardlm.testing.tiny_config import tiny_config


class _Norm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _MLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class _Layer(nn.Module):
    """Falcon-H1's parallel step (two blocks on one normed input, input and output multipliers),
    then LFM3's sandwich step with Granite's residual multiplier."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.input_norm, self.ff_norm, self.post_ff_norm = _Norm(width), _Norm(width), _Norm(width)
        self.a, self.b, self.c = _MLP(width), _MLP(width), _MLP(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(h)
        h = h + self.a(x * 1.5) * 0.5 + self.b(x) * 2.0
        return h + self.post_ff_norm(self.c(self.ff_norm(h))) * 0.7


class _Toy(nn.Module):
    def __init__(self, width: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, width)
        self.layers = nn.ModuleList(_Layer(width) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


SCALES = [
    ("config.residual_multiplier", 0.7),
    ("config.attention_in_multiplier", 1.5),
    ("config.attention_out_multiplier", 0.5),
    ("config.ssm_out_multiplier", 2.0),
]


def test_parallel_blocks_sandwich_norm_and_multipliers_are_measured() -> None:
    torch.manual_seed(0)
    model = _Toy().eval()
    steps = _layer_steps("layers", model.layers, model, SCALES)
    expected = (
        StepSpec(
            "a",
            "mlp",
            "input_norm",
            in_scale="config.attention_in_multiplier",
            out_scale="config.attention_out_multiplier",
            parallel=(BranchSpec("b", "mlp", None, "config.ssm_out_multiplier"),),
        ),
        StepSpec("c", "mlp", "ff_norm", post_norm="post_ff_norm", scale="config.residual_multiplier"),
    )
    assert steps == [expected, expected]


def test_a_multiplier_no_config_value_gives_is_not_guessed() -> None:
    torch.manual_seed(0)
    model = _Toy(layers=1).eval()
    try:
        _layer_steps("layers", model.layers, model, SCALES[1:])  # no residual multiplier field
    except Exception as err:  # noqa: BLE001 - the refusal names the layer
        assert "layers.0" in str(err)
    else:
        raise AssertionError("a residual multiplier of no config field was accepted")


def test_general_step_lines() -> None:
    step = StepSpec(
        "mamba",
        "mamba2",
        "input_layernorm",
        out_scale="config.ssm_out_multiplier",
        parallel=(
            BranchSpec(
                "self_attn", "attention", "config.attention_in_multiplier", "config.attention_out_multiplier"
            ),
        ),
        scale="config.residual_multiplier",
    )
    assert _general_step_lines(step, positional=True) == [
        "normed = self.input_layernorm(hidden_states)",
        "hidden_states = hidden_states + (self.mamba(normed) * self.ssm_out_multiplier"
        " + self.self_attn(normed * self.attention_in_multiplier, position_embeddings)"
        " * self.attention_out_multiplier) * self.residual_multiplier",
    ]
    sandwich = StepSpec("conv", "short_conv", "operator_norm", post_norm="post_operator_norm")
    assert _general_step_lines(sandwich, positional=True) == [
        "hidden_states = hidden_states + self.post_operator_norm(self.conv(self.operator_norm(hidden_states)))"
    ]
    kind = LayerKindSpec("x", "Layer", (step, sandwich))
    assert _scales(kind) == [
        "config.residual_multiplier",
        "config.ssm_out_multiplier",
        "config.attention_in_multiplier",
        "config.attention_out_multiplier",
    ]


@cache
def _granite():
    return analyze(AutoConfig.for_model("granitemoehybrid"))


def test_granitemoehybrid_steps() -> None:
    hybrid = _granite().hybrid
    assert hybrid is not None
    (kind,) = hybrid.kinds
    mixer, feed_forward = kind.steps
    assert (mixer.attr, mixer.norm, mixer.scale) == ("mamba", "input_layernorm", "config.residual_multiplier")
    assert (feed_forward.attr, feed_forward.kind, feed_forward.norm) == (
        "block_sparse_moe",
        "moe",
        "post_attention_layernorm",
    )
    assert feed_forward.parallel == (BranchSpec("shared_mlp", "mlp"),)
    assert feed_forward.scale == "config.residual_multiplier"
    assert hybrid.block("moe").dense_class is None  # the shared MLP is no alternative to the MoE


def test_granitemoehybrid_lean_layer_equals_transformers() -> None:
    namespace: dict = {}
    exec(compile(generate_model_file(_granite()), "modeling_granitemoehybrid.py", "exec"), namespace)  # noqa: S102
    config = tiny_config(AutoConfig.for_model("granitemoehybrid"))
    config.residual_multiplier = 1.3  # telling: a dropped or misplaced multiplier shows
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    layer = reference.model.layers[0]
    lean = namespace["GraniteMoeHybridDecoderLayer"](config, 0).eval()
    lean.load_state_dict(layer.state_dict(), strict=True)
    with torch.no_grad():
        for param in layer.parameters():  # norms at init are all ones: make them telling
            if param.dim() == 1:
                param.add_(torch.rand_like(param))
        lean.load_state_dict(layer.state_dict(), strict=True)
        x = torch.randn(2, 7, config.hidden_size)
        expected = layer(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        actual = lean(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@cache
def _lfm3():
    return analyze(AutoConfig.for_model("lfm3"))


@requires_reference("lfm3")
def test_lfm3_sandwich_norms_switched_by_their_flag() -> None:
    hybrid = _lfm3().hybrid
    assert hybrid is not None
    steps = {kind.name: kind.steps for kind in hybrid.kinds}
    assert set(steps) == {"short_conv+mlp", "attention+mlp"}
    for name, (mixer, feed_forward) in steps.items():
        assert (mixer.norm, mixer.post_norm) == ("operator_norm", "post_operator_norm"), name
        assert (feed_forward.norm, feed_forward.post_norm) == ("ffn_norm", "post_ffn_norm"), name
        assert {mixer.post_norm_flag, feed_forward.post_norm_flag} == {"config.use_sandwich_norm"}
        assert not (mixer.parallel or mixer.scale or feed_forward.scale)
    # the attention template always builds the head gate: the layers refuse configs without it
    assert hybrid.refused == (("use_attention_gate", False),)


@requires_reference("lfm3")
def test_lfm3_lean_layers_equal_transformers_without_sandwich_norms() -> None:
    namespace: dict = {}
    exec(compile(generate_model_file(_lfm3()), "modeling_lfm3.py", "exec"), namespace)  # noqa: S102
    config = tiny_config(AutoConfig.for_model("lfm3"))
    config.use_sandwich_norm = False
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    layer = reference.model.layers[0]  # a conv layer: no RoPE tables
    lean = namespace["Lfm3DecoderLayer"](config, 0).eval()
    assert isinstance(lean.post_operator_norm, nn.Identity)
    lean.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 7, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(lean(x, None), layer(x), atol=1e-5, rtol=1e-5)
    config.use_attention_gate = False
    try:
        namespace["Lfm3DecoderLayer"](config, 1)
    except NotImplementedError as err:
        assert "use_attention_gate" in str(err)
    else:
        raise AssertionError("a config without the attention gate was built")
