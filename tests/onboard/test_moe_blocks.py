"""MoE building blocks: measured from transformers' own MoE blocks, emitted, loaded and compared.

Each architecture's HF model is built on ``tiny_config``; its first MoE block is the reference. The
emitted lean block loads the HF block's state dict (packed experts, strict, through the block's load
hook) and must match on random tokens (RMSE ratio <= 0.02), also when most experts get no token.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from torch.export import Dim
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.export import torch_export_to_gm
from onboardlm.models.config_completion import complete_default_config
from onboardlm.onboard.analyze_moe import analyze_moe
from onboardlm.onboard.emit_moe import block_imports, emit_moe, expert_class_name, moe_constructor
from onboardlm.onboard.spec_moe import MoESpec
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights
from onboardlm.testing.reference import requires_reference

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss")
MOE_TOL = 0.02


def _hf_model(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config(AutoConfig.for_model(model_type))
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # weights large enough that routing and experts matter
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=MOE_TYPES)
def case(request: pytest.FixtureRequest) -> SimpleNamespace:
    """HF model, its config, the measured spec, its first MoE block and the lean block built from the spec."""
    model = _hf_model(request.param)
    spec = analyze_moe(model.config, model)
    assert spec is not None
    namespace = _exec_blocks(spec)
    lean = namespace[spec.class_name](model.config).eval()
    hf_block = model.model.layers[spec.moe_layers[0]].mlp
    return SimpleNamespace(model=model, spec=spec, hf=hf_block, lean=lean, namespace=namespace)


def _exec_blocks(spec: MoESpec) -> dict[str, object]:
    source = "\n".join(
        [
            "import torch",
            "from torch import nn",
            f"from transformers import {spec.config_class}",
            "from transformers.activations import ACT2FN",
            "import onboardlm.ops",
            *block_imports(spec),
            "",
            emit_moe(spec),
        ]
    )
    namespace: dict[str, object] = {}
    exec(compile(source, f"<emitted {spec.class_name}>", "exec"), namespace)
    return namespace


def _hf_output(hf_block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = hf_block(x)
    return out[0] if isinstance(out, tuple) else out  # GptOssMLP also returns router scores


@torch.no_grad()
def test_block_matches_hf_through_strict_load(case: SimpleNamespace) -> None:
    report = transfer_weights(case.hf, case.lean)
    assert report.num_tensors == len(case.hf.state_dict())
    x = torch.randn(2, 7, case.model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    assert_rmse_close(case.lean(x), _hf_output(case.hf, x), MOE_TOL, msg=case.spec.class_name)


@torch.no_grad()
def test_block_matches_hf_when_most_experts_get_no_token(case: SimpleNamespace) -> None:
    transfer_weights(case.hf, case.lean)
    x = torch.randn(1, 1, case.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    router = getattr(case.hf, case.spec.router.attr)
    chosen = router(x.reshape(1, -1))[2].unique()
    assert len(chosen) < case.spec.experts.num_experts, "the case must leave experts without tokens"
    assert_rmse_close(case.lean(x), _hf_output(case.hf, x), MOE_TOL, msg=case.spec.class_name)


@torch.no_grad()
def test_hook_unpacks_each_expert_from_the_packed_hf_tensors(case: SimpleNamespace) -> None:
    """Per-expert weights equal the slices of HF's packed tensors that HF's expert code uses."""
    transfer_weights(case.hf, case.lean)
    experts, packed = case.hf.experts, case.spec.experts.packed
    hidden = case.model.config.hidden_size
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(3))
    for e, expert in enumerate(case.lean.experts):
        gate_up = experts.gate_up_proj[e]
        gate_up_out = x @ gate_up if packed.transposed else x @ gate_up.T  # HF: [.., 2I] projections
        if experts.has_bias:
            gate_up_out = gate_up_out + experts.gate_up_proj_bias[e]
        gate_hf, up_hf = (
            gate_up_out.chunk(2, dim=-1)
            if packed.concatenated
            else (gate_up_out[:, ::2], gate_up_out[:, 1::2])
        )
        torch.testing.assert_close(expert.gate_proj(x), gate_hf)
        torch.testing.assert_close(expert.up_proj(x), up_hf)
        inner = torch.randn(3, expert.down_proj.in_features, generator=torch.Generator().manual_seed(e))
        down = experts.down_proj[e]
        down_hf = inner @ down if packed.transposed else inner @ down.T
        if experts.has_bias:
            down_hf = down_hf + experts.down_proj_bias[e]
        torch.testing.assert_close(expert.down_proj(inner), down_hf)


@torch.no_grad()
def test_per_expert_checkpoint_loads_unchanged(case: SimpleNamespace) -> None:
    transfer_weights(case.hf, case.lean)
    fresh = case.namespace[case.spec.class_name](case.model.config)
    transfer_weights(case.lean, fresh)  # keys already per expert: the hook leaves them alone
    for key, value in case.lean.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_experts_are_a_module_list_of_gate_up_down_modules(case: SimpleNamespace) -> None:
    assert isinstance(case.lean.experts, nn.ModuleList)
    assert len(case.lean.experts) == case.spec.experts.num_experts
    first = case.lean.experts[0]
    assert type(first).__name__ == expert_class_name(case.spec)
    assert {name for name, _ in first.named_children()} == {"gate_proj", "up_proj", "down_proj"}
    router = getattr(case.lean, case.spec.router.attr)
    assert type(router).__name__ == type(getattr(case.hf, case.spec.router.attr)).__name__


def test_deepseek_router_is_grouped_sigmoid_with_correction_and_shared_experts() -> None:
    model = _hf_model("deepseek_v3")
    spec = analyze_moe(model.config, model)
    assert (spec.router.scoring, spec.router.grouped, spec.router.has_correction_bias) == (
        "sigmoid",
        True,
        True,
    )
    assert spec.router.scaling_field == "routed_scaling_factor"
    assert spec.shared.intermediate_expr == "config.moe_intermediate_size * config.n_shared_experts"
    assert spec.layer_condition == "layer_idx >= config.first_k_dense_replace"
    assert spec.moe_layers == tuple(range(model.config.first_k_dense_replace, model.config.num_hidden_layers))


def test_gpt_oss_experts_are_interleaved_transposed_biased_clamped_swiglu() -> None:
    model = _hf_model("gpt_oss")
    spec = analyze_moe(model.config, model)
    packed = spec.experts.packed
    assert (packed.concatenated, packed.transposed) == (False, True)
    assert (packed.gate_up_bias_key, packed.down_bias_key) == ("gate_up_proj_bias", "down_proj_bias")
    assert spec.experts.activation == "clamped_swiglu"
    # The config field where the release has one (5.25), with the value older releases (5.17) hard-code
    # in the module as its default; the literal where the config has no such field.
    if hasattr(model.config, "swiglu_alpha"):
        expected = ("getattr(config, 'swiglu_alpha', 1.702)", "getattr(config, 'swiglu_limit', 7.0)")
    else:
        expected = ("1.702", "7.0")
    assert (spec.experts.swiglu_alpha_expr, spec.experts.swiglu_limit_expr) == expected


def test_qwen2_moe_shared_expert_is_sigmoid_gated_and_sparse_step_rule_is_measured() -> None:
    model = _hf_model("qwen2_moe")
    spec = analyze_moe(model.config, model)
    assert spec.shared.gate_attr == "shared_expert_gate"
    assert spec.shared.intermediate_expr == "config.shared_expert_intermediate_size"
    assert "decoder_sparse_step" in spec.layer_condition
    assert spec.router.norm_field == "norm_topk_prob"


def test_dense_model_has_no_moe_spec() -> None:
    model = _hf_model("llama")
    assert analyze_moe(model.config, model) is None


def test_unsupported_activation_is_refused_by_name() -> None:
    model = _hf_model("mixtral")
    spec = analyze_moe(model.config, model)
    bad = dataclasses.replace(spec, experts=dataclasses.replace(spec.experts, activation="gelu_pytorch_tanh"))
    with pytest.raises(UnsupportedFeature, match="gelu_pytorch_tanh"):
        emit_moe(bad)


@pytest.mark.parametrize("case", ["deepseek_v3", "gpt_oss"], indirect=True)  # torch_moe and dense dispatch
@torch.no_grad()
def test_exported_block_runs_new_shapes_and_loads_packed_experts(case: SimpleNamespace) -> None:
    """torch.export with dynamic batch and sequence; the graph takes HF's packed state dict (hook carried)."""
    hidden = case.model.config.hidden_size
    gm = torch_export_to_gm(
        case.namespace[case.spec.class_name](case.model.config),
        (torch.randn(2, 5, hidden),),
        dynamic_shapes=({0: Dim("batch", max=8), 1: Dim("seq", max=64)},),
    )
    transfer_weights(case.hf, gm)
    x = torch.randn(3, 11, hidden, generator=torch.Generator().manual_seed(4))
    assert_rmse_close(gm(x), _hf_output(case.hf, x), MOE_TOL, msg=case.spec.class_name)


def test_dense_mlp_class_is_measured_even_when_the_default_config_has_no_dense_layer() -> None:
    """Qwen3-MoE's default config is all MoE; a probe layer with ``mlp_only_layers=[0]`` names the dense MLP."""
    model = _hf_model("qwen3_moe")
    spec = analyze_moe(model.config, model)
    assert spec.moe_layers == tuple(range(model.config.num_hidden_layers))
    assert spec.dense_class == "Qwen3MoeMLP"
    assert (
        moe_constructor(spec)
        == f"Qwen3MoeSparseMoeBlock(config) if {spec.layer_condition} else Qwen3MoeMLP(config)"
    )


@torch.no_grad()
def test_emitted_dense_mlp_matches_the_hf_dense_layer() -> None:
    """DeepSeek's dense first layer and its shared experts share one emitted gated-MLP class."""
    model = _hf_model("deepseek_v3")
    spec = analyze_moe(model.config, model)
    assert spec.dense_class == spec.shared.class_name == "DeepseekV3MLP"
    hf_mlp = model.model.layers[0].mlp  # layer 0 is dense (first_k_dense_replace)
    lean = _exec_blocks(spec)[spec.dense_class](model.config)
    transfer_weights(hf_mlp, lean)
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(lean(x), hf_mlp(x), rtol=1e-3, atol=1e-3)


def test_mixtral_and_gpt_oss_have_no_dense_layers() -> None:
    for model_type in ("mixtral", "gpt_oss"):
        model = _hf_model(model_type)
        spec = analyze_moe(model.config, model)
        assert (spec.layer_condition, spec.dense_class) == ("True", None)
        assert moe_constructor(spec) == f"{spec.class_name}(config)"


@torch.no_grad()
def test_block_matches_hf_in_bfloat16(case: SimpleNamespace) -> None:
    transfer_weights(case.hf, case.lean)
    hf, lean = (copy.deepcopy(m).to(torch.bfloat16) for m in (case.hf, case.lean))
    x = torch.randn(2, 16, case.model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    actual = lean(x.bfloat16())
    assert actual.dtype == torch.bfloat16
    assert_rmse_close(actual, _hf_output(hf, x.bfloat16()), MOE_TOL, msg=case.spec.class_name)


def test_experts_with_unknown_math_are_refused_with_their_path() -> None:
    """A packed-experts module whose output no known layout reproduces is not guessed at."""
    model = _hf_model("mixtral")
    for layer in model.model.layers:
        experts = layer.mlp.experts
        experts.forward = lambda *args, _forward=experts.forward: 2 * _forward(*args)
    with pytest.raises(UnsupportedFeature, match=r"model\.layers\.0\.mlp\.experts.*no known layout"):
        analyze_moe(model.config, model)


# --------------------------------------------------------------------------------------------------
# Placement, field lookup and router variants measured on further transformers families
# --------------------------------------------------------------------------------------------------


def _emitted_block_matches(model: nn.Module, spec: MoESpec) -> None:
    """The emitted block, loaded from the HF block's state dict, matches it (fp32, RMSE ratio)."""
    hf_block = model.model.layers[spec.moe_layers[0]].mlp
    lean = _exec_blocks(spec)[spec.class_name](model.config).eval()
    transfer_weights(hf_block, lean)
    x = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    assert_rmse_close(lean(x), _hf_output(hf_block, x), 1e-5, msg=spec.class_name)


@pytest.mark.parametrize(
    ("model_type", "condition"),
    [
        ("glm4_moe_lite", "config.mlp_layer_types[layer_idx] == 'sparse'"),
        (
            "ernie4_5_moe",
            "(layer_idx + 1) % config.moe_layer_interval == 0 and layer_idx >= config.moe_layer_start_index "
            "and (layer_idx <= config.moe_layer_end_index)",
        ),
    ],
)
def test_layer_condition_is_the_hf_layers_own_branch(model_type: str, condition: str) -> None:
    """Placement read from the decoder layer's ``__init__`` and checked against the built layers."""
    from onboardlm.onboard.analyze_moe import _decoder_layers, _layer_condition

    model = _hf_model(model_type)
    layers = _decoder_layers(model)
    moe = tuple(i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts"))
    block = layers[moe[0]].mlp
    found = _layer_condition(model.config, moe, len(layers), "p", layers[moe[0]], "mlp", type(block).__name__)
    assert found == condition
    # the expression agrees with transformers on a config that moves the MoE layers
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 4
    if hasattr(config, "mlp_layer_types"):
        config.mlp_layer_types = ["sparse", "dense", "dense", "sparse"]
    else:
        config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval = 1, 3, 2
    built = type(model)(config)
    expected = [i for i, layer in enumerate(built.model.layers) if hasattr(layer.mlp, "experts")]
    assert [i for i in range(4) if eval(found, {}, {"config": config, "layer_idx": i})] == expected


def test_mlp_layer_types_block_is_emitted_and_matches() -> None:
    model = _hf_model("glm4_moe_lite")
    spec = analyze_moe(model.config, model)
    assert spec.moe_layers == (1,) and spec.dense_class == "Glm4MoeLiteMLP"
    assert moe_constructor(spec).startswith("Glm4MoeLiteMoE(config) if config.mlp_layer_types[layer_idx]")
    _emitted_block_matches(model, spec)


def test_expert_count_and_shared_width_fields_are_found_by_rebuilding() -> None:
    """Aria names its expert count ``moe_num_experts``; its shared width is intermediate_size x count."""
    model = _hf_model("aria_text")
    if not hasattr(model.model.layers[0].mlp.experts, "gate_up_proj"):
        pytest.skip(
            f"transformers {transformers.__version__} keeps Aria's experts in fc1/fc2 submodules "
            "(onboarding refuses that layout in one line)"
        )
    spec = analyze_moe(model.config, model)
    assert spec.experts.num_experts_field == "moe_num_experts"
    assert spec.shared.intermediate_expr == "config.intermediate_size * config.moe_num_shared_experts"
    exaone = _hf_model("exaone_moe")
    assert analyze_moe(exaone.config, exaone).shared.intermediate_expr == (
        "config.moe_intermediate_size * config.num_shared_experts"
    )


@pytest.mark.parametrize(
    ("model_type", "owner", "choice_on", "scaling"),
    [
        ("minimax_m2", "block", "scores", None),  # bias on the block, handed to the router
        ("hy_v3", "block", "scores", "router_scaling_factor"),
        pytest.param("flint", None, "scores", None, marks=requires_reference("flint")),  # plain top-k
        # chosen on logits + bias
        pytest.param("kolibri1", "router", "logits", None, marks=requires_reference("kolibri1")),
    ],
)
def test_ungrouped_sigmoid_routers_are_measured_and_emitted(
    model_type: str, owner: str | None, choice_on: str, scaling: str | None
) -> None:
    model = _hf_model(model_type)
    spec = analyze_moe(model.config, model)
    router = spec.router
    assert (router.scoring, router.grouped) == ("sigmoid", False)
    assert (router.correction_bias, router.choice_on, router.scaling_field) == (owner, choice_on, scaling)
    _emitted_block_matches(model, spec)


def _hf_model_with(model_type: str, **fields: object) -> nn.Module:
    """``_hf_model`` on a tiny config with ``fields`` set."""
    torch.manual_seed(0)
    config = tiny_config(AutoConfig.for_model(model_type))
    for name, value in fields.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model


def test_router_holding_its_linear_with_the_block_bias_and_scale_of_another_name() -> None:
    """AFMoE: ``router.gate`` (a bias-free linear) holds the weight, the block's ``expert_bias`` is the
    correction bias handed to the router, ``config.route_scale`` (found by rebuilding the router with
    each float field changed) scales the weights; measured on a scale other than 1."""
    model = _hf_model_with("afmoe", route_scale=2.5)
    spec = analyze_moe(model.config, model)
    router = spec.router
    assert (router.linear_attr, router.correction_bias, router.correction_name) == (
        "gate",
        "block",
        "expert_bias",
    )
    assert (router.scoring, router.scaling_field, router.norm_topk_prob) == ("sigmoid", "route_scale", True)
    assert spec.shared.attr == "shared_experts"
    _emitted_block_matches(model, spec)


def test_zero_initialised_router_is_probed_on_random_weights() -> None:
    """transformers zero-initialises AFMoE's router (every expert ties): the probe fills it at random
    and puts the zeros back."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(AutoConfig.for_model("afmoe"))).eval()
    spec = analyze_moe(model.config, model)
    assert (spec.router.scoring, spec.router.scaling_field) == ("sigmoid", "route_scale")
    assert not model.model.layers[spec.moe_layers[0]].mlp.router.gate.weight.any()


def test_softmax_router_holding_its_linear_and_an_unnamed_shared_mlp() -> None:
    """HunYuan-MoE: ``gate.wg`` holds the router weight; ``shared_mlp``, the one gated MLP child besides
    router and experts, is the shared expert, of the experts' width ``config.intermediate_size``."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("hunyuan_v1_moe")
    complete_default_config(config)  # head_dim, as onboarding completes a bare model_type
    model = AutoModelForCausalLM.from_config(tiny_config(config), attn_implementation="eager").eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    spec = analyze_moe(model.config, model)
    assert (spec.router.linear_attr, spec.router.scoring, spec.router.correction_bias) == (
        "wg",
        "softmax",
        None,
    )
    assert (spec.shared.attr, spec.shared.intermediate_expr) == ("shared_mlp", "config.intermediate_size")
    _emitted_block_matches(model, spec)


def test_sparse_mixer_router_is_measured_with_its_jitter_field_and_emitted() -> None:
    """PhiMoE's sparse mixer (inference path): two experts, each weighted by a softmax over the experts
    within ``2 * config.router_jitter_noise`` of it; measured again on a wide jitter (more experts kept)."""
    from onboardlm.onboard.analyze_moe import sparsemixer

    for jitter in (0.01, 0.4):
        model = _hf_model_with("phimoe", router_jitter_noise=jitter)
        spec = analyze_moe(model.config, model)
        assert (spec.router.scoring, spec.router.jitter_field) == ("sparsemixer", "router_jitter_noise")
        _emitted_block_matches(model, spec)
    logits = torch.tensor([[4.0, 3.9, 1.0, -2.0]])
    weights, ids = sparsemixer(logits, 0.4)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights[0, 0], torch.softmax(logits[0, :3], dim=-1)[0])  # -2 is out of reach


@requires_reference("beam")
def test_routed_scaling_applied_by_the_block_is_measured_and_emitted() -> None:
    """Beam's block (not its router) multiplies the experts' output by ``config.routed_scaling_factor``:
    measured as the ratio of the block's output to its experts' on the router's choice, the field
    confirmed by rebuilding the block with another value."""
    model = _hf_model("beam")
    spec = analyze_moe(model.config, model)
    assert (spec.scaling_field, spec.router.scaling_field, spec.router.grouped) == (
        "routed_scaling_factor",
        None,
        True,
    )
    assert "self.routed_scaling_factor = config.routed_scaling_factor" in emit_moe(spec)
    _emitted_block_matches(model, spec)
    assert analyze_moe(*(lambda m: (m.config, m))(_hf_model("deepseek_v3"))).scaling_field is None


def test_fused_clamped_swiglu_mlps_and_bias_free_clamped_experts_behind_a_sigmoid_router() -> None:
    """MiniMax-M3: the shared expert and the dense layers' MLP are fused clamped SwiGLUs
    (``gate_up_proj`` halves, ``config.swiglu_alpha``/``swiglu_limit``); the bias-free clamped-SwiGLU
    experts run in torch_moe_dense_mlp on the sigmoid router's top-k weights scattered to ``[T, E]``;
    the block scales the routed output by ``config.routed_scaling_factor``."""
    model = _hf_model("minimax_m3_vl_text")
    spec = analyze_moe(model.config, model)
    assert spec.mlp_swiglu == (
        "getattr(config, 'swiglu_alpha', 1.702)",
        "getattr(config, 'swiglu_limit', 7.0)",
    )
    assert (spec.experts.activation, spec.experts.has_bias) == ("clamped_swiglu", False)
    assert (spec.router.scoring, spec.scaling_field) == ("sigmoid", "routed_scaling_factor")
    assert (
        spec.dense_class == "MiniMaxM3VLDenseMLP"
        and spec.dense_width_expr == "config.dense_intermediate_size"
    )
    namespace = _exec_blocks(spec)
    _emitted_block_matches(model, spec)
    dense_hf = type(model.model.layers[0].mlp.shared_experts)(model.config, intermediate_size=24)
    dense = namespace["MiniMaxM3VLDenseMLP"](model.config, intermediate_size=24).eval()
    with torch.no_grad():
        for param in dense_hf.parameters():
            param.normal_(0.0, 0.5)
    transfer_weights(dense_hf, dense)
    x = 3 * torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    assert_rmse_close(dense(x), dense_hf(x), 1e-5, msg="fused clamped SwiGLU")


def test_norm_flag_the_router_ignores_is_not_read() -> None:
    """Cohere2-MoE's softmax over the top-k logits is normalised whatever ``norm_topk_prob`` says."""
    model = _hf_model("cohere2_moe")
    spec = analyze_moe(model.config, model)
    assert (spec.router.norm_topk_prob, spec.router.norm_field) == (True, None)
    assert spec.dense_class == "Cohere2MoeMLP"  # measured on a probe layer made dense


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        pytest.param(
            "ergo", r"model\.layers\.1\.mlp\.experts: .*non-gated experts", marks=requires_reference("ergo")
        ),
    ],
)
def test_unknown_moe_parts_are_refused_by_path(model_type: str, message: str) -> None:
    model = _hf_model(model_type)
    with pytest.raises(UnsupportedFeature, match=message):
        analyze_moe(model.config, model)


def test_softmax_router_with_a_correction_bias_in_a_statics_submodule() -> None:
    """ERNIE-4.5-MoE: softmax scores, top-k on scores + ``gate.moe_statics.e_score_correction_bias``."""
    model = _hf_model("ernie4_5_moe")
    spec = analyze_moe(model.config, model)
    router = spec.router
    assert (router.scoring, router.correction_bias, router.statics_attr) == (
        "softmax",
        "router",
        "moe_statics",
    )
    assert router.statics_shape == (1,)
    assert spec.shared.intermediate_expr == "config.moe_intermediate_size * config.moe_num_shared_experts"
    assert spec.mlp_bias == "config.use_bias"
    _emitted_block_matches(model, spec)


@torch.no_grad()
def test_gated_mlp_bias_follows_the_measured_flag() -> None:
    """With ``use_bias=True`` the emitted dense MLP has biases and matches transformers' MLP."""
    model = _hf_model("ernie4_5_moe")
    spec = analyze_moe(model.config, model)
    config = copy.deepcopy(model.config)
    config.use_bias = True
    hf_mlp = type(model.model.layers[0].mlp)(config)
    for param in hf_mlp.parameters():
        param.normal_(0.0, 0.2)
    lean = _exec_blocks(spec)[spec.dense_class](config)
    assert lean.gate_proj.bias is not None
    transfer_weights(hf_mlp, lean)
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(lean(x), hf_mlp(x), rtol=1e-5, atol=1e-5)


def test_block_output_norm_is_measured_and_applied() -> None:
    """A.X-K1 normalises the MoE block's output with ``post_mlp_layernorm`` (an RMSNorm of the file)."""
    model = _hf_model("axk1")
    spec = analyze_moe(model.config, model)
    assert spec.post_norm == ("post_mlp_layernorm", "AXK1RMSNorm")
    hf_block = model.model.layers[spec.moe_layers[0]].mlp
    namespace = _exec_blocks_with_norm(spec, type(hf_block.post_mlp_layernorm))
    lean = namespace[spec.class_name](model.config).eval()
    with torch.no_grad():
        hf_block.post_mlp_layernorm.weight.normal_(1.0, 0.5)
    transfer_weights(hf_block, lean)
    x = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(9))
    assert_rmse_close(lean(x), _hf_output(hf_block, x), 1e-5, msg=spec.class_name)


def _exec_blocks_with_norm(spec: MoESpec, norm_class: type) -> dict[str, object]:
    """The emitted blocks, with transformers' norm class standing in for the file's."""
    source = "\n".join(
        [
            "import torch",
            "from torch import nn",
            f"from transformers import {spec.config_class}",
            "from transformers.activations import ACT2FN",
            "import onboardlm.ops",
            *block_imports(spec),
            "",
            emit_moe(spec),
        ]
    )
    namespace: dict[str, object] = {norm_class.__name__: norm_class}
    exec(compile(source, f"<emitted {spec.class_name}>", "exec"), namespace)
    return namespace


def test_unknown_block_submodule_is_refused_by_path() -> None:
    model = _hf_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.extra = nn.Linear(4, 4)
    with pytest.raises(
        UnsupportedFeature, match=r"model\.layers\.0\.mlp\.extra: .*MoE block submodule Linear"
    ):
        analyze_moe(model.config, model)


@torch.no_grad()
def test_non_gated_experts_and_shared_expert_match_transformers() -> None:
    """NemotronH's packed non-gated experts ``down(relu2(up(x)))`` (activation measured) and its non-gated
    shared expert: the emitted block runs them in torch_moe (is_gated_mlp=False), loads HF's packed
    ``up_proj`` / ``down_proj`` through its hook and matches the HF block."""
    model = _hf_model("nemotron_h")
    spec = analyze_moe(model.config, model, dense=False)
    assert spec is not None and not spec.experts.gated and spec.experts.activation == "relu2"
    assert spec.shared is not None and spec.shared.plain_act == "config.mlp_hidden_act"
    source = emit_moe(spec)
    assert "is_gated_mlp=False" in source and "gate_proj" not in source
    hf_block = model.model.layers[spec.moe_layers[0]].mixer
    lean = _exec_blocks(spec)[spec.class_name](model.config).eval()
    report = transfer_weights(hf_block, lean)
    assert report.num_tensors == len(hf_block.state_dict())
    x = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    assert_rmse_close(lean(x), _hf_output(hf_block, x), 1e-5, msg=spec.class_name)
