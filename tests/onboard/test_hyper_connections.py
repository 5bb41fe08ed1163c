"""Hyper-connections, measured (analyze_streams) and emitted (emit_streams), against transformers.

DeepSeek-V4 (Sinkhorn residual mix, streams on a new axis), HY-V4 (sigmoid pre/post weights) and
Qwen4-Exp (gated low-rank weights, streams concatenated) are the three forms; each is measured from
the tiny model and its emitted mixer classes load the transformers modules' state dicts strictly and
give the same outputs. The types stay refused for another feature of their attention, named first.
"""

from __future__ import annotations

import copy
import functools
import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.errors import UnsupportedFeature
from onboardlm.models.config_completion import complete_default_config
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_streams import (
    gated_mix,
    hyper_connection_refusal,
    is_additive_mask,
    measure_hyper_connections,
    sigmoid_mix,
)
from onboardlm.onboard.emit_streams import hyper_connection_source, stream_layer_lines
from onboardlm.testing.tiny_config import tiny_config

TYPES = ("deepseek_v4", "hy_v4", "qwen4_exp_text")


@functools.cache
def _tiny(model_type: str) -> tuple:
    config = AutoConfig.for_model(model_type)
    complete_default_config(config)
    tiny = tiny_config(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager", dtype=torch.float32)
    model = model.float().eval()
    return tiny, model, measure_hyper_connections(model, tiny)


def _randomize(module: nn.Module, seed: int) -> None:
    """Weights far from their init (scales near one), so every constant shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            values = 0.5 + torch.rand(parameter.shape, generator=generator)
            if parameter.dim() == 2:
                values = (
                    values * torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5
                )
            parameter.copy_(values)


def _namespace(source: str, config: object) -> dict:
    namespace = {"torch": torch, "nn": nn, type(config).__name__: type(config)}
    exec(compile(source, "<hyper_connections>", "exec"), namespace)  # noqa: S102 - the emitted source
    return namespace


@pytest.mark.parametrize(
    ("model_type", "form", "layout", "streams", "mixers", "head"),
    [
        ("deepseek_v4", "sinkhorn", "split", "hc_mult", ["attn_hc", "ffn_hc"], ("hc_head", "sigmoid")),
        ("hy_v4", "sigmoid", "split", "hc_mult", ["attn_hc", "ffn_hc"], ("hc_head", "sigmoid")),
        (
            "qwen4_exp_text",
            "gated",
            "flat",
            "hc_count",
            ["attn_hyper_connection", "mlp_hyper_connection"],
            ("hyper_connection_mixer", "gated"),
        ),
    ],
)
def test_the_form_layout_and_stream_count_are_measured(
    model_type, form, layout, streams, mixers, head
) -> None:
    tiny, model, spec = _tiny(model_type)
    assert (spec.form, spec.layout, spec.streams) == (form, layout, f"config.{streams}")
    assert spec.streams_value == getattr(tiny, streams)
    assert [m.attr for m in spec.mixers] == mixers and (spec.head.attr, spec.head.form) == head
    assert spec.head.class_name == type(getattr(model.model, spec.head.attr)).__name__


def test_constants_name_the_config_fields_they_read() -> None:
    """Epsilons that are equal in the tiny config (DeepSeek-V4: rms_norm_eps = hc_eps = 1e-6) are told
    apart; the Sinkhorn iterations converge, yet the field is found; HY-V4's magnitude is a field,
    DeepSeek-V4's a literal 2; Qwen4-Exp divides by the stream count and offsets its norm by one."""
    dsv4 = dict(_tiny("deepseek_v4")[2].mixers[0].constants)
    assert dsv4 == {
        "norm_eps": "config.rms_norm_eps",
        "eps": "config.hc_eps",
        "post_scale": "2.0",
        "post_eps": "0.0",
        "iterations": "config.hc_sinkhorn_iters",
    }
    hy = dict(_tiny("hy_v4")[2].mixers[0].constants)
    assert hy == {
        "norm_eps": "config.rms_norm_eps",
        "eps": "config.hc_eps",
        "post_scale": "config.hc_magnitude",
        "post_eps": "eps",
    }
    qwen = _tiny("qwen4_exp_text")[2]
    assert dict(qwen.mixers[0].constants) == {
        "norm_eps": "config.rms_norm_eps",
        "norm_offset": "1.0",
        "divisor": "config.hc_count",
        "inject_scale": "2.0",
        "lowrank": "config.hc_lowrank",
    }
    assert (
        qwen.head.param("inject") is None and qwen.mixers[0].param("inject") == "block_inject_weight.weight"
    )


def test_reference_formulas_match_the_transformers_modules() -> None:
    """The analyzer's candidate formulas, checked directly on the three transformers mixers."""
    tiny, model, _ = _tiny("deepseek_v4")
    hc = model.model.layers[0].attn_hc
    _randomize(hc, 3)
    streams = 0.1 * torch.randn(2, 5, tiny.hc_mult, tiny.hidden_size)
    post, comb, collapsed = hc(streams)
    ref = sigmoid_mix(
        streams,
        hc.fn,
        hc.base,
        hc.scale,
        norm_eps=tiny.rms_norm_eps,
        eps=tiny.hc_eps,
        post_scale=2.0,
        iterations=tiny.hc_sinkhorn_iters,
    )
    torch.testing.assert_close(ref["collapsed"], collapsed)
    torch.testing.assert_close(ref["post"], post)
    torch.testing.assert_close(ref["comb"], comb)
    tiny, model, _ = _tiny("qwen4_exp_text")
    gr = model.model.layers[0].attn_hyper_connection
    _randomize(gr, 4)
    split = 0.1 * torch.randn(2, 5, tiny.hc_count, tiny.hidden_size)
    mixed, residual, inject = gr(split.flatten(2))
    ref = gated_mix(
        split,
        gr.hc_norm.weight,
        gr.input_mix_weight_down.weight,
        gr.input_mix_weight_up.weight,
        gr.block_inject_weight.weight,
        norm_eps=tiny.rms_norm_eps,
        norm_offset=1.0,
        divisor=float(tiny.hc_count),
        inject_scale=2.0,
    )
    torch.testing.assert_close(ref["collapsed"], mixed)
    torch.testing.assert_close(ref["post"], inject)
    torch.testing.assert_close(residual, split.flatten(2))


#: Telling values of the fields the mixers read (the tiny config's epsilons are equal and tiny, and
#: 20 Sinkhorn iterations converge), so that a wrong constant shows.
TELLING = {"rms_norm_eps": 3e-3, "hc_eps": 7e-3, "hc_sinkhorn_iters": 3, "hc_magnitude": 1.7}


def _check_mixers(model_type: str, source: str) -> None:
    """Each emitted mixer class, built from a telling config, loads the transformers module's state
    dict strictly and gives its outputs on random streams."""
    tiny, model, spec = _tiny(model_type)
    telling = copy.deepcopy(tiny)
    for name, value in TELLING.items():
        if hasattr(telling, name):
            setattr(telling, name, value)
    namespace = _namespace(source, tiny)
    streams = 0.1 * torch.randn(
        2, 5, spec.streams_value, tiny.hidden_size, generator=torch.Generator().manual_seed(6)
    )
    given = streams if spec.layout == "split" else streams.flatten(2)
    head_module = getattr(model.model, spec.head.attr)
    layer = model.model.layers[0]
    for mixer, module in [*((m, getattr(layer, m.attr)) for m in spec.mixers), (spec.head, head_module)]:
        head = mixer is spec.head
        gated_head = head and mixer.form == "gated"
        theirs = (type(module)(telling, use_combine=False) if gated_head else type(module)(telling)).float()
        _randomize(theirs, 5)
        cls = namespace[mixer.class_name]
        ours = cls(telling, use_combine=False) if gated_head else cls(telling)
        ours.load_state_dict(theirs.state_dict(), strict=True)  # module names equal the checkpoint keys
        with torch.no_grad():
            expected, got = theirs(given), ours(streams)
        if head:
            torch.testing.assert_close(got, expected)
            continue
        collapsed, post, comb = got
        if spec.form == "gated":
            expected_collapsed, _residual, expected_post = expected
            expected_comb = None
        elif spec.form == "sinkhorn":
            expected_post, expected_comb, expected_collapsed = expected
        else:
            (expected_post, expected_collapsed), expected_comb = expected, None
        torch.testing.assert_close(collapsed, expected_collapsed)
        torch.testing.assert_close(post, expected_post)
        if expected_comb is None:
            assert comb is None
        else:
            torch.testing.assert_close(comb, expected_comb)


@pytest.mark.parametrize("model_type", TYPES)
def test_emitted_mixers_load_the_checkpoint_keys_and_match_transformers(model_type: str) -> None:
    tiny, _model, spec = _tiny(model_type)
    _check_mixers(model_type, hyper_connection_source(spec, type(tiny).__name__))


#: Plausible bugs in the emitted mixers (old text -> new text); the checks above must catch each.
MUTANTS = [
    ("deepseek_v4", "range(self.iterations - 1)", "range(self.iterations - 2)"),  # one Sinkhorn step less
    (
        "deepseek_v4",
        "comb.sum(dim=-2, keepdim=True) + self.eps)\n        for",
        "comb.sum(dim=-1, keepdim=True) + self.eps)\n        for",
    ),
    ("deepseek_v4", "torch.softmax(logits, dim=-1) + self.eps", "torch.softmax(logits, dim=-1)"),
    ("deepseek_v4", "* scale[2]", "* scale[1]"),
    ("deepseek_v4", "self.post_scale = 2.0", "self.post_scale = 1.0"),
    ("hy_v4", "post = post + self.eps", "post = post"),
    ("hy_v4", "+ base[:n]) + self.eps", "+ base[:n])"),
    ("hy_v4", "self.norm_eps = config.rms_norm_eps", "self.norm_eps = config.hc_eps"),
    ("hy_v4", "self.post_scale = config.hc_magnitude", "self.post_scale = 2.0"),
    ("hy_v4", "mixes[..., n : 2 * n] * scale[1]", "mixes[..., n : 2 * n] * scale[0]"),
    ("qwen4_exp_text", "weight = 1.0 + self.hc_norm", "weight = self.hc_norm"),
    ("qwen4_exp_text", ".mean(dim=-2)", ".sum(dim=-2)"),
    ("qwen4_exp_text", "silu(down / self.divisor)", "silu(down)"),
    ("qwen4_exp_text", "torch.sigmoid(logits / self.divisor)", "torch.sigmoid(logits)"),
    ("qwen4_exp_text", "self.inject_scale = 2.0", "self.inject_scale = 1.0"),
    ("qwen4_exp_text", "self.norm_eps = config.rms_norm_eps", "self.norm_eps = 1e-6"),
]


@pytest.mark.parametrize(("model_type", "old", "new"), MUTANTS)
def test_the_mixer_checks_catch_a_mutated_mixer(model_type: str, old: str, new: str) -> None:
    tiny, _model, spec = _tiny(model_type)
    source = hyper_connection_source(spec, type(tiny).__name__)
    assert source.count(old) >= 1, old
    with pytest.raises(AssertionError):
        _check_mixers(model_type, source.replace(old, new, 1))


#: The blocks of layer 0 and the norm before each (None: the mixer's own norm is the block's).
LAYER_BLOCKS = {
    "deepseek_v4": (("self_attn", "mlp"), ("input_layernorm", "post_attention_layernorm")),
    "hy_v4": (("self_attn", "mlp"), ("input_layernorm", "post_attention_layernorm")),
    "qwen4_exp_text": (("linear_attn", "mlp"), (None, None)),
}


@pytest.mark.parametrize("model_type", TYPES)
def test_a_layer_of_streams_is_the_emitted_mixers_around_its_blocks(model_type: str) -> None:
    """transformers' layer 0 in a forward, its blocks' inputs and outputs recorded: the emitted
    expansion gives the layer's input, and the emitted mixers, the layer's norms and
    ``streams_update`` give its output streams."""
    tiny, _model, spec = _tiny(model_type)
    _check_layer(model_type, hyper_connection_source(spec, type(tiny).__name__))


@pytest.mark.parametrize(
    ("model_type", "old", "new"),
    [
        ("deepseek_v4", "comb.float().transpose(-1, -2)", "comb.float()"),  # the mix applied untransposed
        ("hy_v4", "post.float().unsqueeze(-1) * out", "out"),  # the block output added unweighted
        (
            "qwen4_exp_text",
            "unsqueeze(2).expand(-1, -1, count, -1)",
            "unsqueeze(-1).expand(-1, -1, -1, count)",
        ),
    ],
)
def test_the_layer_check_catches_a_mutated_stream_update(model_type: str, old: str, new: str) -> None:
    tiny, _model, spec = _tiny(model_type)
    source = hyper_connection_source(spec, type(tiny).__name__)
    assert old in source
    with pytest.raises((AssertionError, RuntimeError)):
        _check_layer(model_type, source.replace(old, new, 1))


def _check_layer(model_type: str, source: str) -> None:
    blocks, norms = LAYER_BLOCKS[model_type]
    tiny, model, spec = _tiny(model_type)
    namespace = _namespace(source, tiny)
    layer = model.model.layers[0]
    seen: dict[str, list[torch.Tensor]] = {"in": [], "out": []}

    def block_hook(_module, args, kwargs, out) -> None:
        seen["in"].append(args[0] if args else kwargs["hidden_states"])
        seen["out"].append(out[0] if isinstance(out, tuple) else out)

    def layer_hook(_module, args, kwargs, out) -> None:
        seen["layer_in"] = [args[0] if args else kwargs["hidden_states"]]
        seen["layer_out"] = [out[0] if isinstance(out, tuple) else out]

    handles = [getattr(layer, block).register_forward_hook(block_hook, with_kwargs=True) for block in blocks]
    handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
    ids = torch.randint(0, tiny.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    (layer_in,), (layer_out,) = seen["layer_in"], seen["layer_out"]
    expanded = namespace["streams_expand"](model.model.embed_tokens(ids), spec.streams_value)
    torch.testing.assert_close(expanded.reshape(layer_in.shape), layer_in)
    streams = layer_in if spec.layout == "split" else namespace["streams_in"](layer_in, spec.streams_value)
    for index, mixer in enumerate(spec.mixers):
        ours = namespace[mixer.class_name](tiny)
        ours.load_state_dict(getattr(layer, mixer.attr).state_dict(), strict=True)
        with torch.no_grad():
            collapsed, post, comb = ours(streams)
            block_in = collapsed if norms[index] is None else getattr(layer, norms[index])(collapsed)
            torch.testing.assert_close(block_in, seen["in"][index])
            streams = namespace["streams_update"](streams, seen["out"][index], post, comb)
    torch.testing.assert_close(streams.reshape(layer_out.shape), layer_out)


@pytest.mark.parametrize(
    ("model_type", "path", "feature", "kind"),
    [
        (
            "deepseek_v4",
            r"model\.layers\.0\.self_attn\.compressor",
            "keys and values compressed along the sequence",
            "DeepseekV4HCACompressor",
        ),
        ("hy_v4", r"model\.layers\.0\.self_attn\.indexer", "a token-selection indexer", "HYV4Indexer"),
        (
            "qwen4_exp_text",
            r"model\.layers\.1\.self_attn\.indexer",
            "a token-selection indexer",
            "Qwen4ExpTextQSAIndexer",
        ),
    ],
)
def test_the_refusal_names_the_next_feature_and_the_measured_streams(model_type, path, feature, kind) -> None:
    """The first feature of the attention that no template covers leads (DeepSeek-V4's compressed
    keys, the indexers), found from a recorded forward; the measured streams follow."""
    config = AutoConfig.for_model(model_type)
    complete_default_config(config)
    with pytest.raises(UnsupportedFeature, match=rf"^{path}: unsupported feature: {feature} \({kind}") as err:
        analyze(config)
    message = str(err.value)
    assert "besides, hyper-connections: the decoder layers carry 4 residual streams" in message
    assert "\n" not in message


def test_a_selection_returned_as_an_additive_mask_is_told_from_other_float_outputs() -> None:
    """Under eager attention transformers 5.17's Qwen4-Exp indexer returns its selection as an additive
    float mask (0 where a query attends, the dtype's lowest value elsewhere), later releases as a
    boolean mask (the parametrised refusal above runs on each): both are a selection, scores are not."""
    keep = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    lowest = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert is_additive_mask(lowest) and is_additive_mask(lowest.masked_fill(~keep, float("-inf")))
    assert not is_additive_mask(keep)  # the boolean form is told by its dtype
    assert not is_additive_mask(torch.zeros(keep.shape))  # nothing masked: a zero output, no selection
    assert not is_additive_mask(torch.softmax(torch.randn(1, 1, 16, 16), dim=-1))


def test_one_residual_stream_is_not_hyper_connections() -> None:
    config = tiny_config(LlamaConfig())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert hyper_connection_refusal(model, config) is None
    assert measure_hyper_connections(model, config) is None


def test_qwen4_exp_indexer_fields_are_completed_as_a_checkpoint_sets_them() -> None:
    """All five QSA indexer fields are None in the default; a checkpoint sets every one (transformers
    cannot build the indexer otherwise). The multimodal default's text config is completed as well."""
    config = AutoConfig.for_model("qwen4_exp_text")
    notes = complete_default_config(config)
    assert (config.indexer_kv_heads, config.indexer_compress_ratio, config.indexer_budget) == (1, 4, 2048)
    assert config.indexer_n_heads == config.num_attention_heads and config.indexer_head_dim == config.head_dim
    assert any(note.startswith("indexer_budget=2048") for note in notes)
    config.validate()  # transformers' own checks (budget a multiple of the block, one key head) hold
    multimodal = AutoConfig.for_model("qwen4_exp")
    notes = complete_default_config(multimodal)
    assert multimodal.get_text_config(decoder=True).indexer_budget == 2048
    assert any(note.startswith("text_config.indexer_budget=") for note in notes)


#: Per type: the decoder layer's forward signature, and its steps (mixer, norm, block call on ``{x}``)
#: as transformers' layer calls its blocks.
LAYER_FORWARDS = {
    "deepseek_v4": (
        "hidden_states, input_ids=None, **kwargs",
        [
            ("attn_hc", "input_layernorm", "self.self_attn({x}, **kwargs)[0]"),
            ("ffn_hc", "post_attention_layernorm", "self.mlp({x}, input_ids=input_ids)"),
        ],
    ),
    "hy_v4": (  # the layer hands the indexer's top-k on to the next layer's shared indexer
        "hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,"
        " position_embeddings=None, prev_topk_indices=None, **kwargs",
        [
            (
                "attn_hc",
                "input_layernorm",
                "(attended := self.self_attn(hidden_states={x}, attention_mask=attention_mask,"
                " position_ids=position_ids, cache=cache, use_cache=use_cache,"
                " position_embeddings=position_embeddings, prev_topk_indices=prev_topk_indices, **kwargs))[0]",
            ),
            ("ffn_hc", "post_attention_layernorm", "self.mlp({x})"),
        ],
    ),
    "qwen4_exp_text": (
        "hidden_states, position_embeddings, attention_mask=None, conv_mask=None, cache=None,"
        " ple_input_ids=None, **kwargs",
        [
            (
                "attn_hyper_connection",
                None,
                "(self.linear_attn({x}, cache=cache, attention_mask=conv_mask, **kwargs)"
                ' if self.layer_type == "linear_attention" else self.self_attn({x}, position_embeddings,'
                " attention_mask=attention_mask, cache=cache, **kwargs)[0])",
            ),
            ("mlp_hyper_connection", None, "self.mlp({x})"),
        ],
    ),
}


@pytest.mark.parametrize("model_type", sorted(LAYER_FORWARDS))
def test_decoder_layers_that_keep_the_streams_give_transformers_logits(model_type: str) -> None:
    """Every decoder layer of the tiny model runs the emitted layer body (``stream_layer_lines``) with
    the emitted mixers in place of transformers' (loaded from their state dicts): the logits are
    transformers' own. The blocks are transformers' (their templates are another feature's)."""
    tiny, model, spec = _tiny(model_type)
    model = copy.deepcopy(model)
    for index, layer in enumerate(model.model.layers):
        for mixer in spec.mixers:
            _randomize(getattr(layer, mixer.attr), 10 + index)
    ids = torch.randint(0, tiny.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    namespace = _namespace(hyper_connection_source(spec, type(tiny).__name__), tiny)
    signature, steps = LAYER_FORWARDS[model_type]
    body = stream_layer_lines(spec, steps, str(spec.streams_value))
    if model_type == "hy_v4":
        body[-1] = f"{body[-1]}, attended[2]"
    source = f"def forward(self, {signature}):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, "<stream layer>", "exec"), namespace)  # noqa: S102 - the emitted layer body
    for layer in model.model.layers:
        for mixer in spec.mixers:
            ours = namespace[mixer.class_name](tiny)
            ours.load_state_dict(getattr(layer, mixer.attr).state_dict(), strict=True)
            setattr(layer, mixer.attr, ours)
        layer.forward = types.MethodType(namespace["forward"], layer)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
