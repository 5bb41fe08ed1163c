"""Phase 1b: measure an ArchitectureSpec from the transformers model built on a tiny config.

Structure comes from the module tree (class names, children, parameter shapes). Behaviour comes from
numeric probes of HF modules against the math each template emits: the norm formula (RMS or
mean-centred, ``1 + w`` offset, epsilon), the MLP wiring and activation, the residual layout (stand-in
blocks in a copy of the decoder layer), which layers use RoPE and how attention rotates q/k (the whole
attention block against a plain-torch reference), embedding and logit scaling, and whether a sliding
window is applied. Which config field switches a bias or an optional module comes from toggling the
field and rebuilding the layer. A module or behaviour that no template covers raises
``UnsupportedFeature`` naming the module path.

Classic layouts (GPT-2, GPT-NeoX, GPT-J, OPT, Falcon, BLOOM, ...) are measured the same way: linear
maps in either weight layout (``analyze_classic``: nn.Linear or transformers' Conv1D), the layout of
a fused q/k/v projection (matched against the attention output, group count confirmed with twice
the heads), learned or sinusoidal absolute positions (their offset and base), ALiBi (an attention
that needs its model's inputs is recorded inside one forward), decoder stacks wrapped by the inner
model, MLPs whose linears sit on the layer, post-LN and parallel layouts, and the bool config
fields that switch a layout, a scale or a final norm (flipped on a rebuilt layer or stack). A flip
that builds other modules is recorded in the notes and named in the model file's docstring.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import linecache
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from onboardlm.errors import UnsupportedFeature
from onboardlm.models.build_errors import transformers_failure
from onboardlm.onboard.analyze_attn_conv import attention_conv_refusal
from onboardlm.onboard.analyze_classic import (
    Projection,
    alibi_slopes,
    projections,
    separate_qkv_roles,
    split_fused_qkv,
)
from onboardlm.onboard.analyze_hybrid import analyze_hybrid, needs_hybrid
from onboardlm.onboard.analyze_kv_sharing import kv_source_expression, measure_kv_sources
from onboardlm.onboard.analyze_mamba2_scales import float_candidates
from onboardlm.onboard.analyze_moe import analyze_mla, analyze_moe, predict_layers
from onboardlm.onboard.analyze_perlayer import (
    kv_sharing_refusals,
    measure_per_layer_inputs,
    with_per_layer_inputs,
)
from onboardlm.onboard.analyze_streams import hyper_connection_refusal
from onboardlm.onboard.analyze_widths import (
    check_first_layer,
    global_access,
    layer_type_config,
    overridden_fields,
    per_layer_attention_fields,
)
from onboardlm.onboard.config_derived import derived_expression, width_function
from onboardlm.onboard.spec import (
    DIFFERENTIAL_LAMBDA_INIT,
    ArchitectureSpec,
    AttentionSpec,
    DecoderLayerSpec,
    EmbeddingSpec,
    HeadSpec,
    HeadTransformSpec,
    LinearSpec,
    MLPSpec,
    NormSpec,
    PositionEmbeddingSpec,
    RopeSpec,
    SlidingMode,
)
from onboardlm.onboard.spec_moe import MLASpec, MoESpec
from onboardlm.ops.key_bias_attention import kept_keys
from onboardlm.testing import tiny_config
from onboardlm.testing.capture import cos_sin_tables, record_calls

_TOL = 1e-5
_EPS_NAMES = ("variance_epsilon", "eps", "variance_eps", "epsilon")
_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function", "activation", "mlp_hidden_act")
#: Activations tried when no config field names the one an MLP applies (BLOOM's tanh GELU).
_LITERAL_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "relu", "silu", "gelu_new")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional", "longrope", "dynamic", "ntk_alpha")
#: Keys of transformers' own RoPE types; another key is one a model's rotary module reads itself.
_ROPE_KEYS = {
    "rope_type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
    "attention_factor", "beta_fast", "beta_slow", "short_factor", "long_factor", "low_freq_factor",
    "high_freq_factor", "mscale", "mscale_all_dim", "truncate",
}  # fmt: skip
_LOGIT_SCALES = ("logits_scaling", "logit_scale", "lm_head_multiplier")
#: Fields of a final logit soft-cap ``cap * tanh(logits / cap)``: Gemma 2's, RecurrentGemma's.
_LOGIT_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")
#: Scalar multipliers whose default 1.0 would hide them from the probes: set to telling values.
_TELLING_MULTIPLIERS = {
    "embedding_multiplier": 1.9,
    "residual_multiplier": 0.7,
    "logits_scaling": 2.5,
    "logit_scale": 0.4,
    # Falcon-H1's µP multipliers (all 1.0 in its default config)
    "attention_in_multiplier": 0.8,
    "attention_out_multiplier": 1.2,
    "ssm_in_multiplier": 0.65,
    "ssm_out_multiplier": 1.35,
    "key_multiplier": 1.15,
    "lm_head_multiplier": 0.6,
}
#: List-valued multipliers (one value per segment or projection) set to distinct telling values.
_TELLING_MULTIPLIER_LISTS = {
    "mlp_multipliers": [0.75, 1.25],
    "ssm_multipliers": [0.7, 1.3, 0.55, 1.45, 0.85],
}
_HINT = "add a template for it in onboardlm/onboard/templates and teach analyze.py to recognise it"
_TINY_HINT = "teach onboardlm.testing.tiny_config to shrink these config fields"


def analyze(config: PretrainedConfig) -> ArchitectureSpec:
    """Measure the architecture of ``config``'s transformers causal LM (built tiny, random weights)."""
    try:
        tiny = tiny_config(config)
    except (ValueError, StrictDataclassError) as err:
        if type(config).sub_configs:  # a composite config: its text decoder is what to onboard
            raise UnsupportedFeature(
                type(config).__name__, str(err), "pass the text decoder's config"
            ) from err
        reason = " ".join(str(err.__cause__ if isinstance(err, StrictDataclassError) else err).split())
        # per-layer overrides, or the shrunken fields break one of the config class's own checks
        raise UnsupportedFeature(type(config).__name__, f"no tiny copy of it: {reason}", _TINY_HINT) from err
    if tiny.is_heterogeneous:  # decoder layers of different widths: measured per layer (analyze_widths)
        check_first_layer(tiny)
    with global_access(config, tiny):
        for name, value in _TELLING_MULTIPLIERS.items():
            if isinstance(getattr(tiny, name, None), float):
                with contextlib.suppress(AttributeError):  # a read-only property derived from other fields
                    setattr(tiny, name, value)
        for name, values in _TELLING_MULTIPLIER_LISTS.items():
            current = getattr(tiny, name, None)
            if isinstance(current, (list, tuple)) and len(current) == len(values):
                setattr(tiny, name, list(values))
        with torch.random.fork_rng():  # the random tiny weights leave the caller's RNG state alone
            torch.manual_seed(0)
            return _measure(config, tiny)


def _measure(config: PretrainedConfig, tiny: PretrainedConfig) -> ArchitectureSpec:
    try:
        model = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager", dtype=torch.float32)
        model = model.float().eval()  # probes compare in fp32 whatever dtype the checkpoint uses
    except Exception as err:  # transformers raises anything from a config it cannot build
        raise UnsupportedFeature(
            type(config).__name__,
            f"transformers cannot build a causal LM from its tiny copy: {err}",
            "check that the config is complete (head_dim, rope parameters) for transformers",
        ) from err
    _fill_attention_masks(model)
    try:
        per_layer = measure_per_layer_inputs(tiny, model)
        if per_layer is None:
            return _Analyzer(config, tiny, model).spec()
        # the rest of the model measured on the config without them (its layers are ordinary ones)
        model = AutoModelForCausalLM.from_config(
            per_layer[1], attn_implementation="eager", dtype=torch.float32
        )
        model = model.float().eval()
        _fill_attention_masks(model)
        return with_per_layer_inputs(_Analyzer(config, per_layer[1], model).spec(), per_layer[0])
    except (AttributeError, TypeError, IndexError, KeyError, ValueError, RuntimeError) as err:
        # raised inside a transformers module on a probe input: name that module and its line
        located = transformers_failure(tiny, err, "fails on the analyzer's probe input")
        raise located or _probe_failure(type(config).__name__, err) from err


def _fill_attention_masks(model: nn.Module) -> None:
    """Where the model's eager attention adds its mask unguarded (ModernBERT-decoder's
    ``attn_weights + attention_mask``), give its attention modules an all-zero additive mask in place
    of None: the analyzer's probes call blocks without one, which every other eager attention reads as
    "no mask". The generated tests replay the real masks and are not affected."""
    eager = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
    try:
        source = inspect.getsource(eager) if eager is not None else ""
    except (OSError, TypeError):
        return
    if "+ attention_mask" not in source or "attention_mask is not None" in source:
        return

    def fill(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.zeros(1, 1, 1, 1)
        return args, kwargs

    for module in model.modules():
        try:
            calls_eager = "eager_attention_forward" in inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if calls_eager and "attention_mask" in inspect.signature(module.forward).parameters:
            module.register_forward_pre_hook(fill, with_kwargs=True)


#: Frames that only pass a call on (torch's module call, decorators, kernel hubs): not the failing line.
_WRAPPERS = ("/torch/", "/transformers/utils/", "/kernels/", "/transformers/integrations/")


def _probe_failure(config_name: str, err: BaseException) -> UnsupportedFeature:
    """Name the module an analyzer probe was measuring (its ``path`` local), the probe (the innermost
    analyzer function) and the call that failed (the innermost frame: file, line, source)."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame, tb.tb_lineno))
        tb = tb.tb_next
    ours = [(f, n) for f, n in frames if "/onboardlm/onboard/" in f.f_code.co_filename]
    where = config_name
    for frame, _ in reversed(ours):
        found = next(
            (
                frame.f_locals[k]
                for k in ("path", "layer_path", "prefix")
                if isinstance(frame.f_locals.get(k), str)
            ),
            None,
        )
        if found:
            where = found
            break
    probe = ""
    if ours:
        frame, lineno = ours[-1]
        probe = f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{lineno}) "
    after = frames[frames.index(ours[-1]) + 1 :] if ours else frames
    modules = [f.f_locals.get("self") for f, _ in after if isinstance(f.f_locals.get("self"), nn.Module)]
    called = f" in {type(modules[-1]).__name__}" if modules else ""
    located = [(f, n) for f, n in after if not any(w in f.f_code.co_filename for w in _WRAPPERS)]
    if located:
        frame, lineno = located[-1]
        line = linecache.getline(frame.f_code.co_filename, lineno).strip()
        called += f"{',' if called else ' in'} {Path(frame.f_code.co_filename).name}:{lineno} `{line}`"
    message = " ".join(str(err).split())[:300]
    return UnsupportedFeature(
        where,
        f"the analyzer's probe {probe}failed{called}: {type(err).__name__}: {message}",
        _HINT,
    )


#: Fields every config has (PretrainedConfig's own), not settings of a model part.
_BASE_CONFIG_FIELDS = frozenset(PretrainedConfig().to_dict())


def _describe(module: nn.Module) -> str:
    """``Class (child: Class, ...)``: what an unrecognised module is made of."""
    children = [f"{name}: {type(child).__name__}" for name, child in module.named_children()]
    if not isinstance(module, nn.ModuleList) and children:
        more = f", +{len(children) - 5}" if len(children) > 5 else ""
        return f"{type(module).__name__} ({', '.join(children[:5])}{more})"
    return type(module).__name__


def _embedding_wrapper(module: nn.Module, tokens: nn.Module) -> tuple[str, str | None] | None:
    """(token embedding, norm or None) names of a module that only wraps the token embedding with at
    most one leaf norm and dropout (ModernBERT's ``embeddings``); None for anything else. The
    embedding probe then checks that it computes ``norm(embedding(ids))``."""
    children = {n: c for n, c in module.named_children() if not isinstance(c, nn.Dropout)}
    embeds = [n for n, c in children.items() if c is tokens]
    others = [n for n in children if n not in embeds]
    if len(embeds) != 1 or len(others) > 1 or any(list(children[n].children()) for n in others):
        return None
    if others and not isinstance(getattr(children[others[0]], "weight", None), torch.Tensor):
        return None
    return embeds[0], (others[0] if others else None)


class _BufferRows(nn.Module):
    """A position table the model keeps as a buffer (CTRL's ``pos_encoding``), read as a module:
    ``rows[position_ids]``; ``class_name`` names the lean module that computes the same rows."""

    def __init__(self, rows: torch.Tensor, class_name: str) -> None:
        super().__init__()
        self.rows, self.class_name = rows, class_name

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.rows[position_ids]


def _position_buffer(stack: nn.Module, hidden: int) -> tuple[str, nn.Module] | None:
    """The stack's one non-persistent 2-D buffer of ``hidden`` columns (a fixed position table), as
    (name, rows module); None where there is no such buffer."""
    persistent = set(stack.state_dict(keep_vars=True))
    found = [
        (name, buffer)
        for name, buffer in stack.named_buffers(recurse=False)
        if buffer.dim() == 2 and buffer.shape[1] == hidden and name not in persistent
    ]
    if len(found) != 1:
        return None
    name, rows = found[0]
    return name, _BufferRows(
        rows.detach().float(), type(stack).__name__.removesuffix("Model") + "SinusoidalPositions"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _wrapped_attention(attn: nn.Module) -> str | None:
    """The child an attention module only wraps (GPT-Neo's ``attn.attention``): its one child with
    weights, itself holding linear maps, and no weights of the wrapper's own."""
    if any(True for _ in attn.parameters(recurse=False)):
        return None
    weighted = [
        (name, child) for name, child in attn.named_children() if any(True for _ in child.parameters())
    ]
    if len(weighted) == 1 and projections(weighted[0][1]):
        return weighted[0][0]
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=_TOL, atol=_TOL)


def _describe_child(name: str, child: nn.Module) -> str:
    """``name (Class)``, or ``name (ModuleList of n Class)`` for a list of one class of module."""
    if isinstance(child, nn.ModuleList) and len(child):
        kinds = sorted({type(item).__name__ for item in child})
        return f"{name} (ModuleList of {len(child)} {'/'.join(kinds)})"
    return f"{name} ({type(child).__name__})"


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _config_fields(config: PretrainedConfig) -> dict[str, Any]:
    return {**config.to_dict(), **{k: getattr(config, k) for k in vars(config) if not k.startswith("_")}}


class _Analyzer:
    """One measurement session over a tiny HF model; ``spec()`` runs every probe."""

    def __init__(self, config: PretrainedConfig, tiny: PretrainedConfig, model: nn.Module) -> None:
        self.config, self.tiny, self.model = config, tiny, model
        self._width_functions: dict[str, str] = {}  # name -> source of a feed-forward width helper
        self.fields = _config_fields(tiny)
        self.hidden = tiny.hidden_size
        self.notes: list[str] = []
        self._layer_indices: dict[int, int] = {}
        self._embed_wrapper: tuple[str, str] | None = None  # (attribute, class) wrapping the embeddings
        self._final_norm_eps: str | None = None  # the final norm's epsilon where the layers' differs
        self._residual_weights: set[str] = set()  # the layer's own vectors that scale its residual

    # ---------------------------------------------------------------------------------------- top

    def spec(self) -> ArchitectureSpec:
        model = self.model
        prefix = model.base_model_prefix
        inner = getattr(model, prefix, None)
        if inner is None:  # a prefix that names no child (Llama 4's "language_model" over ``.model``)
            embeddings = model.get_input_embeddings()
            owners = [
                (name, child)
                for name, child in model.named_children()
                if any(module is embeddings for module in child.modules())
            ]
            prefix, inner = owners[0] if len(owners) == 1 else (prefix, None)
        if inner is None:
            raise UnsupportedFeature(type(model).__name__, f"no base model at '{prefix}'", _HINT)
        head_attr = self._head_attr(model)
        self._transform = self._head_transform(model, {prefix, head_attr})
        transform_attr = {self._transform[0].attr} if self._transform else set()
        # a parameter-free elementwise child (Inkling2's logit_softcap): logit post-processing, which
        # the head probe measures against the known ones
        post = {
            n
            for n, c in model.named_children()
            if not list(c.parameters()) and not list(c.children()) and _elementwise(c, self.hidden)
        }
        try:
            self._check_children(model, "", {prefix, head_attr, *transform_attr, *post})
            stack_attr, self.stack = self._stack(inner)
            path = f"{prefix}.{stack_attr}" if stack_attr else prefix
            parts = self._model_parts(self.stack, path)
        except UnsupportedFeature as err:  # name the feature when the layers carry several residual streams
            refusal = hyper_connection_refusal(model, self.tiny)
            if refusal is None:
                raise
            raise refusal from err
        layers = parts["layers"][1]
        layer = layers[0]
        self._layer_indices = {id(module): index for index, module in enumerate(layers)}
        self._rotary_module: nn.Module | None = None
        self._base_field: str | None = None
        if needs_hybrid(layers):  # SSM or other non-attention token mixers, layers of several kinds
            rotary = parts.get("rotary") or _attention_rotary(layers)
            rope = self._rope(self.stack, path, rotary) if rotary is not None else None
            return analyze_hybrid(
                self,
                path=path,
                parts=parts,
                rope=rope,
                head_attr=head_attr,
                inner=inner,
                prefix=prefix,
                stack_attr=stack_attr,
            )
        if len({type(m).__name__ for m in layers}) != 1:
            raise UnsupportedFeature(f"{path}.{parts['layers'][0]}", "decoder layers of different classes")
        layer_path = f"{path}.{parts['layers'][0]}.0"
        if "rotary_bases" in parts:
            rope = self._rope_bases(path, parts["rotary_bases"], f"{path}.{parts['layers'][0]}")
        else:
            rope = self._rope(self.stack, path, parts.get("rotary"))
        attention = analyze_mla(self.tiny, model)  # multi-head latent attention, else MHA/GQA
        if attention is None:
            attention, rope = self._attention(layer_path, layers, rope)
            attention, rope = self._per_layer_widths(path, parts["layers"][0], layers, attention, rope)
        elif overridden_fields(self.tiny):
            raise UnsupportedFeature(
                f"{layer_path}.{attention.attr}",
                "decoder layers of different widths: per_layer_config overrides"
                f" {', '.join(overridden_fields(self.tiny))} of a multi-head latent attention on some layers",
                "an MLA template reading its ranks and head dims per layer",
            )
        feed_forward = analyze_moe(self.tiny, model) or self._mlp(layer_path, layer, attention.attr)
        self.notes += [
            block.note for block in (attention, feed_forward) if isinstance(block, (MLASpec, MoESpec))
        ]
        decoder = self._decoder(layer_path, layer, attention.attr, feed_forward)
        shared_kv = kv_sharing_refusals(self.tiny, model, attention.attr)  # KV sharing this file does not do
        self.notes += [
            f"{setting}: layers without k/v projections, refused by this file" for _, setting in shared_kv
        ]
        refused = self._part_settings(layer_path, layer) + self._feed_forward_switches(layer, feed_forward)
        decoder = dataclasses.replace(decoder, refused=refused + shared_kv)
        decoder = dataclasses.replace(decoder, **self._output_scale(layer_path, layers))
        final_attr = self._final_norm_attr(path, parts, decoder)
        self._layer_norm_spec = decoder.norm
        embedding = self._embedding(self.stack, path, parts, layer)
        head = self._head(model, inner, final_attr, head_attr)
        if self._transform is not None:
            head = dataclasses.replace(head, transform=self._transform[0])
        if self._final_norm_eps is not None:
            head = dataclasses.replace(head, final_norm_eps=self._final_norm_eps)
        if final_attr is not None:
            head = dataclasses.replace(
                head, final_norm_flag=self._final_norm_flag(f"{path}.{final_attr}", final_attr)
            )
        layer_types = getattr(self.tiny, "layer_types", None)
        return ArchitectureSpec(
            model_type=self.config.model_type,
            config_class=type(self.config).__name__,
            hf_module=type(model).__module__,
            causal_lm_class=type(model).__name__,
            model_class=type(inner).__name__,
            pretrained_class=type(model).__mro__[1].__name__,
            decoder_class=type(layer).__name__,
            attention=attention,
            feed_forward=feed_forward,
            decoder=decoder,
            embedding=embedding,
            head=head,
            rope=rope,
            layers_attr=parts["layers"][0],
            model_attr=prefix,
            stack_attr=stack_attr,
            stack_class=type(self.stack).__name__ if stack_attr else None,
            tie_word_embeddings=bool(getattr(self.config, "tie_word_embeddings", False)),
            layer_types=tuple(layer_types) if isinstance(layer_types, list) else (),
            notes=tuple(self.notes),
        )

    def _per_layer_widths(
        self,
        path: str,
        layers_attr: str,
        layers: nn.ModuleList,
        attention: AttentionSpec,
        rope: RopeSpec | None,
    ) -> tuple[AttentionSpec, RopeSpec | None]:
        """Attention widths that ``per_layer_config`` overrides on some layers: checked on every layer
        (``analyze_widths``) and read from each layer's own config; the rotary tables of a layer type
        then come from that type's config (its head_dim)."""
        fields = per_layer_attention_fields(
            self.tiny, attention, layers, f"{path}.{layers_attr}", self.hidden
        )
        if not fields:
            return attention, rope
        if "head_dim" in fields and rope is not None:
            kinds = sorted(set(getattr(self.tiny, "layer_types", None) or []))
            if not rope.per_layer_type:
                raise UnsupportedFeature(
                    f"{path}.{rope.attr}",
                    "one rotary table for layers of different head_dim (per_layer_config), not one per layer type",
                    _HINT,
                )
            for kind in kinds:
                try:
                    self.tiny.per_layer_config[kind]
                except ValueError as err:
                    raise UnsupportedFeature(
                        f"{path}.{rope.attr}",
                        f"layers of type {kind!r} with different per_layer_config overrides: no one rotary"
                        " table per layer type",
                        _HINT,
                    ) from err
            rope = dataclasses.replace(rope, layer_type_config=True)
        self.notes.append(
            f"decoder layers of different widths: {', '.join(fields)} read per layer from config.per_layer_config"
        )
        return dataclasses.replace(attention, per_layer_fields=fields), rope

    def _rebuilt_layer(
        self, layer: nn.Module, config: PretrainedConfig, index: int | None = None
    ) -> nn.Module:
        """``layer``'s class built anew from ``config`` at ``index`` (default: ``layer``'s own index; layer 0
        of a hybrid stack may be of another kind), with its kind where the constructor takes one (Bamba's)."""
        index = self._layer_indices.get(id(layer), 0) if index is None else index
        if "layer_type" in inspect.signature(type(layer).__init__).parameters:
            kinds = getattr(config, "layers_block_type", None) or getattr(config, "layer_types", None)
            if isinstance(kinds, (list, tuple)) and index < len(kinds):
                return type(layer)(config, index, layer_type=kinds[index])
        return type(layer)(config, index)

    def _check_children(self, module: nn.Module, path: str, known: set[str]) -> None:
        for name, child in module.named_children():
            if name not in known and not isinstance(child, nn.Dropout):
                where = f"{path}.{name}" if path else name
                raise UnsupportedFeature(where, f"unrecognised module {_describe(child)}", _HINT)

    def _final_norm_attr(
        self, path: str, parts: dict[str, tuple[str, Any]], decoder: DecoderLayerSpec
    ) -> str | None:
        """The final norm's attribute, checked to be the layers' kind of norm; None for a post-LN
        stack, whose layers end in a norm already (OpenAI GPT)."""
        if "norm" not in parts:
            if not decoder.norm_after_residual:
                raise UnsupportedFeature(path, "no norm module found", _HINT)
            self.notes.append("no final norm (post-LN layers)")
            return None
        final_attr, final_norm = parts["norm"]
        final = self._norm(f"{path}.{final_attr}", final_norm)
        if final != decoder.norm and dataclasses.replace(final, eps=decoder.norm.eps) == decoder.norm:
            self._final_norm_eps = final.eps  # the layers hard-code theirs (CTRL)
        elif final != decoder.norm:
            raise UnsupportedFeature(f"{path}.{final_attr}", "final norm differs from the layer norms", _HINT)
        return final_attr

    @staticmethod
    def _stack(inner: nn.Module) -> tuple[str | None, nn.Module]:
        """The module that holds the embeddings and layers: the inner model, or its only child where
        the inner model just wraps a decoder stack (OPT's ``model.decoder``)."""
        children = [(n, c) for n, c in inner.named_children() if not isinstance(c, nn.Dropout)]
        if (
            len(children) == 1
            and not isinstance(children[0][1], nn.ModuleList)
            and list(children[0][1].children())
        ):
            return children[0]
        return None, inner

    def _head_attr(self, model: nn.Module) -> str:
        """Name of the causal LM's output projection (``lm_head``, GPT-NeoX-Japanese's ``embed_out``)."""
        head = model.get_output_embeddings()
        names = [name for name, child in model.named_children() if child is head]
        if len(names) != 1:
            raise UnsupportedFeature(type(model).__name__, "no output projection among its children", _HINT)
        return names[0]

    def _model_parts(self, inner: nn.Module, prefix: str) -> dict[str, tuple[str, Any]]:
        """Embedding, layer list, final norm and rotary module of the inner model, by what they are.

        The token embedding is the one ``get_input_embeddings`` returns; a second embedding is a
        table of learned positions ("positions"); a leaf that holds only buffers and takes
        ``position_ids`` is the rotary module (GPT-J's keeps a sin/cos table, not ``inv_freq``);
        linear leaves project the embeddings in and the last hidden state out (OPT's ``project_in``
        / ``project_out``, told apart by their widths); of two leaf norms, the one fed the last
        layer's output is the final norm and the other normalises the embeddings ("embed_norm").
        """
        parts: dict[str, tuple[str, Any]] = {}
        tokens = inner.get_input_embeddings()
        linears = projections(inner)
        norms: list[tuple[str, nn.Module]] = []
        problems: list[tuple[str, str]] = []  # (module path, feature): all of them, in one message
        for name, child in inner.named_children():
            if isinstance(child, nn.Dropout):
                continue
            leaf = not list(child.children())
            if child is tokens:
                role = "embed"
            elif isinstance(child, nn.Embedding):
                role = "positions"
            elif isinstance(child, nn.ModuleList) and len(child) and all(map(_holds_inv_freq, child)):
                role = "rotary_bases"  # one rotary module per RoPE base (Granite-SWA's per-layer theta)
            elif isinstance(child, nn.ModuleList):
                role = "layers"
            elif leaf and _sinusoidal_positions(child, self.hidden):  # fixed sin/cos rows (XGLM)
                role = "positions"
            elif _holds_inv_freq(child) or (
                leaf
                and not list(child.parameters())
                and list(child.buffers())
                and "position_ids" in inspect.signature(child.forward).parameters
            ):
                role = "rotary"
            elif name in linears and linears[name].out_features == self.hidden:
                role = "project_in"
            elif name in linears and linears[name].in_features == self.hidden:
                role = "project_out"
            elif leaf:  # a norm (the probes check it is one)
                norms.append((name, child))
                continue
            elif (wrapped := _embedding_wrapper(child, tokens)) is not None:  # ModernBERT's embeddings
                embed_name, norm_name = wrapped
                parts["embed"] = (f"{name}.{embed_name}", tokens)
                if norm_name:
                    parts["embed_norm"] = (f"{name}.{norm_name}", getattr(child, norm_name))
                self._embed_wrapper = (name, type(child).__name__)
                self.notes.append(f"embeddings wrapped in {type(child).__name__} ({name})")
                continue
            else:
                problems.append((f"{prefix}.{name}", f"unrecognised module {_describe(child)}"))
                continue
            if role == "layers" and "layers" in parts and _hidden_streams(child, self.hidden):
                lists = [
                    n
                    for n, c in inner.named_children()
                    if n != parts[role][0] and _hidden_streams(c, self.hidden)
                ]
                if name == lists[0]:  # one line for all of them (AltUp's projections in and out)
                    problems.append(
                        (
                            f"{prefix}.{name}",
                            f"{len(child)} extra copies of the hidden state carried beside"
                            f" {prefix}.{parts[role][0]} (lists of square hidden->hidden Linear"
                            f" {', '.join(f'{prefix}.{n}' for n in lists)}: alternating updates, AltUp);"
                            " no template carries several hidden streams through the layers",
                        )
                    )
                continue
            if role in parts:
                kind = type(child).__name__
                if isinstance(child, nn.ModuleList) and len(child):
                    kind = f"{kind} of {len(child)} {type(child[0]).__name__}"
                problems.append(
                    (f"{prefix}.{name}", f"a second {role} module ({kind}) beside {prefix}.{parts[role][0]}")
                )
                continue
            parts[role] = (name, child)
        if problems:
            others = "; ".join(f"{path}: {feature}" for path, feature in problems[1:])
            raise UnsupportedFeature(
                problems[0][0], problems[0][1] + (f" (also {others})" if others else ""), _HINT
            )
        if len(norms) == 1:
            parts["norm"] = norms[0]
        elif len(norms) == 2 and "layers" in parts and "embed_norm" not in parts:
            final = self._final_norm(inner, parts["layers"][1], norms)
            parts["norm"] = norms[final]
            parts["embed_norm"] = norms[1 - final]
        elif len(norms) > 2:
            raise UnsupportedFeature(f"{prefix}.{norms[2][0]}", "a third norm module", _HINT)
        for role in ("embed", "layers"):
            if role not in parts:
                raise UnsupportedFeature(prefix, f"no {role} module found", _HINT)
        return parts

    def _final_norm(self, inner: nn.Module, layers: nn.ModuleList, norms: list[tuple[str, nn.Module]]) -> int:
        """Which of two norms takes the last layer's output (the other then takes the embeddings)."""
        seen: dict[str, torch.Tensor] = {}
        hooks = [layers[-1].register_forward_hook(lambda _m, _a, out: seen.setdefault("last", _first(out)))]
        for name, module in norms:
            hooks.append(
                module.register_forward_hook(lambda _m, args, _o, n=name: seen.setdefault(n, args[0]))
            )
        try:
            with torch.no_grad():
                inner(input_ids=torch.arange(1, 6)[None], position_ids=torch.arange(5)[None])
        finally:
            for hook in hooks:
                hook.remove()
        last = seen["last"]
        finals = [
            i
            for i, (name, _) in enumerate(norms)
            if name in seen
            and seen[name].numel() == last.numel()
            and _close(seen[name].reshape(last.shape), last)
        ]
        if len(finals) != 1:
            raise UnsupportedFeature(norms[0][0], "two norms, neither on the last layer's output", _HINT)
        return finals[0]

    def _final_norm_flag(self, path: str, attr: str) -> str | None:
        """The bool config field without which the stack builds no final norm (OPT's
        ``do_layer_norm_before``), found by flipping each true field and rebuilding the stack."""
        for name, value in self.fields.items():
            if value is not True:
                continue
            try:
                rebuilt = type(self.stack)(self._flip({name: False}))
            except Exception:  # a field whose flip the config or the model refuses tells nothing
                continue
            if getattr(rebuilt, attr, None) is None:
                self.notes.append(f"final norm only with config.{name}")
                return f"config.{name}"
        return None

    def _flip(self, overrides: dict[str, Any]) -> PretrainedConfig:
        """The tiny config with ``overrides``, rebuilt through its constructor so that fields it
        derives follow (Falcon's num_key_value_heads from multi_query); extra attributes kept."""
        values = {f.name: getattr(self.tiny, f.name) for f in dataclasses.fields(self.tiny) if f.init}
        try:
            config = type(self.tiny)(**{**values, **overrides})
        except Exception:  # a constructor that refuses the combination: set the fields as they are
            config = copy.deepcopy(self.tiny)
            for name, value in overrides.items():
                setattr(config, name, value)
            return config
        for key, value in vars(self.tiny).items():
            if key not in vars(config) or key == "_attn_implementation_internal":
                setattr(config, key, copy.deepcopy(value))
        return config

    # ---------------------------------------------------------------------------------------- norms

    def _norm(self, path: str, module: nn.Module) -> NormSpec:
        """Probe a norm module against RMSNorm / LayerNorm, with or without a weight (offset 0 or 1).

        The probe inputs include a batch of tiny variance, where the epsilon shows; a module without an
        epsilon attribute (OLMo's hard-coded one) is matched against the config's and common values.
        """
        weight = getattr(module, "weight", None)
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2)):
            raise UnsupportedFeature(
                path, f"norm {type(module).__name__} with a {weight.dim()}-D weight", _HINT
            )
        names = {name for name, _ in module.named_parameters()}
        if names - {"weight", "bias"} or list(module.children()):
            raise UnsupportedFeature(path, f"unrecognised module {type(module).__name__}", _HINT)
        probe = copy.deepcopy(module).float()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in probe.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 0.3)
        shape = getattr(module, "normalized_shape", None)  # a weightless torch norm of its own width
        width = tuple(weight.shape) if weight is not None else tuple(shape or (self.hidden,))
        x = torch.randn(3, 5, *width, generator=generator) * 2 + 0.7
        x[0] *= 3e-3  # variance near the epsilon
        try:
            with torch.no_grad():
                expected = probe(x)
        except Exception as err:  # not a norm over the hidden size
            raise UnsupportedFeature(path, f"unrecognised module {type(module).__name__}", _HINT) from err
        w = probe.weight.detach() if weight is not None else torch.ones(())
        b = probe.bias.detach() if isinstance(getattr(probe, "bias", None), torch.Tensor) else None
        for eps in self._eps_candidates(module):
            rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            centred = F.layer_norm(x, x.shape[-1:], None, None, eps)
            for offset in (0.0, 1.0) if weight is not None else (0.0,):
                if b is None and _close(rms * (w + offset), expected):
                    return self._norm_spec(path, module, "rms", offset, eps)
                if _close(centred * (w + offset) + (0 if b is None else b), expected):
                    return self._norm_spec(path, module, "layer", offset, eps)
        raise UnsupportedFeature(
            path, f"norm {type(module).__name__} is neither RMSNorm nor LayerNorm", _HINT
        )

    def _norm_of_width(self, path: str, module: nn.Module, width: int) -> NormSpec:
        """``_norm`` of a norm over ``width`` channels (not the hidden size); a weightless one is probed
        at that width."""
        hidden = self.hidden
        self.hidden = width
        try:
            return self._norm(path, module)
        finally:
            self.hidden = hidden

    def _eps_candidates(self, module: nn.Module) -> list[float]:
        found = [
            getattr(module, name) for name in _EPS_NAMES if isinstance(getattr(module, name, None), float)
        ]
        if found:
            return found[:1]
        from_config = [v for n, v in self.fields.items() if "eps" in n and isinstance(v, float)]
        return [*dict.fromkeys([*from_config, 1e-5, 1e-6])]

    def _norm_spec(self, path: str, module: nn.Module, kind: str, offset: float, eps: float) -> NormSpec:
        fields = [name for name, value in self.fields.items() if "eps" in name and value == eps]
        eps_expression = f"config.{fields[0]}" if fields else repr(eps)
        builtin = type(module) is nn.LayerNorm
        if builtin and offset:
            raise UnsupportedFeature(path, "nn.LayerNorm with a weight offset", _HINT)
        weight = getattr(module, "weight", None)
        return NormSpec(
            class_name=type(module).__name__,
            kind=kind,  # type: ignore[arg-type]
            offset=offset,
            bias=isinstance(getattr(module, "bias", None), torch.Tensor),
            eps=eps_expression,
            builtin=builtin,
            head_weights=weight is not None and weight.dim() == 2,
            weight=weight is not None,
            fp32_weight=kind == "rms" and not offset and weight is not None and _weight_in_fp32(module, eps),
        )

    # ---------------------------------------------------------------------------------------- biases

    def _bias_expressions(self, layer: nn.Module, paths: list[str]) -> dict[str, str]:
        """Config expression of each linear's bias: the bool field that switches it, else a literal."""
        present = {path: layer.get_submodule(path).bias is not None for path in paths}
        found = {path: str(flag) for path, flag in present.items()}
        for name, value in self.fields.items():
            if not isinstance(value, bool) or "bias" not in name:
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, not value)
                rebuilt = self._rebuilt_layer(layer, flipped)
            except Exception:  # a field whose flip the config or the layer refuses tells nothing
                continue
            for path in paths:
                if (rebuilt.get_submodule(path).bias is not None) != present[path] and found[path] in (
                    "True",
                    "False",
                ):
                    found[path] = f"config.{name}" if present[path] == value else f"not config.{name}"
        return found

    def _module_flag(self, layer: nn.Module, path: str) -> str | None:
        """The bool config field without which the layer has no module at ``path`` (None: always built)."""
        for name, value in self.fields.items():
            if value is not True:
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, False)
                rebuilt = self._rebuilt_layer(layer, flipped)
            except Exception:  # a field whose flip the config or the layer refuses tells nothing
                continue
            try:
                rebuilt.get_submodule(path)
            except AttributeError:
                return f"config.{name}"
        return None

    # ---------------------------------------------------------------------------------------- rope

    def _rope(
        self,
        inner: nn.Module,
        prefix: str,
        rotary: tuple[str, nn.Module] | None,
        params: dict[str, Any] | None = None,
    ) -> RopeSpec | None:
        """The rotary module's layout, widths and RoPE types; ``params``: the RoPE parameters it
        was built from where they are not the config's own (one base of a per-layer list)."""
        if rotary is None:
            return None
        attr, module = rotary
        complex_table = _returns_complex(module, self.hidden)
        if complex_table:  # one complex table (freqs_cis): measured as the (cos, sin) it stands for
            module = _CosSinTables(module)
        self._rotary_module = module
        params = params if params is not None else getattr(self.tiny, "rope_parameters", None) or {}
        per_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        kinds = sorted(set(getattr(self.tiny, "layer_types", None) or [])) if per_layer_type else []
        # a layer type whose table is None has no RoPE (Cohere-Compass's, Beam's full-attention layers)
        self._nope_layer_types = tuple(kind for kind in kinds if params.get(kind) is None)
        if per_layer_type and len(self._nope_layer_types) == len(kinds):
            raise UnsupportedFeature(
                f"{prefix}.{attr}", "RoPE per layer type with no layer type using it", _HINT
            )
        tables = params.values() if per_layer_type else [params]
        rope_types = tuple(sorted({_rope_kind(table) for table in tables if table}))
        for rope_type in rope_types:
            if rope_type not in _ROPE_TYPES:
                raise UnsupportedFeature(f"{prefix}.{attr}", f"rope_type {rope_type!r}", _HINT)
        x = torch.zeros(1, 6, self.hidden)
        positions = torch.arange(6)[None] + 3
        layer_types = (
            [kind for kind in kinds if kind not in self._nope_layer_types] if per_layer_type else [None]
        )
        head_dim = self._head_dim()
        styles, widths = set(), {}  # widths: layer type -> rotary width of its table
        sin_first = self._sin_first(module, x, per_layer_type, layer_types)
        for layer_type in layer_types:
            kwargs = {"layer_type": layer_type} if per_layer_type else {}
            cos = module(x, positions, **kwargs)[1 if sin_first else 0]
            half = cos.shape[-1] // 2
            if torch.equal(cos[..., :half], cos[..., half:]):
                styles.add("neox")
            elif torch.equal(cos[..., ::2], cos[..., 1::2]):
                styles.add("interleaved")
            elif 2 * cos.shape[-1] == self._head_dim(layer_type) or not params:
                styles.add("half")  # each frequency once (GPT-OSS, GPT-J)
                widths[layer_type] = 2 * cos.shape[-1]
                continue
            else:
                raise UnsupportedFeature(
                    f"{prefix}.{attr}", "rotary tables in an unknown channel layout", _HINT
                )
            widths[layer_type] = cos.shape[-1]
        dims = set(widths.values())
        if len(styles) != 1 or (len(dims) != 1 and not per_layer_type):
            raise UnsupportedFeature(f"{prefix}.{attr}", "rotary layout differs between layer types", _HINT)
        rotary_dim = max(dims)
        partial = any(width != self._head_dim(layer_type) for layer_type, width in widths.items())
        layout = styles.pop()
        if not params:  # no rope_parameters: a base and a rotary dim the architecture fixes
            base, dim = self._fixed_rope(f"{prefix}.{attr}", module, rotary_dim, sin_first, layout)
            self.notes.append(f"RoPE base {base:g} on {dim}" + (", partial" if partial else ""))
            return RopeSpec(
                type(_raw(module)).__name__,
                attr,
                layout,
                layout,
                (),
                partial,
                False,
                sin_first,
                base,
                dim,  # type: ignore[arg-type]
            )
        # the rotary width of each table: head_dim * its partial_rotary_factor, or what transformers'
        # function for its rope_type builds (proportional RoPE: every channel, zero frequencies last)
        expected = {
            self._table_width(table, layer_type, self._head_dim(layer_type))
            for layer_type, table in (
                [(t, params[t]) for t in layer_types] if per_layer_type else [(None, params)]
            )
        }
        if dims != expected:
            raise UnsupportedFeature(
                f"{prefix}.{attr}",
                f"rotary dim {sorted(dims)} is not head_dim ({head_dim}) * partial_rotary_factor",
                _HINT,
            )
        for layer_type in layer_types:
            table = params[layer_type] if layer_type else params
            self._check_tables(f"{prefix}.{attr}", module, layer_type, table, sin_first, layout)
        self.notes.append(f"RoPE types {', '.join(rope_types)}" + (", partial" if partial else ""))
        return RopeSpec(
            type(_raw(module)).__name__,
            attr,
            layout,
            layout,
            rope_types,
            partial,
            per_layer_type,
            sin_first,  # type: ignore[arg-type]
            complex_table=complex_table,
            nope_layer_types=self._nope_layer_types,
        )

    def _table_width(self, table: dict[str, Any], layer_type: str | None, head_dim: int) -> int:
        """Channels a rotary table of ``table``'s parameters covers (twice its inverse frequencies)."""
        rope_type = _rope_kind(table)
        if rope_type in ("default", "ntk_alpha") or rope_type not in ROPE_INIT_FUNCTIONS:
            return int(head_dim * table.get("partial_rotary_factor", 1.0))
        config = copy.deepcopy(layer_type_config(self.tiny, layer_type))
        config.rope_parameters = {**config.rope_parameters, layer_type: table} if layer_type else table
        try:
            inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](
                config, **({"layer_type": layer_type} if layer_type else {})
            )
        except Exception:  # the function needs fields this config lacks: the usual width
            return int(head_dim * table.get("partial_rotary_factor", 1.0))
        return 2 * inv_freq.shape[-1]

    def _expected_cos(
        self, table: dict[str, Any], layer_type: str | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """``cos(position * inv_freq) * scaling`` (one column per frequency) with the inverse
        frequencies the lean file computes from ``table``: transformers' function for its
        rope_type, else the default ``rope_theta^(-2i/dim)``."""
        rope_type = _rope_kind(table)
        if rope_type in ("default", "ntk_alpha"):
            head_dim = self._head_dim(layer_type)
            dim = int(head_dim * table.get("partial_rotary_factor", 1.0))
            base = table["rope_theta"]
            if rope_type == "ntk_alpha":  # a fixed alpha stretches the base: theta * alpha^(d / (d - 2))
                base = base * table["alpha"] ** (head_dim / (head_dim - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            scaling = 1.0
        else:
            config = copy.deepcopy(layer_type_config(self.tiny, layer_type))
            if layer_type:
                config.rope_parameters = {**config.rope_parameters, layer_type: table}
            else:
                config.rope_parameters = table
            kwargs = {"layer_type": layer_type} if layer_type else {}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, **kwargs)
        return (positions[..., None].float() * inv_freq.float()).cos() * scaling

    @staticmethod
    def _cos_columns(tables: Any, sin_first: bool, layout: str) -> torch.Tensor:
        """One column per frequency of a rotary module's cos table."""
        cos = tables[1 if sin_first else 0].float()
        if layout == "half":
            return cos
        return cos[..., ::2] if layout == "interleaved" else cos[..., : cos.shape[-1] // 2]

    def _check_tables(
        self,
        path: str,
        module: nn.Module,
        layer_type: str | None,
        table: dict[str, Any],
        sin_first: bool,
        layout: str,
    ) -> None:
        """The module's cos table is the one the lean file computes from ``table``
        (``_expected_cos``); a module that computes its own variant is refused by name."""
        rope_type = table.get("rope_type", "default")
        positions = torch.arange(6)[None] + 3
        with torch.no_grad():
            tables = module(
                torch.zeros(1, 6, self.hidden),
                positions,
                **({"layer_type": layer_type} if layer_type else {}),
            )
        if not _close(
            self._cos_columns(tables, sin_first, layout), self._expected_cos(table, layer_type, positions)
        ):
            extra = sorted(set(table) - _ROPE_KEYS)
            raise UnsupportedFeature(
                path,
                f"rotary tables differ from transformers' rope_type {rope_type!r}"
                + (f" (the module also reads {', '.join(extra)})" if extra else ""),
                _HINT,
            )

    def _rope_bases(self, prefix: str, rotary: tuple[str, nn.Module], layers_path: str) -> RopeSpec:
        """One rotary module per RoPE base (a ModuleList, Granite-SWA's): the first module's layout
        and tables, and the per-layer config list that gives each layer its base (0: no RoPE)."""
        attr, modules = rotary
        path = f"{prefix}.{attr}"
        params = getattr(self.tiny, "rope_parameters", None) or {}
        if "rope_theta" not in params:
            raise UnsupportedFeature(path, "one rotary module per RoPE base without one rope_theta", _HINT)
        num_layers = self.tiny.num_hidden_layers
        lists = [
            name
            for name, value in self.fields.items()
            if isinstance(value, list)
            and len(value) == num_layers
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ]
        bases = dict.fromkeys([params["rope_theta"], *(v for name in lists for v in self.fields[name] if v)])
        rope = None
        for base in bases:  # the base the first module was built with
            with contextlib.suppress(UnsupportedFeature):
                rope = self._rope(self.stack, prefix, (attr, modules[0]), {**params, "rope_theta": base})
                break
        if rope is None:
            raise UnsupportedFeature(path, "rotary tables of no base in the config", _HINT)
        field = next((name for name in lists if self._gives_bases(name, layers_path, rope)), None)
        if field is None:
            raise UnsupportedFeature(
                path, "one rotary module per RoPE base, from no per-layer config list", _HINT
            )
        self._base_field = field
        self.notes.append(f"RoPE base per layer from config.{field} (0: no RoPE)")
        return dataclasses.replace(rope, base_field=field)

    def _gives_bases(self, name: str, layers_path: str, rope: RopeSpec) -> bool:
        """Whether config list ``name`` gives each layer its RoPE base: the model rebuilt with telling
        values there (no RoPE on the first layer, distinct bases elsewhere, then distinct bases on all
        layers) hands each layer no tables where the value is 0 and the tables of its base elsewhere."""
        params = self.tiny.rope_parameters
        base, count = float(params["rope_theta"]), self.tiny.num_hidden_layers
        positions = torch.arange(6)[None]
        for values in (
            [0.0] + [base * (i + 2) for i in range(count - 1)],
            [base * (i + 2) / 2 for i in range(count)],
        ):
            variant = copy.deepcopy(self.tiny)
            setattr(variant, name, values)
            try:
                model = AutoModelForCausalLM.from_config(
                    variant, attn_implementation="eager", dtype=torch.float32
                )
                paths = [f"{layers_path}.{i}" for i in range(count)]
                calls = record_calls(
                    model.eval(),
                    paths,
                    input_ids=torch.ones(1, 6, dtype=torch.long),
                    position_ids=positions,
                    use_cache=False,
                )
            except Exception:  # transformers does not take these values: not the list of bases
                return False
            for value, layer_path in zip(values, paths, strict=True):
                call = calls[layer_path][0] if calls[layer_path] else None
                tables = None if call is None else call.kwargs.get("position_embeddings")
                if value == 0:
                    if tables is not None:
                        return False
                    continue
                if tables is None:
                    return False
                expected = self._expected_cos({**params, "rope_theta": value}, None, positions)
                if not _close(self._cos_columns(tables, rope.sin_first, rope.table_layout), expected):
                    return False
        return True

    @staticmethod
    def _sin_first(module: nn.Module, x: torch.Tensor, per_layer_type: bool, layer_types: list[Any]) -> bool:
        """At position 0 cos is 1 and sin 0: which of the two the module returns first."""
        kwargs = {"layer_type": layer_types[0]} if per_layer_type else {}
        with torch.no_grad():
            first, second = module(x[:, :1], torch.zeros(1, 1, dtype=torch.long), **kwargs)
        return bool(torch.all(first == 0) and torch.all(second == 1))

    def _fixed_rope(
        self, path: str, module: nn.Module, rotary_dim: int, sin_first: bool, layout: str
    ) -> tuple[float, str]:
        """Base and rotary-dim expression of a rotary module that reads no ``rope_parameters``: the
        base from the angle of the second frequency at position 1, the dim from an int config field
        (or the head dim); the tables are then checked against ``position * base^(-2i/dim)``."""
        positions = torch.arange(7)[None]
        with torch.no_grad():
            tables = module(torch.zeros(1, 7, self.hidden), positions)
        sin = (tables[0] if sin_first else tables[1]).double()
        cos = (tables[1] if sin_first else tables[0]).double()
        if layout != "half":
            raise UnsupportedFeature(
                path, "rotary tables without rope_parameters in a repeated layout", _HINT
            )
        angles = torch.atan2(sin[0, 1], cos[0, 1])
        if rotary_dim < 4 or angles[1] <= 0:
            raise UnsupportedFeature(path, f"rotary dim {rotary_dim} too small to measure the base", _HINT)
        base = float(f"{float(angles[1] ** (-rotary_dim / 2)):.6g}")
        fields = [
            f"config.{name}"
            for name, value in self.fields.items()
            if value == rotary_dim and isinstance(value, int) and "rot" in name
        ]
        head_dim = 'getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads'
        dim = fields[0] if fields else head_dim if rotary_dim == self._head_dim() else None
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        expected = positions[0, :, None].double() * inv_freq
        if dim is None or not torch.allclose(expected.cos(), cos[0], atol=1e-5):
            raise UnsupportedFeature(path, "rotary tables from no known base and dim", _HINT)
        return base, dim

    def _head_dim(self, layer_type: str | None = None) -> int:
        """The head dim of the first layer, or of the layers of ``layer_type`` (``per_layer_config``)."""
        config = layer_type_config(self.tiny, layer_type)
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # ---------------------------------------------------------------------------------------- attention

    def _attention(
        self, layer_path: str, layers: nn.ModuleList, rope: RopeSpec | None
    ) -> tuple[AttentionSpec, RopeSpec | None]:
        """The measured attention; where no template covers it, the construct that stops it named
        by what it is (a convolution, a composite module, per-head projections, own parameters)."""
        try:
            return self._attention_measured(layer_path, layers, rope)
        except UnsupportedFeature as err:
            layer = layers[0]
            attr = self._attention_attr(layer_path, layer)
            if not err.module_path.startswith(f"{layer_path}.{attr}"):  # not about this attention
                raise
            named = self._attention_extras(f"{layer_path}.{attr}", getattr(layer, attr), rope)
            if named is None:
                raise
            raise named from err

    def _attention_extras(
        self, path: str, attn: nn.Module, rope: RopeSpec | None = None
    ) -> UnsupportedFeature | None:
        linears = projections(attn)
        children = {
            n: c for n, c in attn.named_children() if n not in linears and not isinstance(c, nn.Dropout)
        }
        convolving = [n for n, c in children.items() if any(isinstance(m, nn.Conv1d) for m in c.modules())]
        if convolving:
            measured = attention_conv_refusal(self.model, path, convolving)
            if measured is not None:
                return measured
        for name, child in children.items():
            if any(isinstance(m, nn.Conv1d) for m in child.modules()):
                return UnsupportedFeature(
                    f"{path}.{name}",
                    f"short convolution {type(child).__name__} inside the attention (over the sequence,"
                    " on the q/k/v projections); no attention template covers it",
                    _HINT,
                )
            inner = projections(child)
            norms = [n for n, c in children.items() if c is not child and not list(c.children())]
            if list(child.children()) and len(inner) >= 2 and norms and not linears:
                # the layer's "attention" is a block holding the attention and norms (DBRX's
                # norm_attn_norm: norm_1, attn, norm_2, adding the residual itself)
                return UnsupportedFeature(
                    path,
                    f"{type(attn).__name__} wraps the attention {name} ({type(child).__name__}) with the"
                    f" layer norms {sorted(norms)} and a residual add inside one block; no decoder layout"
                    " template covers norms inside the attention block",
                    _HINT,
                )
            if list(child.children()):
                return UnsupportedFeature(
                    f"{path}.{name}",
                    f"module {type(child).__name__} with submodules {sorted(dict(child.named_children()))}"
                    " inside the attention (projections of its own, e.g. routed attention experts);"
                    " no attention template covers it",
                    _HINT,
                )
        own = sorted(n for n, _ in attn.named_parameters(recurse=False) if n != "sinks")
        heads = self.tiny.num_attention_heads
        per_head = [n for n, c in linears.items() if c.in_features == self.hidden and c.out_features == heads]
        gate = self._head_gate(attn, linears, per_head[0], rope) if per_head and not own else None
        if gate is not None:
            return UnsupportedFeature(
                f"{path}.{per_head[0]}",
                f"output gate per head and token, {gate}({per_head[0]}(x)) times each head's output;"
                " no attention template covers a gate of one value per head",
                _HINT,
            )
        if per_head:
            return UnsupportedFeature(
                f"{path}.{per_head[0]}",
                f"projection to one value per head and token{f' with parameters {own}' if own else ''}"
                " (a dynamic mask or bias on the attention scores); no attention template covers it",
                _HINT,
            )
        if own:
            return UnsupportedFeature(
                path,
                f"attention parameters {own} beside its projections (a learned change of the scores,"
                " e.g. differential attention's lambdas); no attention template covers it",
                _HINT,
            )
        return None

    def _head_gate(
        self, attn: nn.Module, linears: dict[str, Any], name: str, rope: RopeSpec | None
    ) -> str | None:
        """The activation (sigmoid or softplus) of a projection to one value per head that scales each
        head's output before the output projection (Laguna, LFM3), or of the q width that scales each
        channel (AFMoE), measured against the same call with that projection's weight zeroed; None
        where it is not such a gate."""
        outs = [
            n
            for n in linears
            if linears[n].out_features == self.hidden and linears[n].in_features != self.hidden
        ]
        outs = outs or [n for n in linears if n.startswith(("o_", "out", "dense"))]
        projection = linears[name].module
        if len(outs) != 1 or getattr(projection, "bias", None) is not None:
            return None
        before = linears[outs[0]].module
        gated = self._attention_call(attn, rope, {name: projection}, before)
        saved = projection.weight.detach().clone()
        try:
            with torch.no_grad():
                projection.weight.zero_()
            plain = self._attention_call(attn, rope, {}, before)
        finally:
            with torch.no_grad():
                projection.weight.copy_(saved)
        if "input" not in gated or "input" not in plain or name not in gated:
            return None
        heads = self.tiny.num_attention_heads
        scores = gated[name].float()
        shape = (*gated["input"].shape[:-1], heads, -1)
        for activation, at_zero in (("sigmoid", torch.sigmoid), ("softplus", F.softplus)):
            zero = float(at_zero(torch.zeros(())))
            # one value per head scales the head's channels; a gate of the q width, each channel
            factors = at_zero(scores).reshape(*shape[:-2], heads, -1)
            expected = plain["input"].reshape(shape) / zero * factors
            if _close(expected.reshape(gated["input"].shape), gated["input"]):
                return activation
        return None

    def _attention_measured(
        self, layer_path: str, layers: nn.ModuleList, rope: RopeSpec | None
    ) -> tuple[AttentionSpec, RopeSpec | None]:
        layer = layers[0]
        attr = self._attention_attr(layer_path, layer)
        path = f"{layer_path}.{attr}"
        attn = getattr(layer, attr)
        for index, other in enumerate(layers):  # a hybrid stack: another token mixer on some layers
            if not isinstance(getattr(other, attr, None), nn.Module):
                mixers = sorted(set(dict(other.named_children())) - set(dict(layer.named_children())))
                raise UnsupportedFeature(
                    path.replace(".0.", f".{index}.", 1).rsplit(".", 1)[0],
                    f"layer {index} mixes tokens with {mixers} instead of {attr} (layers of one class"
                    " with different token mixers: a hybrid stack no template covers)",
                    _HINT,
                )
        _refuse_weightless_selectors(layer_path, layers, attr)
        weights = [{name for name, _ in getattr(other, attr).named_parameters()} for other in layers]
        partial = sorted(set.union(*weights) - set.intersection(*weights))
        sinks_flag = self._sinks_condition(layers, attr, weights) if partial == ["sinks"] else None
        if sinks_flag is not None:  # sink logits on some layers only (MiMo-V2: sliding-window layers)
            partial = []
        modules = {name.split(".", 1)[0] for name in partial if "." in name}
        kv_sharing = (
            self._kv_sharing(layer_path, layers, attr, weights, partial) if len(modules) > 1 else None
        )
        if kv_sharing is not None:  # layers without key/value projections read another layer's
            partial = []
        if partial and (len(partial) != 1 or "." in partial[0]):  # one vector of its own: a bias?
            raise self._partial_weights(path, weights, partial)
        heads, head_dim = self.tiny.num_attention_heads, self._head_dim()
        q_size = heads * head_dim
        linears = projections(attn)
        inner_attr = _wrapped_attention(attn) if not linears else None
        if inner_attr is not None:  # GPT-Neo: the layer's attention only wraps the attention module
            wrapper, attn, path = attn, getattr(attn, inner_attr), f"{path}.{inner_attr}"
            linears = projections(attn)
        norms = {
            n: c
            for n, c in attn.named_children()
            if n not in linears and not isinstance(c, nn.Dropout) and not _holds_inv_freq(c)
        }  # a rotary module of its own (RecurrentGemma's) is measured as the model's
        key_bias = _key_bias_parts(attn, linears, head_dim)
        if key_bias is not None:  # its projection reads the values, not the hidden states
            linears = {n: c for n, c in linears.items() if n != key_bias[0]}
        separate = ["q_proj", "k_proj", "v_proj"]
        gate_kind, gate_name, gate_activation = "none", None, "sigmoid"
        if {"k_proj", "v_proj"} <= set(linears):
            query, gate_kind, gate_name = self._query_and_gate(path, attn, linears, q_size, rope)
            # the gate's activation measured where it can be; a separate gate's sigmoid the probe confirms
            if gate_name is not None:
                gate_activation = self._head_gate(attn, linears, gate_name, rope) or "sigmoid"
            ins = [query, "k_proj", "v_proj"]
            separate = ins
            kv_heads = linears["k_proj"].out_features // head_dim
        else:
            ins = [
                n
                for n, c in linears.items()
                if c.in_features == self.hidden and c.out_features > q_size and c.out_features % head_dim == 0
            ]
            kv_heads = (linears[ins[0]].out_features // head_dim - heads) // 2 if len(ins) == 1 else 0
            roles = self._separate_roles(path, linears) if not ins and rope is None else None
            if roles is not None:  # q, k, v and output under names that say nothing (CTRL's Wq, ...)
                ins = separate = list(roles[:3])
                kv_heads = heads
        outs = [n for n in linears if n not in ins and n != gate_name]
        fused = ins != separate
        if not ins and _shared_stores(attn) and not any(n.startswith(("k", "v")) for n in linears):
            raise UnsupportedFeature(
                path,
                f"attention without key/value projections ({', '.join(sorted(linears))} only) on every layer:"
                f" keys and values come from another model through {', '.join(_shared_stores(attn))} (a"
                " draft model for speculative decoding, not a standalone causal LM)",
                "onboard the target model; its assistant runs beside it",
            )
        if len(ins) != 1 + 2 * (not fused) or len(outs) != 1 or kv_heads < 1 or heads % kv_heads:
            raise UnsupportedFeature(path, f"attention projections {sorted(linears)}", _HINT)
        kv_size = kv_heads * head_dim
        widths = [linears[n].out_features for n in ins]
        q_width = 2 * q_size if gate_kind == "per_head" else q_size
        v_dim, v_dim_expr = head_dim, None
        if not fused and widths[:2] == [q_width, kv_size] and widths[2] != kv_size:
            v_dim_expr = self._v_head_dim(f"{path}.{ins[2]}", widths[2], kv_heads, kv_size)
            v_dim, widths[2] = widths[2] // kv_heads, kv_size
        if widths != ([q_width, kv_size, kv_size] if not fused else [q_size + 2 * kv_size]):
            raise UnsupportedFeature(path, f"projection widths {widths} != heads x head_dim", _HINT)
        if (linears[outs[0]].in_features, linears[outs[0]].out_features) != (heads * v_dim, self.hidden):
            raise UnsupportedFeature(
                f"{path}.{outs[0]}", "output projection is not heads x head_dim -> hidden", _HINT
            )
        out_bias, out_bias_flag = "", None
        if partial:  # a vector on some layers only: measured as the attention output's bias or refused
            out_bias_flag = self._output_bias(layer_path, layers, attr, partial[0], outs[0], weights, rope)
            if out_bias_flag is None or inner_attr:
                raise self._partial_weights(path, weights, partial)
            out_bias = partial[0]
        inside = f"{attr}.{inner_attr}" if inner_attr else attr
        biases = {
            key.replace(inside, attr, 1): value
            for key, value in self._bias_expressions(
                layer, [f"{inside}.{n}" for n in [*linears, *(key_bias or ())[:1]]]
            ).items()
        }
        projections_spec = tuple(LinearSpec(n, biases[f"{attr}.{n}"], linears[n].transposed) for n in ins)
        differential, differential_norm_name = self._differential_parts(path, attn, norms, head_dim)
        differential_norm = (
            self._norm(f"{path}.{differential_norm_name}", norms.pop(differential_norm_name))
            if differential_norm_name
            else None
        )
        out_norm_name = self._attention_out_norm(path, attn, norms, outs[0], rope)
        out_norm = self._norm(f"{path}.{out_norm_name}", norms.pop(out_norm_name)) if out_norm_name else None
        v_norm_name, v_norm_eps = self._v_norm(path, norms, head_dim)
        qk_norm, qk_names, per_head = self._qk_norm(path, norms, head_dim, q_size)
        real = self._real_heads()
        kind = (
            "mha"
            if real["num_kv_heads"] == real["num_heads"]
            else "mqa"
            if real["num_kv_heads"] == 1
            else "gqa"
        )
        self.notes.append(f"attention {kind.upper()}, {real['num_heads']} heads of {real['head_dim']}")
        if any(linear.transposed for linear in linears.values()):
            self.notes.append("Conv1D projections, weights stored transposed")
        scaling, scale = self._scaling(path, attn, head_dim)
        scaling = self._scaling_flags(path, layer, attr, scaling, scale)
        uses_rope = self._uses_rope(layers, attr, rope)
        chunk_expr = self._measured_chunk(layer_path, layers, attr, inner_attr)
        spec = AttentionSpec(
            class_name=type(attn).__name__,
            attr=attr,
            inner_attr=inner_attr,
            wrapper_class=type(wrapper).__name__ if inner_attr else None,
            kind=kind,
            projections=projections_spec,
            out=LinearSpec(outs[0], biases[f"{attr}.{outs[0]}"], linears[outs[0]].transposed),
            fused_qkv=fused,
            scaling=scaling,
            qk_norm=qk_norm,
            qk_norm_names=qk_names,
            qk_norm_per_head=per_head,
            qk_norm_flag=self._qk_norm_flag(layers, attr, qk_names[0]) if qk_norm else None,
            sliding=self._sliding(path),
            sliding_expr=None if chunk_expr else self._measured_window(layer_path, layers, attr, inner_attr),
            chunk_expr=chunk_expr,
            softcap=self._attention_softcap(),
            rope_flag=self._rope_flag(path, uses_rope) if rope is not None else None,
            sinks=isinstance(getattr(attn, "sinks", None), torch.Tensor) or sinks_flag is not None,
            sinks_flag=sinks_flag,
            kv_source=kv_sharing[0] if kv_sharing else None,
            kv_own=kv_sharing[1] if kv_sharing else (),
            v_head_dim=v_dim_expr,
            kv_heads=self._per_layer_kv_heads(
                path, [getattr(other, attr) for other in layers], kv_heads, head_dim, fused
            ),
            output_gate=gate_kind,  # type: ignore[arg-type]
            gate=LinearSpec(gate_name, biases[f"{attr}.{gate_name}"]) if gate_name else None,
            gate_activation=gate_activation,  # type: ignore[arg-type]
            out_norm=out_norm,
            out_norm_name=out_norm_name or "",
            differential=differential,
            out_bias=out_bias,
            out_bias_flag=out_bias_flag,
            differential_norm=differential_norm,
            differential_norm_name=differential_norm_name,
            v_norm_eps=v_norm_eps,
            v_norm_name=v_norm_name,
            key_bias=key_bias,
            gate_bias=_gate_head_bias(attn, heads) if gate_kind == "separate" else "",
            **real,
        )
        if gate_kind != "none":
            self.notes.append(f"attention output gated by {gate_activation} ({gate_kind.replace('_', ' ')})")
        if out_norm is not None:
            self.notes.append(f"attention output normalised ({out_norm_name}) before {outs[0]}")
        if key_bias is not None:
            spec = self._key_bias(path, attn, spec, biases[f"{attr}.{key_bias[0]}"], rope)
        if rope is not None:
            index = uses_rope.index(True) if True in uses_rope else 0
            spec, rope = self._probe_attention(path, index, layers[index], spec, scale, rope, kv_heads)
            self._confirm_key_bias_window(path, attn, spec, scale, rope, kv_heads)
            self._confirm_differential(path, layers, spec, scale, rope, kv_heads)
            spec = self._position_scale(path, index, layers[index], spec, scale, rope, kv_heads)
            spec = self._nope_temperature(path, layers, uses_rope, spec, scale, rope, kv_heads)
        else:
            spec = self._probe_plain_attention(path, layer, spec, scale, kv_heads)
        if spec.fused_qkv:
            spec = dataclasses.replace(spec, qkv_switches=self._qkv_switches(path, layer, spec, rope))
        if spec.fused_qkv and spec.qkv_order != ("q", "k", "v") or spec.qkv_groups != "1":
            self.notes.append(f"fused qkv in {spec.qkv_groups} group(s) of {'/'.join(spec.qkv_order)}")
        return spec, rope

    def _separate_roles(self, path: str, linears: dict[str, Any]) -> tuple[str, str, str, str] | None:
        """(q, k, v, output) of four hidden -> hidden projections named otherwise, measured on the
        attention's call inside one forward of the model (``separate_qkv_roles``)."""
        input_ids = torch.arange(12).reshape(2, 6) % (self.tiny.vocab_size - 1) + 1
        try:
            (call, *_) = record_calls(
                self.model,
                [path],
                input_ids=input_ids,
                position_ids=torch.arange(6)[None].expand(2, 6),
                use_cache=False,
            )[path]
        except (ValueError, RuntimeError, TypeError):  # not called once on its own: no evidence
            return None
        roles = separate_qkv_roles(
            self.model.get_submodule(path), linears, (call.args, call.kwargs), self.hidden
        )
        if roles is not None:
            self.notes.append(
                f"separate q/k/v projections {'/'.join(roles[:3])}, output {roles[3]} (measured)"
            )
        return roles

    def _kv_sharing(
        self, layer_path: str, layers: nn.ModuleList, attr: str, weights: list[set[str]], partial: list[str]
    ) -> tuple[str, tuple[str, ...]] | None:
        """(source expression, own attributes) where the layers lacking the ``partial`` weights read the
        keys and values of an earlier layer that has them (measured, :mod:`analyze_kv_sharing`), and the
        config expression over ``layer_idx`` of each layer's source reproduces the measurement; None
        otherwise. The sources are kept on the analyzer (``_kv_sources``) for the per-layer probes."""
        stack = layer_path.rsplit(".", 1)[0]  # layer_path: the first layer's
        paths = [f"{stack}.{i}.{attr}" for i in range(len(layers))]
        try:
            sources = measure_kv_sources(self.model, paths, self.tiny.vocab_size)
        except Exception:  # noqa: BLE001 - the model runs no attention function of ours: no evidence
            return None
        if sources is None:
            return None
        lacking = [i for i, names in enumerate(weights) if not set(partial) <= names]
        if any((sources[i] != i) != (i in lacking) for i in range(len(layers))) or not lacking:
            return None

        def measure(variant: PretrainedConfig) -> list[int] | None:
            torch.manual_seed(0)
            return measure_kv_sources(
                AutoModelForCausalLM.from_config(variant).eval(), paths, self.tiny.vocab_size
            )

        expression = kv_source_expression(self.tiny, sources, measure)
        if expression is None:
            return None
        self._kv_sources = sources
        own = tuple(sorted({name.split(".", 1)[0] for name in partial}))
        self.notes.append(
            f"cross-layer KV sharing (measured): layers {lacking} read the keys and values of layers"
            f" {[sources[i] for i in lacking]} ({expression})"
        )
        return expression, own

    def _partial_weights(self, path: str, weights: list[set[str]], partial: list[str]) -> UnsupportedFeature:
        """The refusal of weights only some layers have, naming what the layers without them lack."""
        extra = partial[0]
        index = next(i for i, names in enumerate(weights) if (extra in names) != (extra in weights[0]))
        where = path if extra in weights[0] else path.replace(".0.", f".{index}.", 1)
        having = [i for i, names in enumerate(weights) if extra in names]
        lacking = [i for i in range(len(weights)) if i not in having]
        modules = sorted({name.rsplit(".", 1)[0] for name in partial if "." in name})
        if {"k_proj", "v_proj"} <= set(modules):  # no own keys and values: read another layer's
            return UnsupportedFeature(
                path.replace(".0.", f".{lacking[0]}.", 1),
                f"layers {lacking} of {len(weights)} have no k_proj / v_proj: they reuse another layer's keys"
                " and values (cross-layer KV sharing), which no attention template covers",
                _HINT,
            )
        return UnsupportedFeature(
            f"{where}.{extra}",
            f"attention weights only some layers have ({', '.join(partial)}): layers {having} of"
            f" {len(weights)} in the tiny config",
            _HINT,
        )

    def _output_bias(
        self,
        layer_path: str,
        layers: nn.ModuleList,
        attr: str,
        name: str,
        out: str,
        weights: list[set[str]],
        rope: RopeSpec | None,
    ) -> str | None:
        """A vector ``name`` only some layers' attention holds, measured as a bias the layer adds to the
        attention output (the same layer output as the output projection with that bias), and the config
        expression over ``layer_idx`` that says which layers hold it; None where it is neither."""
        having = [i for i, names in enumerate(weights) if name in names]
        layer = copy.deepcopy(layers[having[0]])
        attn = getattr(layer, attr)
        vector, projection = getattr(attn, name, None), getattr(attn, out, None)
        if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != (self.hidden,):
            return None
        generator = torch.Generator().manual_seed(11)
        x = torch.randn(2, 5, self.hidden, generator=generator)
        positions = torch.arange(5)[None]
        inputs: dict[str, Any] = {"attention_mask": None, "position_ids": positions}
        if rope is not None:
            kwargs = {"layer_type": self.tiny.layer_types[having[0]]} if rope.per_layer_type else {}
            inputs["position_embeddings"] = _raw(self._rotary_module)(x, positions, **kwargs)
        shift = torch.randn(self.hidden, generator=generator)
        try:
            with torch.no_grad():
                vector.copy_(shift)
                with_vector = _first(_call_filled(layer, x, inputs, fill=None))
                vector.zero_()
                base = projection.bias if projection.bias is not None else torch.zeros(())
                projection.bias = nn.Parameter(base + shift)
                with_bias = _first(_call_filled(layer, x, inputs, fill=None))
        except Exception:  # a layer that needs other inputs: refused by the caller
            return None
        if not _close(with_vector, with_bias):
            return None
        flag = self._layer_condition(layers[0], attr, name, having, len(layers))
        if flag is not None:
            self.notes.append(f"{attr}.{name}: a bias of the attention output on the layers where {flag}")
        return flag

    def _layer_condition(
        self, layer: nn.Module, attr: str, name: str, having: list[int], count: int
    ) -> str | None:
        """The config expression over ``layer_idx`` true on exactly the layers ``having`` of ``count``:
        the last or first layer (confirmed on a deeper rebuild of the layer class), or a per-layer
        config list."""
        candidates = ["layer_idx == config.num_hidden_layers - 1", "layer_idx == 0"]
        for field, value in self.fields.items():
            if isinstance(value, list) and len(value) == count:
                if all(isinstance(v, bool) for v in value):
                    candidates.append(f"config.{field}[layer_idx]")
                candidates += [
                    f'config.{field}[layer_idx] == "{kind}"'
                    for kind in sorted({v for v in value if isinstance(v, str)})
                ]
            elif isinstance(value, list) and value and all(_is_int(v) for v in value):
                candidates.append(f"layer_idx in config.{field}")

        def holds(expression: str, config: PretrainedConfig, layers: int) -> list[int]:
            scope = {"config": config}
            return [i for i in range(layers) if eval(expression, scope, {"layer_idx": i})]  # noqa: S307

        for expression in candidates:
            if holds(expression, self.tiny, count) != having:
                continue
            if "config.num_hidden_layers" not in expression and expression != "layer_idx == 0":
                return expression  # a per-layer list: the tiny config's list is the evidence
            deeper = copy.deepcopy(self.tiny)
            deeper.num_hidden_layers = count + 2
            try:
                built = [
                    name in dict(getattr(type(layer)(deeper, i), attr).named_parameters())
                    for i in range(count + 2)
                ]
            except Exception:  # the layer class needs more than (config, layer_idx): no evidence
                continue
            if [i for i, has in enumerate(built) if has] == holds(expression, deeper, count + 2):
                return expression
        return None

    def _differential_parts(
        self, path: str, attn: nn.Module, norms: dict[str, nn.Module], head_dim: int
    ) -> tuple[tuple[str, str, str, str] | None, str]:
        """Differential attention's parts, by shape: four own vectors of head_dim (the lambdas, in
        name order; the probe finds how they pair) and a weightless norm over 2 * head_dim (each head
        pair's output); (None, "") where the attention has not these."""
        own = {n: p for n, p in attn.named_parameters(recurse=False) if n != "sinks"}
        if len(own) != 4 or any(tuple(p.shape) != (head_dim,) for p in own.values()):
            return None, ""
        pair_norms = [
            n
            for n, c in norms.items()
            if not list(c.parameters()) and tuple(getattr(c, "normalized_shape", ())) == (2 * head_dim,)
        ]
        if len(pair_norms) != 1 or self.tiny.num_attention_heads % 2:
            return None, ""
        self.notes.append(
            f"differential attention (lambdas {', '.join(sorted(own))}, {pair_norms[0]} per head pair)"
        )
        return tuple(sorted(own)), pair_norms[0]  # type: ignore[return-value]

    @staticmethod
    def _differential_pairings(spec: AttentionSpec) -> list[AttentionSpec]:
        """Every way the four lambdas can form ``exp(a.b) - exp(c.d)``: the candidates the probe tries."""
        if spec.differential is None:
            return [spec]
        found = []
        for a, b, c, d in itertools.permutations(spec.differential):
            if a < b and c < d and (a, b, c, d) not in found:  # a dot product is symmetric
                found.append((a, b, c, d))
        return [dataclasses.replace(spec, differential=order) for order in found]

    def _confirm_differential(
        self,
        path: str,
        layers: nn.ModuleList,
        spec: AttentionSpec,
        scale: float,
        rope: RopeSpec,
        kv_heads: int,
    ) -> None:
        """lambda_init depends on the layer: the matched math must hold on every layer of the tiny model."""
        if spec.differential is None:
            return
        for index, layer in enumerate(layers):
            kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
            attn = self._attn_module(layer, spec)
            with _telling_vectors([getattr(attn, name) for name in spec.differential]):
                probe = _AttentionProbe(
                    attn,
                    spec,
                    self.tiny,
                    scale,
                    kv_heads,
                    self._rotary_module,
                    rope,
                    rope.style,
                    kwargs,
                    layer_idx=index,
                )
                matched = probe.match(self._qkv_layouts(spec, kv_heads)[:1])
            if matched is None:
                raise UnsupportedFeature(
                    path.replace(".0.", f".{index}.", 1),
                    f"differential attention whose lambda_init is not {DIFFERENTIAL_LAMBDA_INIT} on layer {index}",
                    _HINT,
                )

    @staticmethod
    def _attn_module(layer: nn.Module, spec: AttentionSpec) -> nn.Module:
        """The module that holds the projections: the layer's attention, or the one it wraps."""
        attn = getattr(layer, spec.attr)
        return getattr(attn, spec.inner_attr) if spec.inner_attr else attn

    def _key_bias(
        self, path: str, attn: nn.Module, spec: AttentionSpec, bias: str, rope: RopeSpec | None
    ) -> AttentionSpec:
        """The spec with its bias per key (projection, vector, bias expression) and the int config
        field, if any, that limits a query row to its highest-bias keys: the one whose value set below
        the probe's sequence length changes the output of the rebuilt attention (the attention probe
        then confirms both)."""
        name, vector = spec.key_bias[:2]  # type: ignore[misc]
        spec = dataclasses.replace(spec, key_bias=(name, vector, bias))
        with _telling_vectors([getattr(attn, vector)]):
            plain = self._attention_call(attn, rope, {}).get("")
            state = {key: tensor.clone() for key, tensor in attn.state_dict().items()}
        if plain is None:
            raise UnsupportedFeature(path, "attention with a bias per key that cannot be called alone", _HINT)
        windows = []
        for field, value in self.fields.items():
            if not _is_int(value) or isinstance(value, bool) or value < 5:  # the call has 5 tokens
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, field, 2)
                rebuilt = type(attn)(flipped, 0).eval()
                rebuilt.load_state_dict(state)
            except Exception:  # noqa: BLE001 - a field the config or the attention refuses tells nothing
                continue
            windowed = self._attention_call(rebuilt, rope, {}).get("")
            if windowed is not None and not _close(windowed, plain):
                windows.append(f"config.{field}")
        if len(windows) > 1:
            raise UnsupportedFeature(path, f"bias per key limited by several config fields {windows}", _HINT)
        self.notes.append(
            f"bias per key/value head on the scores: exp({vector} * softplus({name}(values)))"
            + (f", the {windows[0]} highest-bias keys kept" if windows else "")
        )
        return dataclasses.replace(spec, key_bias_window=windows[0] if windows else None)

    def _confirm_key_bias_window(
        self, path: str, attn: nn.Module, spec: AttentionSpec, scale: float, rope: RopeSpec, kv_heads: int
    ) -> None:
        """The attention rebuilt with its key window below the probe's length matches the spec's math."""
        if spec.key_bias_window is None:
            return
        flipped = copy.deepcopy(self.tiny)
        setattr(flipped, spec.key_bias_window.removeprefix("config."), 3)
        rebuilt = type(attn)(flipped, 0).eval()
        rebuilt.load_state_dict(attn.state_dict())
        kwargs = {"layer_type": self.tiny.layer_types[0]} if rope.per_layer_type else {}
        with _telling_vectors([getattr(rebuilt, spec.key_bias[1])]):  # type: ignore[index]
            probe = _AttentionProbe(
                rebuilt, spec, flipped, scale, kv_heads, self._rotary_module, rope, rope.style, kwargs
            )
            if probe.match(self._qkv_layouts(spec, kv_heads)) is None:
                raise UnsupportedFeature(
                    path, f"bias per key whose window ({spec.key_bias_window}) keeps other keys", _HINT
                )

    def _query_and_gate(
        self, path: str, attn: nn.Module, linears: dict[str, Any], q_size: int, rope: RopeSpec | None
    ) -> tuple[str, str, str | None]:
        """(q projection, output-gate kind, gate projection) beside ``k_proj`` and ``v_proj``: the
        q projection is ``q_proj``, else the one other input projection; twice the q width holds a
        gate per head, a second input projection of the q width is a separate gate (the attention
        probe then confirms the wiring). The output projection, the one whose output the attention
        returns, is no candidate."""
        seen = self._attention_call(attn, rope, {n: c.module for n, c in linears.items()})
        result = seen.get("")
        if result is None and "q_proj" in linears:  # not callable on its own (RoPE from position_ids
            return "q_proj", "none", None  # inside it, GPT-J before 5.2x): the probe says what it needs
        outputs = [n for n in linears if result is not None and seen.get(n) is result]
        inputs = [
            n
            for n, c in linears.items()
            if c.in_features == self.hidden and n not in ("k_proj", "v_proj", *outputs)
        ]
        inputs = [n for n in inputs if linears[n].out_features in (q_size, 2 * q_size)]
        query = "q_proj" if "q_proj" in inputs else inputs[0] if len(inputs) == 1 else None
        if query is None:
            raise UnsupportedFeature(path, f"attention projections {sorted(linears)}", _HINT)
        others = [n for n in inputs if n != query]
        if linears[query].out_features == 2 * q_size and not others:
            return query, "per_head", None
        if (
            linears[query].out_features == q_size
            and len(others) == 1
            and linears[others[0]].out_features == q_size
        ):
            return query, "separate", others[0]
        heads = self.tiny.num_attention_heads
        scalars = [
            n
            for n, c in linears.items()
            if c.in_features == self.hidden
            and c.out_features == heads
            and n not in ("k_proj", "v_proj", *outputs)
        ]
        if not others and len(scalars) == 1 and self._head_gate(attn, linears, scalars[0], rope):
            return query, "head_scalar", scalars[0]  # one value per head and token scales each head
        if not others:
            return query, "none", None
        raise UnsupportedFeature(path, f"attention projections {sorted(linears)}", _HINT)

    def _attention_out_norm(
        self, path: str, attn: nn.Module, norms: dict[str, nn.Module], out: str, rope: RopeSpec | None
    ) -> str | None:
        """The attention child whose output is the output projection's input (BitNet's
        ``attn_sub_norm``), seen with forward hooks on one call; None when there is none."""
        if not norms:
            return None
        seen = self._attention_call(attn, rope, norms, getattr(attn, out))
        found = [n for n in norms if n in seen and "input" in seen and seen[n] is seen["input"]]
        return found[0] if len(found) == 1 else None

    def _attention_call(
        self,
        attn: nn.Module,
        rope: RopeSpec | None,
        modules: dict[str, nn.Module],
        before: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """One call of ``attn`` on random hidden states (with its RoPE tables): the output of each of
        ``modules`` by name, the input of ``before`` as "input" and the attention's output as "";
        empty for an attention that needs more inputs than these."""
        if _needs_recording(attn):
            return {}
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            module.register_forward_hook(lambda _m, _a, output, n=name: seen.setdefault(n, _first(output)))
            for name, module in modules.items()
        ]
        if before is not None:
            hooks.append(before.register_forward_pre_hook(lambda _m, args: seen.setdefault("input", args[0])))
        x = torch.randn(1, 5, self.hidden, generator=torch.Generator().manual_seed(6))
        try:
            with torch.no_grad():
                if rope is None:
                    seen[""] = _first(attn(x, attention_mask=None))
                else:
                    kwargs = {}
                    if rope.per_layer_type:  # a type the rotary module has tables for (not LFM3's "conv")
                        known = (
                            getattr(_raw(self._rotary_module), "layer_types", None) or self.tiny.layer_types
                        )
                        kwargs = {"layer_type": next(t for t in self.tiny.layer_types if t in known)}
                    tables = _raw(self._rotary_module)(x, torch.arange(5)[None], **kwargs)
                    extra = _position_ids(attn, torch.arange(5)[None])
                    seen[""] = _first(attn(x, position_embeddings=tables, attention_mask=None, **extra))
        except Exception:  # an attention that needs other inputs: the probe will tell
            return {}
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    def _attention_attr(self, layer_path: str, layer: nn.Module) -> str:
        """The layer's attention child: the one that takes ``position_embeddings`` (RoPE models), else
        the one that takes an ``attention_mask``."""
        attrs: list[str] = []
        for parameter in ("position_embeddings", "attention_mask"):
            attrs = [
                name
                for name, child in layer.named_children()
                if parameter in inspect.signature(child.forward).parameters
            ]
            if attrs:
                break
        if len(attrs) > 1:
            raise UnsupportedFeature(layer_path, f"expected one attention block, found {attrs}", _HINT)
        if not attrs:
            raise UnsupportedFeature(
                layer_path,
                "no attention block (a child taking position_embeddings or an attention_mask) among "
                + ", ".join(_describe_child(name, child) for name, child in layer.named_children()),
                _HINT,
            )
        return attrs[0]

    def _v_head_dim(self, path: str, width: int, kv_heads: int, kv_size: int) -> str:
        """The config expression of the value heads' width, where the value projection is not as wide
        as the keys' (MiMo-V2's ``v_head_dim``): the one int field of that value."""
        fields = [
            name
            for name, value in self.fields.items()
            if _is_int(value) and not isinstance(value, bool) and value * kv_heads == width
        ]
        fields.sort(key=lambda name: ("v" not in name.split("_"), name))
        if width % kv_heads or not fields:
            raise UnsupportedFeature(
                path,
                f"value projection of width {width}, keys of {kv_size}: value heads of another head dim"
                " than q/k from no config field",
                _HINT,
            )
        self.notes.append(f"value heads of config.{fields[0]} channels")
        return f"config.{fields[0]}"

    def _sinks_condition(self, layers: nn.ModuleList, attr: str, weights: list[set[str]]) -> str | None:
        """The config expression over ``layer_idx`` of the layers whose attention holds per-head sink
        logits ``sinks`` (the others have none); None where they are not such a vector."""
        having = [i for i, names in enumerate(weights) if "sinks" in names]
        sinks = getattr(getattr(layers[having[0]], attr), "sinks", None)
        if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (self.tiny.num_attention_heads,):
            return None
        flag = self._layer_condition(layers[0], attr, "sinks", having, len(layers))
        if flag is not None:
            self.notes.append(f"attention sinks on the layers where {flag}")
        return flag

    def _per_layer_kv_heads(
        self, path: str, attns: list[nn.Module], kv_heads: int, head_dim: int, fused: bool
    ) -> str:
        """The KV-head expression: the config's, or where some layers have a multiple of it (MiMo-V2's
        sliding-window layers: twice), that multiple on the layers a per-layer config list names."""
        base = self._kv_heads_expression(path, kv_heads)
        if overridden_fields(self.tiny):  # widths per layer config (Gemma 4): checked per layer later
            return base
        counts = [
            getattr(getattr(a, "k_proj", None), "out_features", kv_heads * head_dim) // head_dim
            for a in attns
        ]
        if fused or len(set(counts)) == 1:
            return base
        other = sorted(set(counts) - {kv_heads})
        where = path.replace(".0.", f".{counts.index(other[0])}.", 1)
        if len(other) != 1 or other[0] % kv_heads:
            raise UnsupportedFeature(
                where, f"KV heads per layer {counts}, not the config's or one multiple", _HINT
            )
        for field, value in self.fields.items():
            if not (isinstance(value, list) and len(value) == len(counts)):
                continue
            for kind in sorted({v for v in value if isinstance(v, str)}):
                if all((v == kind) == (c != kv_heads) for v, c in zip(value, counts, strict=True)):
                    factor = other[0] // kv_heads
                    self.notes.append(f"{factor}x KV heads on config.{field} == {kind!r} layers")
                    return f'{base} * {factor} if config.{field}[layer_idx] == "{kind}" else {base}'
        raise UnsupportedFeature(where, f"KV heads per layer {counts} from no per-layer config list", _HINT)

    def _kv_heads_expression(self, path: str, kv_heads: int) -> str:
        config_kv = getattr(self.tiny, "num_key_value_heads", None)
        if isinstance(config_kv, int) and config_kv == kv_heads:
            return derived_expression(self.tiny, "num_key_value_heads") or "config.num_key_value_heads"
        if kv_heads == self.tiny.num_attention_heads:
            return "config.num_attention_heads"
        raise UnsupportedFeature(path, f"{kv_heads} KV heads from no config field", _HINT)

    def _qkv_layouts(self, spec: AttentionSpec, kv_heads: int) -> list[tuple[str, int, tuple[str, ...]]]:
        """Candidate layouts of a fused q/k/v output: (groups expression, groups, part order)."""
        if not spec.fused_qkv:
            return [("1", 1, ("q", "k", "v"))]
        heads = self.tiny.num_attention_heads
        groups = [("1", 1), ("self.num_heads", heads), ("self.num_kv_heads", kv_heads)]
        orders = list(itertools.permutations(("q", "k", "v")))
        return [(expression, count, order) for expression, count in groups for order in orders]

    def _probe_attention(
        self,
        path: str,
        index: int,
        layer: nn.Module,
        spec: AttentionSpec,
        scale: float,
        rope: RopeSpec,
        kv_heads: int,
    ) -> tuple[AttentionSpec, RopeSpec]:
        """Match the HF attention output (no mask) with the spec's math; the match fixes the RoPE style
        (and a fused projection's layout)."""
        attn = self._attn_module(layer, spec)
        kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
        rotary = self._rotary_module
        # per-head q/k norms before or after RoPE: the same with unit weights (a rotation keeps the
        # RMS), so the probe runs on telling weights
        orders = (False, True) if spec.qk_norm is not None and spec.qk_norm_per_head else (False,)
        lambdas = [getattr(attn, name) for name in spec.differential or ()]
        if spec.key_bias is not None:  # zero at initialisation, where the bias is the same for every key
            lambdas.append(getattr(attn, spec.key_bias[1]))
        if spec.gate_bias:  # zero at initialisation too
            lambdas.append(getattr(attn, spec.gate_bias))
        # values times a constant the config holds (MiMo-V2's attention_value_scale): tried after none
        scales = [None] + [
            f"config.{name}"
            for name, value in self.fields.items()
            if isinstance(value, float) and value not in (0.0, 1.0)
        ]
        # keys times a constant the config holds (Falcon-H1's key_multiplier, before RoPE: a rotation
        # is linear, so it scales the logits): tried after none, folded into the attention scale
        key_scales = [(None, scale)] + [
            (f"config.{name}", scale * value)
            for name, value in self.fields.items()
            if isinstance(value, float) and value not in (0.0, 1.0) and "multiplier" in name
        ]
        with (
            _telling_norm_weights([getattr(attn, n, None) for n in spec.qk_norm_names]),
            _telling_vectors(lambdas),
        ):
            for (key_scale, logit_scale), value_scale, style, inverse, after, pairing in itertools.product(
                key_scales,
                scales,
                ("neox", "interleaved"),
                (False, True),
                orders,
                self._differential_pairings(spec),
            ):
                variant = dataclasses.replace(
                    pairing, rope_inverse=inverse, qk_norm_after_rope=after, value_scale=value_scale
                )
                if key_scale:
                    variant = dataclasses.replace(variant, scaling=f"{variant.scaling} * {key_scale}")
                probe = _AttentionProbe(
                    attn,
                    variant,
                    self.tiny,
                    logit_scale,
                    kv_heads,
                    rotary,
                    rope,
                    style,
                    kwargs,
                    layer_idx=index,
                )
                found = probe.match(self._qkv_layouts(variant, kv_heads))
                if found is not None:
                    self.notes.append(
                        f"RoPE rotates {style} channels" + (" by minus the angle" if inverse else "")
                    )
                    if after:
                        self.notes.append("q/k norms after RoPE")
                    if value_scale:
                        self.notes.append(f"values scaled by {value_scale}")
                    if key_scale:
                        self.notes.append(f"keys scaled by {key_scale} (folded into the attention scale)")
                    spec = self._confirm_groups(path, layer, variant, found, rope, style, kwargs)
                    return spec, dataclasses.replace(rope, style=style)
        raise UnsupportedFeature(
            path, "attention output matches no template (RoPE application, scale or wiring)", _HINT
        )

    def _position_scale(
        self,
        path: str,
        index: int,
        layer: nn.Module,
        spec: AttentionSpec,
        scale: float,
        rope: RopeSpec,
        kv_heads: int,
    ) -> AttentionSpec:
        """An attention that reads ``position_ids`` besides its RoPE tables: the same tables with far
        positions change its output where q is scaled by ``1 + beta * log(1 + floor(position /
        period))`` (Llama 4's attention temperature, Ministral3); beta and period are matched to
        config fields (``rope_parameters`` entries first)."""
        attn = getattr(layer, spec.attr)
        if "position_ids" not in inspect.signature(attn.forward).parameters:
            return spec
        if any(_holds_inv_freq(child) for child in attn.children()):
            return spec  # it reads them for its own RoPE tables (RecurrentGemma): the fit matched those
        kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
        rotary = self._rotary_module
        near = _AttentionProbe(attn, spec, self.tiny, scale, kv_heads, rotary, rope, rope.style, kwargs)
        far_positions = near.positions * 7919 + torch.tensor([[1, 2, 3, 4, 5, 6]])
        far = _AttentionProbe(
            attn, spec, self.tiny, scale, kv_heads, rotary, rope, rope.style, kwargs, positions=far_positions
        )
        if _close(near.expected, far.expected):
            return spec
        parameters = getattr(self.tiny, "rope_parameters", None) or {}
        found: dict[str, list[tuple[str, float]]] = {"float": [], "int": []}
        for prefix, fields in (("config.rope_parameters", parameters), ("config", self.fields)):
            for name, value in fields.items():
                expression = f'{prefix}["{name}"]' if prefix != "config" else f"config.{name}"
                if isinstance(value, float):
                    found["float"].append((expression, value))
                elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    found["int"].append((expression, value))
        layouts = self._qkv_layouts(spec, kv_heads)[:1]
        for (beta, beta_value), (period, period_value) in itertools.product(found["float"], found["int"]):
            far.q_scale = 1 + beta_value * torch.log(1 + torch.floor(far_positions / period_value))
            if far.match(layouts) is not None:
                self.notes.append(f"q scaled by position: 1 + {beta} * log(1 + floor(position / {period}))")
                return dataclasses.replace(spec, position_scale=(beta, period))
        raise UnsupportedFeature(
            path, "attention scaled by position_ids beside RoPE by no known formula", _HINT
        )

    def _nope_temperature(
        self,
        path: str,
        layers: nn.ModuleList,
        uses_rope: list[bool],
        spec: AttentionSpec,
        scale: float,
        rope: RopeSpec,
        kv_heads: int,
    ) -> AttentionSpec:
        """Layers without RoPE that scale q by the position they count themselves (Llama 4's
        attention temperature: ``1 + beta * log(1 + floor((position + 1) / period))``, position from
        0 in a call without cache): matched on the first NoPE layer against float (beta) and int
        (period) config fields, with the bool field that switches it off."""
        if spec.position_scale is not None or all(uses_rope) or spec.rope_flag is None:
            return spec
        index = uses_rope.index(False)
        layer = layers[index]
        layouts = self._qkv_layouts(spec, kv_heads)[:1]
        # the probe's tables are dropped; they come from a RoPE layer's type (a NoPE type may have none)
        rotary_kwargs = {}
        if rope.per_layer_type:
            rotary_kwargs["layer_type"] = self.tiny.layer_types[uses_rope.index(True)]

        def probe(module: nn.Module) -> _AttentionProbe:
            found = _AttentionProbe(
                self._attn_module(module, spec), spec, self.tiny, scale, kv_heads, self._rotary_module,
                rope, rope.style, rotary_kwargs, layer_idx=index,
            )  # fmt: skip
            found.tables = None  # a NoPE layer: q and k unrotated
            return found

        plain = probe(layer)
        if plain.match(layouts) is not None:
            return self._passed_q_scale(path.replace(".0.", f".{index}.", 1), spec)
        if _matches_without_tables(plain, layouts):  # the model, not the attention, skips RoPE here
            return self._passed_q_scale(path.replace(".0.", f".{index}.", 1), spec)
        floats = [(n, v) for n, v in self.fields.items() if isinstance(v, float)]
        ints = [(n, v) for n, v in self.fields.items() if _is_int(v) and not isinstance(v, bool) and v > 0]
        positions = torch.arange(plain.x.shape[1]).expand(plain.x.shape[0], -1).float()
        for (beta, beta_value), (period, period_value), offset in itertools.product(floats, ints, (1, 0)):
            plain.q_scale = 1 + beta_value * torch.log(1 + torch.floor((positions + offset) / period_value))
            if plain.match(layouts) is None:
                continue
            flag = None
            for name, value in self.fields.items():  # the bool field without which q is not scaled
                if value is not True:
                    continue
                flipped = copy.deepcopy(self.tiny)
                try:
                    setattr(flipped, name, False)
                    rebuilt = self._rebuilt_layer(layer, flipped)
                    rebuilt.load_state_dict(layer.state_dict())
                except Exception:  # noqa: BLE001 - a flip the config or the layer refuses tells nothing
                    continue
                if probe(rebuilt.eval()).match(layouts) is not None:
                    flag = f"config.{name}"
                    break
            condition = "not self.use_rope" + (f" and {flag}" if flag else "")
            self.notes.append(
                f"q scaled on NoPE layers: 1 + config.{beta} * log(1 + floor((position + {offset}) /"
                f" config.{period}))" + (f" where {flag}" if flag else "")
            )
            return dataclasses.replace(
                spec,
                position_scale=(f"config.{beta}", f"config.{period}"),
                position_scale_offset=offset,
                position_scale_flag=condition,
            )
        raise UnsupportedFeature(
            path.replace(".0.", f".{index}.", 1),
            "NoPE attention scaled by position by no known formula",
            _HINT,
        )

    def _passed_q_scale(self, path: str, spec: AttentionSpec) -> AttentionSpec:
        """A NoPE attention whose model passes it a factor per query position (Beam's
        ``attention_scaling``, which scales q): recorded in one model forward at far positions and fitted
        to ``(1 + (position + offset) / period) ** beta`` with period a config field or a power of two
        and beta a config float or the literal fitted (rounded to 6 digits); the spec as it is where
        the call passes no such factor."""
        positions = torch.tensor([[0, 9, 300, 2047, 9000, 40000]])
        input_ids = torch.arange(6)[None] % (self.tiny.vocab_size - 1) + 1
        try:
            call = record_calls(
                self.model, [path], input_ids=input_ids, position_ids=positions, use_cache=False
            )[path][0]
        except Exception:  # noqa: BLE001 - a model that cannot run these positions passes nothing we read
            return spec
        passed = [
            value.flatten().double()
            for value in call.kwargs.values()
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() == 6
            and sorted(value.shape)[-1] == 6
        ]  # fmt: skip
        if len(passed) != 1 or torch.allclose(passed[0], torch.ones(6, dtype=torch.float64)):
            return spec
        scale = passed[0]
        periods = [
            (f"config.{n}", v)
            for n, v in self.fields.items()
            if _is_int(v) and not isinstance(v, bool) and v > 1
        ]
        periods += [(str(2**k), 2**k) for k in range(8, 17)]
        floats = {v: f"config.{n}" for n, v in self.fields.items() if isinstance(v, float)}
        for offset, (period, period_value) in itertools.product((1, 0), periods):
            steps = torch.log1p((positions[0].double() + offset) / period_value)
            beta = round(float(torch.log(scale[-1]) / steps[-1]), 6)  # from the farthest position
            if not torch.allclose(torch.exp(beta * steps), scale, rtol=1e-6, atol=0):  # fp32 factors
                continue
            if period.startswith("config.") and not self._period_follows(
                path, period, period_value, offset, beta
            ):
                continue  # a field that only happens to hold the constant
            beta_expr = floats.get(beta) or repr(beta)
            self.notes.append(
                f"q scaled on NoPE layers by the model: (1 + (position + {offset}) / {period}) ** {beta_expr}"
            )
            return dataclasses.replace(
                spec,
                position_scale=(beta_expr, period),
                position_scale_offset=offset,
                position_scale_flag="not self.use_rope",
                position_scale_power=True,
            )
        raise UnsupportedFeature(
            path, "NoPE attention scaled by a factor per position of no known formula", _HINT
        )

    def _period_follows(self, path: str, period: str, value: int, offset: int, beta: float) -> bool:
        """Whether the factor the model passes follows the config field ``period`` when it doubles."""
        flipped = copy.deepcopy(self.tiny)
        positions = torch.tensor([[0, 9, 300, 2047, 9000, 40000]])
        try:
            setattr(flipped, period.removeprefix("config."), 2 * value)
            model = AutoModelForCausalLM.from_config(flipped).eval()
            input_ids = torch.arange(6)[None] % (self.tiny.vocab_size - 1) + 1
            call = record_calls(model, [path], input_ids=input_ids, position_ids=positions, use_cache=False)[
                path
            ][0]
        except Exception:  # noqa: BLE001 - a config or model that refuses the change: not shown to follow
            return False
        expected = torch.exp(beta * torch.log1p((positions[0].double() + offset) / (2 * value)))
        return any(
            isinstance(v, torch.Tensor)
            and v.numel() == 6
            and torch.allclose(v.flatten().double(), expected, rtol=1e-6)
            for v in call.kwargs.values()
        )

    def _probe_plain_attention(
        self, path: str, layer: nn.Module, spec: AttentionSpec, scale: float, kv_heads: int
    ) -> AttentionSpec:
        """Attention without RoPE: the HF output (no mask) against the spec's math. A module without a
        ``scaling`` attribute may not scale its scores at all (GPT-Neo): 1.0 is tried too."""
        attn = self._attn_module(layer, spec)
        recorded = (self.model, path) if _needs_recording(attn) else None
        scales = [(spec.scaling, scale)] + ([("1.0", 1.0)] if not hasattr(attn, "scaling") else [])
        found = None
        for expression, value in scales:
            try:
                probe = _AttentionProbe(attn, spec, self.tiny, value, kv_heads, recorded_from=recorded)
            except (AttributeError, TypeError) as err:
                if "position_ids" in inspect.signature(attn.forward).parameters:  # GPT-J before 5.2x
                    raise UnsupportedFeature(
                        path,
                        "RoPE computed inside the attention from position_ids (no rotary module on the"
                        " model in this transformers release)",
                        "onboard with a transformers release whose model has a rotary module (5.25 has)",
                    ) from err
                raise
            found = probe.match(self._qkv_layouts(spec, kv_heads))
            if found is None and recorded is None:  # it masks causally by itself (OpenAI GPT): as called
                probe = _AttentionProbe(
                    attn, spec, self.tiny, value, kv_heads, recorded_from=(self.model, path)
                )
                found = probe.match(self._qkv_layouts(spec, kv_heads))
            if found is not None:
                if expression != spec.scaling:
                    self.notes.append("attention scores not scaled")
                spec = dataclasses.replace(spec, scaling=expression)
                break
        if found is None:
            raise UnsupportedFeature(path, "attention output matches no template (scale or wiring)", _HINT)
        if probe.matched_alibi:
            self.notes.append("ALiBi attention biases")
            spec = dataclasses.replace(spec, alibi=True)
        else:
            self.notes.append("attention without rotary embeddings")
        return self._confirm_groups(path, layer, spec, found)

    def _qkv_switches(
        self, path: str, layer: nn.Module, spec: AttentionSpec, rope: RopeSpec | None
    ) -> tuple[tuple[str, bool, str, tuple[str, ...]], ...]:
        """Bool config fields that lay the fused q/k/v out differently (GPT-BigCode's ``multi_query``):
        each flipped alone on a rebuilt layer, the layout measured again; where two switch, both
        flipped together fix which one wins. A flip whose attention no layout reproduces is noted."""
        base = (spec.qkv_groups, spec.qkv_order)
        found: list[tuple[str, bool, str, tuple[str, ...]]] = []
        for name, current in self.fields.items():
            if not isinstance(current, bool):
                continue
            layout = self._fused_layout({name: not current}, layer, spec, rope, path)
            if layout is None:
                continue
            if layout == "unmatched":
                self.notes.append(f"config.{name}={not current}: attention not reproduced by this file")
            elif layout == "other modules":
                self.notes.append(f"config.{name}={not current}: other layer modules, not built by this file")
            elif layout != base:
                found.append((name, not current, *layout))
        if len(found) > 1:
            found = self._switch_order(path, layer, spec, rope, found)
        return tuple(found)

    def _switch_order(
        self,
        path: str,
        layer: nn.Module,
        spec: AttentionSpec,
        rope: RopeSpec | None,
        found: list[tuple[str, bool, str, tuple[str, ...]]],
    ) -> list[tuple[str, bool, str, tuple[str, ...]]]:
        """The order of the switches (first true one wins) that every pair of flips agrees with."""
        pairs = {}
        for first, second in itertools.combinations(found, 2):
            pairs[(first[0], second[0])] = self._fused_layout(
                {first[0]: first[1], second[0]: second[1]}, layer, spec, rope, path
            )
        for order in itertools.permutations(found):
            rank = {switch[0]: i for i, switch in enumerate(order)}
            if all(
                layout == tuple(min((a, b), key=lambda s: rank[s[0]])[2:])
                for (name_a, name_b), layout in pairs.items()
                for a, b in [
                    (next(s for s in found if s[0] == name_a), next(s for s in found if s[0] == name_b))
                ]
            ):
                return list(order)
        raise UnsupportedFeature(path, "fused q/k/v layouts that config flags combine", _HINT)

    def _fused_layout(
        self,
        overrides: dict[str, Any],
        layer: nn.Module,
        spec: AttentionSpec,
        rope: RopeSpec | None,
        path: str,
    ) -> tuple[str, tuple[str, ...]] | str | None:
        """(groups, order) of the fused q/k/v of a layer rebuilt with ``overrides``; None when the
        config or layer refuses them or the layer has no such projection, "other modules" when the
        rebuilt layer has other parameters, "unmatched" when no layout reproduces its attention."""
        try:
            config = self._flip(overrides)
            rebuilt = self._rebuilt_layer(layer, config)
            weights = [{k for k in m.state_dict() if not k.endswith(".bias")} for m in (rebuilt, layer)]
            if weights[0] != weights[1]:
                return "other modules"  # the flip builds other modules: more than a layout
            attn = getattr(rebuilt, spec.attr).float().eval()
            fused = getattr(attn, spec.projections[0].name)
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            rotary = None
            if rope is not None:
                rotary = type(self._rotary_module)(config)
        except Exception:  # a flip the config or the layer refuses tells nothing
            return None
        kv_heads = (fused.weight.numel() // config.hidden_size // head_dim - heads) // 2
        if kv_heads < 1:
            return "unmatched"
        scale = getattr(attn, "scaling", head_dim**-0.5)
        kwargs = {"layer_type": config.layer_types[0]} if rope is not None and rope.per_layer_type else {}
        style = rope.style if rope is not None else "neox"
        counts = {"1": 1, "self.num_heads": heads, "self.num_kv_heads": kv_heads}
        if spec.qkv_groups.isdigit():
            counts[spec.qkv_groups] = int(spec.qkv_groups)
        orders = list(itertools.permutations(("q", "k", "v")))
        measured = (spec.qkv_groups, counts[spec.qkv_groups], spec.qkv_order)  # the base layout first
        candidates = [measured, *((g, count, order) for g, count in counts.items() for order in orders)]
        try:
            recorded = None
            if _needs_recording(attn):  # a whole model per flip: only for flags its class reads
                source = inspect.getsource(type(attn))
                if not any(name in source for name in overrides):
                    return None
                recorded = self._recording_model(config, path)
            probe = _AttentionProbe(
                attn, spec, config, scale, kv_heads, rotary, rope, style, kwargs, recorded_from=recorded
            )
            match = probe.match(candidates)
        except Exception:  # the flip changed more than the layout (another module, another call)
            return "unmatched"
        return "unmatched" if match is None else (match[0], match[2])

    @staticmethod
    def _recording_model(config: PretrainedConfig, path: str) -> tuple[nn.Module, str]:
        """A whole tiny model on ``config``, to record an attention that needs its model's inputs."""
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        return model.float().eval(), path

    def _confirm_groups(
        self,
        path: str,
        layer: nn.Module,
        spec: AttentionSpec,
        found: tuple[str, int, tuple[str, ...]],
        rope: RopeSpec | None = None,
        style: str = "neox",
        kwargs: dict[str, Any] | None = None,
    ) -> AttentionSpec:
        """A fused projection split into as many groups as the test config has (KV) heads: rebuild the
        layer with twice the heads to tell ``self.num_heads`` from a group count the model fixes."""
        groups, count, order = found
        spec = dataclasses.replace(spec, qkv_order=order)
        if groups == "1":
            return spec
        variant = copy.deepcopy(self.tiny)
        variant.num_attention_heads = 2 * self.tiny.num_attention_heads
        if getattr(variant, "num_key_value_heads", None) == self.tiny.num_attention_heads:
            variant.num_key_value_heads = variant.num_attention_heads
        try:
            rebuilt = copy.deepcopy(layer)
            setattr(
                rebuilt, spec.attr, getattr(self._rebuilt_layer(layer, variant), spec.attr).float().eval()
            )
            attn = getattr(rebuilt, spec.attr)
            rotary = None
            if rope is not None:
                rotary = type(self._rotary_module)(variant)
        except Exception as err:  # the layer refuses the variant: the group count stays unexplained
            raise UnsupportedFeature(path, f"fused q/k/v in {count} groups: {err}", _HINT) from err
        heads = variant.num_attention_heads
        head_dim = getattr(variant, "head_dim", None) or variant.hidden_size // heads
        width = getattr(attn, spec.projections[0].name).weight.numel() // self.hidden
        kv_heads = (width // head_dim - heads) // 2
        _, scale = self._scaling(path, attn, head_dim)
        recorded = self._recording_model(variant, path) if _needs_recording(attn) else None
        probe = _AttentionProbe(
            attn, spec, variant, scale, kv_heads, rotary, rope, style, kwargs or {}, recorded_from=recorded
        )
        candidates = [("self.num_heads", heads), ("self.num_kv_heads", kv_heads), (str(count), count)]
        confirmed = probe.match([(expression, value, order) for expression, value in candidates])
        if confirmed is None:
            raise UnsupportedFeature(path, f"fused q/k/v in {count} groups from no config field", _HINT)
        return dataclasses.replace(spec, qkv_groups=confirmed[0])

    def _real_heads(self) -> dict[str, int]:
        """Head counts and head dim of the analyzed config (the probes ran on a tiny copy)."""
        config = self.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}

    def _qk_norm(
        self, path: str, norms: dict[str, nn.Module], head_dim: int, q_size: int
    ) -> tuple[NormSpec | None, tuple[str, str], bool]:
        if not norms:
            return None, ("q_norm", "k_norm"), True
        names = sorted(norms, key=lambda n: (not n.startswith("q"), n))
        if len(names) == 1 and "norm" in type(norms[names[0]]).__name__.lower():
            weightless = not list(norms[names[0]].parameters())
            if weightless:  # one weightless norm for both q and k (Llama 4's qk_norm): per head, probed
                spec = self._norm(f"{path}.{names[0]}", norms[names[0]])
                self.notes.append("one weightless q/k norm per head, shared by q and k")
                return spec, (names[0], names[0]), True
            raise UnsupportedFeature(
                f"{path}.{names[0]}",
                f"one norm module {type(norms[names[0]]).__name__}{' without a weight' if weightless else ''}"
                " inside the attention, where q/k norms come in pairs (e.g. Llama 4's qk_norm, applied to both q"
                " and k); no attention template applies one norm module to both",
                _HINT,
            )
        if len(names) != 2 or not names[0].startswith("q") or not names[1].startswith("k"):
            raise UnsupportedFeature(path, f"attention submodules {sorted(norms)}", _HINT)
        spec = self._norm(f"{path}.{names[0]}", norms[names[0]])
        if self._norm(f"{path}.{names[1]}", norms[names[1]]) != spec:
            raise UnsupportedFeature(path, "q and k norms of different kinds", _HINT)
        weight = getattr(norms[names[0]], "weight", None)
        size = head_dim if weight is None else weight.shape[-1]  # weightless: per head, the probe checks
        if size not in (head_dim, q_size):
            raise UnsupportedFeature(f"{path}.{names[0]}", f"q norm over {size} channels", _HINT)
        self.notes.append("q/k norm " + ("per head" if size == head_dim else "over the projection"))
        return spec, (names[0], names[1]), size == head_dim

    def _qk_norm_flag(self, layers: nn.ModuleList, attr: str, name: str) -> str | None:
        """The config expression without which layer ``layer_idx`` has no q/k norm: a bool field, and
        where some layers lack the norm (Llama 4's NoPE layers), the per-layer config list that matches."""
        flag = self._module_flag(layers[0], f"{attr}.{name}")
        present = [isinstance(getattr(getattr(layer, attr), name, None), nn.Module) for layer in layers]
        if all(present):
            return flag
        for field, value in self.fields.items():
            if isinstance(value, list) and len(value) == len(present) and [bool(v) for v in value] == present:
                self.notes.append(f"q/k norm only on the layers config.{field} selects")
                return (
                    f"{flag} and bool(config.{field}[layer_idx])"
                    if flag
                    else f"bool(config.{field}[layer_idx])"
                )
        raise UnsupportedFeature(
            f"{attr}.{name}", "q/k norm on some layers only, selected by no config list", _HINT
        )

    def _v_norm(self, path: str, norms: dict[str, nn.Module], head_dim: int) -> tuple[str, str | None]:
        """A third norm beside the q/k norms whose name starts with ``v`` (Gemma 4's ``v_norm``): taken
        out of ``norms`` when it is a weightless RMSNorm over one head (the attention probe then checks
        that it normalises the value heads); (name, epsilon expression), or ("", None) for none."""
        names = [n for n in norms if n.startswith("v")]
        if len(norms) != 3 or len(names) != 1:
            return "", None
        name = names[0]
        spec = self._norm_of_width(f"{path}.{name}", norms[name], head_dim)
        if spec.kind != "rms" or spec.weight or spec.offset:
            raise UnsupportedFeature(
                f"{path}.{name}",
                f"value norm {type(norms[name]).__name__} ({spec.kind} norm"
                f"{' with a learned weight' if spec.weight else ''}); the attention template inlines only a"
                " weightless RMSNorm of each value head",
                _HINT,
            )
        del norms[name]
        self.notes.append(f"value heads normalised by a weightless RMSNorm ({name})")
        return name, spec.eps

    def _scaling(self, path: str, attn: nn.Module, head_dim: int) -> tuple[str, float]:
        measured = getattr(attn, "scaling", head_dim**-0.5)
        candidates = [
            ("config.attention_multiplier", self.fields.get("attention_multiplier")),
            ("config.query_pre_attn_scalar**-0.5", self._power(self.fields.get("query_pre_attn_scalar"))),
            ("self.head_dim**-0.5", head_dim**-0.5),
            ("1.0", 1.0),  # no scaling: q/k norms set the logits' scale (Gemma 4)
        ]
        for expression, value in candidates:
            if isinstance(value, float) and abs(value - measured) < 1e-9:
                return expression, value
        raise UnsupportedFeature(path, f"attention scale {measured} from no known config field", _HINT)

    def _scaling_flags(self, path: str, layer: nn.Module, attr: str, expression: str, value: float) -> str:
        """``expression`` with the bool config fields that switch the scale: flipping one and rebuilding
        the layer gives 1.0 (GPT-2's ``scale_attn_weights``) or divides it by ``layer_idx + 1``
        (``scale_attn_by_inverse_layer_idx``, seen on a rebuilt second layer)."""
        switched, divided = expression, None
        for name, current in self.fields.items():
            if not isinstance(current, bool):
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, not current)
                scales = [getattr(getattr(type(layer)(flipped, i), attr), "scaling", value) for i in (0, 1)]
            except Exception:  # a field whose flip the config or the layer refuses tells nothing
                continue
            if all(abs(scale - value) < 1e-12 for scale in scales):
                continue
            if all(abs(scale - 1.0) < 1e-12 for scale in scales) and switched == expression:
                switched = f"({expression} if {'' if current else 'not '}config.{name} else 1.0)"
            elif abs(scales[0] - value) < 1e-12 and abs(scales[1] - value / 2) < 1e-12 and divided is None:
                divided = f"(layer_idx + 1 if {'not ' if current else ''}config.{name} else 1)"
            else:
                raise UnsupportedFeature(path, f"attention scale switched by config.{name}", _HINT)
        if switched != expression:
            self.notes.append("attention scale switched by a config flag")
        return f"{switched} / {divided}" if divided else switched

    @staticmethod
    def _power(value: Any) -> float | None:
        return float(value) ** -0.5 if isinstance(value, (int, float)) and value else None

    def _sliding(self, path: str) -> SlidingMode:
        """From the config fields; a window on every layer is confirmed on the full HF model."""
        window = self.fields.get("sliding_window")
        if not isinstance(window, int) or window <= 0:
            return "none"
        layer_types = self.fields.get("layer_types")
        if isinstance(layer_types, list):
            if "sliding_attention" not in layer_types:
                return "none"
            self.notes.append("sliding-window attention on sliding_attention layers")
            return "layer_types"
        if self.fields.get("use_sliding_window") is False:
            return "none"
        if not self._window_hides_first_token(window):
            raise UnsupportedFeature(path, "config.sliding_window that the model does not apply", _HINT)
        self.notes.append("sliding-window attention")
        return "all"

    def _measured_window(
        self, layer_path: str, layers: nn.ModuleList, attr: str, inner: str | None
    ) -> str | None:
        """Without a ``sliding_window`` field: the window each layer's attention applies by itself,
        measured (a token changed ``d`` positions back changes the last output, or not), and the
        config expression that gives it per layer (an int field equal to the window, and a per-layer
        list whose value marks the windowed layers: GPT-Neo's ``window_size`` and ``attention_layers``)."""
        if isinstance(self.fields.get("sliding_window"), int):
            return None
        stack = layer_path.rsplit(".", 1)[0]
        path = f"{layer_path}.{attr}" + (f".{inner}" if inner else "")
        try:  # the layers' own indices in the model (a hybrid stack hands over its attention layers only)
            everything = list(self.model.get_submodule(stack))
            indices = [next(i for i, other in enumerate(everything) if other is layer) for layer in layers]
        except (AttributeError, StopIteration, TypeError):
            indices = list(range(len(layers)))
        windows = [self._layer_window(path.replace(f"{layer_path}.", f"{stack}.{i}.", 1)) for i in indices]
        if not any(windows):
            return None
        sizes = {w for w in windows if w}
        window_fields = [n for n, v in self.fields.items() if _is_int(v) and v in sizes and "window" in n]
        if len(sizes) != 1 or not window_fields:
            raise UnsupportedFeature(
                path, f"attention windows {windows} per layer from no config field", _HINT
            )
        window = f"config.{window_fields[0]}"
        if all(windows):
            self.notes.append(f"sliding-window attention ({window})")
            return window
        for name, value in self.fields.items():
            if not isinstance(value, list) or len(value) != len(layers):
                continue
            for marker in [
                item for i, item in enumerate(value) if isinstance(item, str) and item not in value[:i]
            ]:
                if [item == marker for item in value] == [bool(w) for w in windows]:
                    self.notes.append(
                        f"sliding-window attention ({window}) where config.{name} is {marker!r}"
                    )
                    return f"{window} if config.{name}[layer_idx] == {marker!r} else None"
        raise UnsupportedFeature(path, f"attention windows {windows} per layer from no config field", _HINT)

    def _measured_chunk(
        self, layer_path: str, layers: nn.ModuleList, attr: str, inner: str | None
    ) -> str | None:
        """Chunked local attention (Llama 4): the layers whose queries see only the keys of their own
        chunk of positions (``q // C == k // C``), measured from which outputs a changed key changes,
        and the config expression of ``C`` per layer (an int field of that value, ``chunk`` in its name
        first, and a per-layer list whose value marks the chunked layers). None: no chunked layer."""
        stack = layer_path.rsplit(".", 1)[0]
        path = f"{layer_path}.{attr}" + (f".{inner}" if inner else "")
        paths = [path.replace(f"{layer_path}.", f"{stack}.{i}.", 1) for i in range(len(layers))]
        seq = 4 * 8 + 1  # longer than any tiny chunk
        input_ids = torch.arange(seq)[None] % (self.tiny.vocab_size - 1) + 1
        try:
            calls = record_calls(
                self.model, paths, input_ids=input_ids, position_ids=torch.arange(seq)[None], use_cache=False
            )
        except Exception:  # a model that does not run this way: no chunk measured, the probes decide
            return None
        chunks = [self._layer_chunk(p, calls[p][0]) if calls.get(p) else None for p in paths]
        sizes = {c for c in chunks if c}
        if not sizes:
            return None
        fields = sorted(
            (n for n, v in self.fields.items() if _is_int(v) and v in sizes), key=lambda n: "chunk" not in n
        )
        if len(sizes) != 1 or not fields:
            raise UnsupportedFeature(path, f"attention chunks {chunks} per layer from no config field", _HINT)
        chunk = f"config.{fields[0]}"
        if all(chunks):
            self.notes.append(f"chunked local attention ({chunk})")
            return chunk
        for name, value in self.fields.items():
            if not isinstance(value, list) or len(value) != len(layers):
                continue
            for marker in dict.fromkeys(item for item in value if isinstance(item, str)):
                if [item == marker for item in value] == [bool(c) for c in chunks]:
                    self.notes.append(f"chunked local attention ({chunk}) where config.{name} is {marker!r}")
                    return f"{chunk} if config.{name}[layer_idx] == {marker!r} else None"
        raise UnsupportedFeature(path, f"attention chunks {chunks} per layer from no config field", _HINT)

    def _layer_chunk(self, path: str, call: Any) -> int | None:
        """The chunk size of a chunked causal attention at ``path`` (None: not chunked), from which
        query outputs change when one key token changes, in its call recorded inside a forward."""
        module = self.model.get_submodule(path)
        x = call.hidden_states
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return None
        seq = x.shape[1]
        args = call.args[1:] if call.args else ()
        kwargs = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}
        with torch.no_grad():
            base = _first(module(x, *args, **kwargs))[0]
            first = x.clone()
            first[0, 0] += 1.0
            if not torch.isclose(
                _first(module(first, *args, **kwargs))[0, -1], base[-1], rtol=1e-5, atol=1e-6
            ).all():
                return None  # the last query sees the first key: neither chunked nor windowed
            seen = torch.zeros(seq, seq, dtype=torch.bool)
            for key in range(seq):
                changed = x.clone()
                changed[0, key] += 1.0
                out = _first(module(changed, *args, **kwargs))[0]
                seen[:, key] = ~torch.isclose(out, base, rtol=1e-5, atol=1e-6).all(dim=-1)
        positions = torch.arange(seq)
        causal = positions[:, None] >= positions[None, :]
        if bool((seen == causal).all()):
            return None
        for size in range(2, seq):
            same = positions[:, None] // size == positions[None, :] // size
            if bool((seen == (causal & same)).all()):
                return size
        return None

    def _layer_window(self, path: str) -> int | None:
        """The window the attention at ``path`` applies within its call (None: it sees every earlier
        token), from its call recorded inside a forward on a sequence longer than any tiny window."""
        seq = 4 * 8 + 1
        input_ids = torch.arange(seq)[None] % (self.tiny.vocab_size - 1) + 1
        try:
            call = record_calls(
                self.model, [path], input_ids=input_ids, position_ids=torch.arange(seq)[None], use_cache=False
            )[path][0]
        except Exception:  # a model that does not run this way: no window measured, the probes decide
            return None
        module = self.model.get_submodule(path)
        x = call.hidden_states
        args = call.args[1:] if call.args else ()
        kwargs = {k: v for k, v in call.kwargs.items() if k != "hidden_states"}

        def last(hidden: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return _first(module(hidden, *args, **kwargs))[0, -1]

        base = last(x)
        for distance in range(1, seq):
            changed = x.clone()
            changed[0, seq - 1 - distance] += 1.0
            if _close(last(changed), base):
                return distance
        return None

    def _window_hides_first_token(self, window: int) -> bool:
        """With a window on every layer, the last token of a long sequence cannot see the first one."""
        seq = window * (self.tiny.num_hidden_layers + 1) + 1
        input_ids = torch.arange(seq)[None] % (self.tiny.vocab_size - 1) + 1
        changed = input_ids.clone()
        changed[0, 0] = 0
        positions = torch.arange(seq)[None]
        with torch.no_grad():
            logits = [
                self.model(input_ids=ids, position_ids=positions).logits[0, -1]
                for ids in (input_ids, changed)
            ]
        return _close(logits[0], logits[1])

    def _attention_softcap(self) -> str | None:
        value = self.fields.get("attn_logit_softcapping")
        if value:
            self.notes.append("attention logit soft-cap")
            return "config.attn_logit_softcapping"
        return None

    def _uses_rope(self, layers: nn.ModuleList, attr: str, rope: RopeSpec | None) -> list[bool]:
        """Probe each layer's attention with two RoPE tables; a layer whose output ignores them is NoPE."""
        if rope is None:
            return [False] * len(layers)
        generator = torch.Generator().manual_seed(2)
        x = torch.randn(1, 5, self.hidden, generator=generator)
        rotary = self._rotary_module
        uses = []
        for index, layer in enumerate(layers):
            if rope.per_layer_type and self.tiny.layer_types[index] in rope.nope_layer_types:
                uses.append(False)  # its model passes it no tables
                continue
            source = getattr(self, "_kv_sources", None)
            if source is not None and source[index] != index:  # its keys come rotated (or not) from there
                uses.append(uses[source[index]])
                continue
            outputs = []
            for order in ([0, 1, 2, 3, 4], [4, 0, 3, 1, 2]):  # RoPE is relative: reorder, not shift
                kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
                tables = _raw(rotary)(x, torch.tensor([order]), **kwargs)
                with torch.no_grad():
                    attention = getattr(layer, attr)
                    inputs = {
                        "position_embeddings": tables,
                        "attention_mask": None,
                        **_position_ids(attention, torch.tensor([order])),
                    }
                    outputs.append(_first(_call_filled(attention, x, inputs, fill=None)))  # alibi=None
            uses.append(not _close(outputs[0], outputs[1]))
        return uses

    def _rope_flag(self, path: str, uses: list[bool], care: list[bool] | None = None) -> str | None:
        """None when every layer uses RoPE, else the config expression saying which layers do; only
        the layers ``care`` marks (default: all) must agree with it."""
        if self._base_field:  # a RoPE base per layer, 0 for none
            return f"config.{self._base_field}[layer_idx]"
        care = care or [True] * len(uses)
        if all(use for use, counts in zip(uses, care, strict=True) if counts):
            return None

        def agrees(flags: list[bool]) -> bool:
            return all(f == use for f, use, counts in zip(flags, uses, care, strict=True) if counts)

        for name, value in self.fields.items():
            if not isinstance(value, list) or len(value) != len(uses):
                continue
            if agrees([bool(v) for v in value]):
                self.notes.append(f"NoPE layers ({name})")
                return f"config.{name}[layer_idx]"
            for kind in sorted({v for v in value if isinstance(v, str)}):
                if agrees([v == kind for v in value]):
                    self.notes.append(f"RoPE only on {kind} layers")
                    return f'config.{name}[layer_idx] == "{kind}"'
        raise UnsupportedFeature(path, "layers without RoPE from no config field", _HINT)

    # ---------------------------------------------------------------------------------------- mlp

    def _mlp(self, layer_path: str, layer: nn.Module, attention_attr: str) -> MLPSpec:
        candidates = [
            name for name, child in layer.named_children() if name != attention_attr and projections(child)
        ]
        if not candidates and projections(layer):
            return self._inline_mlp(layer_path, layer)
        if len(candidates) != 1:
            raise UnsupportedFeature(
                layer_path, f"expected one feed-forward block, found {candidates}", _HINT
            )
        attr = candidates[0]
        path = f"{layer_path}.{attr}"
        mlp = getattr(layer, attr)
        linears = projections(mlp)
        others = {n: c for n, c in mlp.named_children() if n not in linears and not isinstance(c, nn.Dropout)}
        downs = [n for n, c in linears.items() if c.out_features == self.hidden]
        if len(downs) > 1:  # a square in-projection too (inner width = hidden): the down map reads no input
            downs = [n for n in downs if n not in _reading_input(mlp, linears, self.hidden)]
        ins = [n for n in linears if n not in downs]
        if len(downs) != 1 or not 1 <= len(ins) <= 2:
            raise UnsupportedFeature(path, f"feed-forward projections {sorted(linears)}", _HINT)
        width = linears[downs[0]].in_features
        inner_name = self._mlp_inner_norm(others, width)
        inner_norm = self._norm(f"{path}.{inner_name}", others.pop(inner_name)) if inner_name else None
        if not others and inner_name is None:  # LFM2's w2(F.silu(w1(x)) * w3(x)): measured as a function
            act_attr = "act_fn"  # the lean file holds it as a parameter-free module of its own
            kind, inputs, act = self._mlp_wiring(path, mlp, [linears[n] for n in ins], ins, linears[downs[0]])
            act_module = None
        elif len(others) != 1:
            raise UnsupportedFeature(path, f"feed-forward submodules {sorted(others)}", _HINT)
        else:
            act_attr = next(iter(others))
            kind, inputs, act = self._mlp_wiring(
                path,
                mlp,
                [linears[n] for n in ins],
                ins,
                linears[downs[0]],
                getattr(mlp, inner_name or act_attr),
            )
            act_module = self._learned_activation(path, others[act_attr], act)
        biases = self._bias_expressions(layer, [f"{attr}.{n}" for n in linears])
        intermediate = self._intermediate(path, layer, f"{attr}.{downs[0]}", width)
        self.notes.append(f"{kind} MLP, {act}")
        if any(linear.transposed for linear in linears.values()):
            self.notes.append("Conv1D feed-forward projections, weights stored transposed")
        class_name, sequential = type(mlp).__name__, isinstance(mlp, nn.Sequential)
        if sequential:  # CTRL's nn.Sequential(Linear, ReLU, Linear): a lean subclass of the model's name
            if kind != "plain" or [int(n) for n in (ins[0], act_attr, downs[0])] != [0, 1, 2]:
                raise UnsupportedFeature(
                    path, f"nn.Sequential feed-forward {list(dict(mlp.named_children()))}", _HINT
                )
            class_name = type(self.stack).__name__.removesuffix("Model") + "FeedForward"
            self.notes.append(f"feed-forward built as nn.Sequential ({class_name})")
        return MLPSpec(
            class_name=class_name,
            sequential=sequential,
            attr=attr,
            kind=kind,
            inputs=tuple(LinearSpec(n, biases[f"{attr}.{n}"], linears[n].transposed) for n in inputs),
            down=LinearSpec(downs[0], biases[f"{attr}.{downs[0]}"], linears[downs[0]].transposed),
            act_attr=act_attr,
            act=act if act.startswith('"') else f"config.{act}",
            intermediate=intermediate,
            activation=act.strip('"') if act.startswith('"') else str(getattr(self.config, act)),
            inner_norm=inner_norm,
            inner_norm_name=inner_name or "",
            act_module=act_module,
            width_function=self._width_functions.get(intermediate.removesuffix("(config)"), ""),
            gate_scale=self._mlp_scales[0],
            down_scale=self._mlp_scales[1],
        )

    def _mlp_inner_norm(self, others: dict[str, nn.Module], width: int) -> str | None:
        """Of an MLP's non-linear children, the one norm over the intermediate width (BitNet's
        ``ffn_sub_norm``): a 1-D weight of that width and no element-wise behaviour."""
        found = [
            name
            for name, child in others.items()
            if isinstance(getattr(child, "weight", None), torch.Tensor)
            and tuple(child.weight.shape) == (width,)
            and not _elementwise(child, width)
        ]
        return found[0] if len(found) == 1 and len(others) == 2 else None

    def _learned_activation(self, path: str, module: nn.Module, act: str) -> str | None:
        """Constructor expression of an activation that holds weights (Apertus' xIELU, built by
        transformers as ``ACT2CLS[name](dtype=config.dtype)``), None for a parameter-free one."""
        if not list(module.parameters()) and not list(module.buffers()):
            return None
        expression = act if act.startswith('"') else f"config.{act}"
        if "dtype" in inspect.signature(type(module).__init__).parameters:
            self.notes.append(f"activation {type(module).__name__} with learned parameters")
            return f"ACT2CLS[{expression}](dtype=config.dtype)"
        return f"ACT2CLS[{expression}]()"

    def _intermediate(self, path: str, layer: nn.Module, down_path: str, width: int) -> str:
        """Config expression of the feed-forward width: a field holding it (``intermediate_size``
        first), else a multiple of the hidden size, with the unset field that overrides it when
        setting that field changes the rebuilt layer's width (GPT-2's ``n_inner``)."""
        sizes = [n for n, v in self.fields.items() if v == width and "intermediate" in n]
        if sizes:
            return f"config.{'intermediate_size' if 'intermediate_size' in sizes else sizes[0]}"
        sizes = [
            n
            for n, v in self.fields.items()
            if v == width
            and isinstance(v, int)
            and not isinstance(v, bool)
            and ("inner" in n or "ffn" in n or n in ("dff", "d_ff"))
        ]
        if sizes:
            return f"config.{sizes[0]}"
        divided = self._divided_intermediate(layer, down_path, width)
        if divided is not None:
            return divided
        if width % self.hidden:
            owner, _, linear = down_path.rpartition(".")
            module = layer.get_submodule(owner) if owner else layer
            name = f"{_snake(type(module).__name__)}_width"
            source = width_function(type(module), linear, self.tiny, width, name)
            if source is None:
                raise UnsupportedFeature(path, f"intermediate width {width} is no config field", _HINT)
            self._width_functions[name] = source
            self.notes.append(f"feed-forward width computed from the config as {type(module).__name__} does")
            return f"{name}(config)"
        default = f"{width // self.hidden} * config.hidden_size"
        for name, value in self.fields.items():
            if value is not None or not any(word in name for word in ("inner", "intermediate", "ffn")):
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, 3 * self.hidden)
                rebuilt = self._rebuilt_layer(layer, flipped).get_submodule(down_path)
            except Exception:  # a field the layer does not take as a width tells nothing
                continue
            if 3 * self.hidden in tuple(rebuilt.weight.shape):
                return f"config.{name} or {default}"
        return default

    def _divided_intermediate(self, layer: nn.Module, down_path: str, width: int) -> str | None:
        """``config.<field> // k`` where an intermediate-size field is ``k`` times the width and the layer
        rebuilt with that field doubled doubles its width (RecurrentGemma's MLP halves its field)."""
        for name, value in self.fields.items():
            if "intermediate" not in name or not isinstance(value, int) or isinstance(value, bool):
                continue
            if value <= width or value % width:
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, 2 * value)
                rebuilt = self._rebuilt_layer(layer, flipped).get_submodule(down_path)
            except Exception:  # noqa: BLE001 - a field the layer does not take as a width tells nothing
                continue
            if 2 * width in tuple(rebuilt.weight.shape):
                self.notes.append(f"feed-forward width config.{name} // {value // width}")
                return f"config.{name} // {value // width}"
        return None

    def _inline_mlp(self, layer_path: str, layer: nn.Module) -> MLPSpec:
        """A plain MLP whose linears and activation sit on the decoder layer itself (OPT, BioGPT):
        the up projection widens the hidden size, the down one narrows it back, and the activation is
        the one parameter-free elementwise child; the layout probe checks the wiring."""
        linears = projections(layer)
        downs = [n for n, c in linears.items() if c.out_features == self.hidden]
        ups = [
            n for n, c in linears.items() if c.in_features == self.hidden and c.out_features != self.hidden
        ]
        activations = [
            n for n, c in layer.named_children() if not list(c.parameters()) and _elementwise(c, self.hidden)
        ]
        if len(downs) != 1 or len(ups) != 1 or len(linears) != 2 or len(activations) != 1:
            raise UnsupportedFeature(
                layer_path, f"feed-forward linears {sorted(linears)} on the layer", _HINT
            )
        act_module = getattr(layer, activations[0])
        x = torch.randn(3, 7, generator=torch.Generator().manual_seed(3)) * 2
        fields = [
            f
            for f in _ACT_FIELDS
            if isinstance(self.fields.get(f), str)
            and self.fields[f] in ACT2FN
            and _close(ACT2FN[self.fields[f]](x), act_module(x))
        ]
        if not fields:
            raise UnsupportedFeature(
                f"{layer_path}.{activations[0]}", "activation from no config field", _HINT
            )
        up, down = linears[ups[0]], linears[downs[0]]
        biases = self._bias_expressions(layer, [ups[0], downs[0]])
        self.notes.append(f"plain MLP on the layer itself, {fields[0]}")
        return MLPSpec(
            class_name=type(layer).__name__,
            attr="feed_forward",
            kind="plain",
            inputs=(LinearSpec(ups[0], biases[ups[0]], up.transposed),),
            down=LinearSpec(downs[0], biases[downs[0]], down.transposed),
            act_attr=activations[0],
            act=f"config.{fields[0]}",
            intermediate=self._intermediate(layer_path, layer, downs[0], down.in_features),
            activation=str(self.fields[fields[0]]),
            inline=True,
        )

    def _mlp_wiring(
        self,
        path: str,
        mlp: nn.Module,
        ins: list[nn.Linear],
        names: list[str],
        down: nn.Linear,
        inner: nn.Module | None = None,
    ) -> tuple[str, list[str], str]:
        """Which input is the gate, whether a fused projection is (gate, up), which activation field.

        ``inner``: the MLP's norm before the down projection (applied to every candidate), else its
        activation: one with weights (xIELU) stands in for a fresh activation of its own class."""
        x = torch.randn(2, 3, self.hidden, generator=torch.Generator().manual_seed(3))
        inner_norm = inner if inner is not None and not _elementwise(inner, down.in_features) else None
        learned = inner if inner is not None and inner_norm is None and list(inner.parameters()) else None
        norm = inner_norm if inner_norm is not None else nn.Identity()

        def project(hidden: torch.Tensor) -> torch.Tensor:
            return down(norm(hidden))

        with torch.no_grad():
            expected = _call_filled(mlp, x)
            outs = [linear(x) for linear in ins]
        variants: list[tuple[str, list[str], Callable[[Callable], torch.Tensor]]] = []
        if len(ins) == 2:
            a, b = outs
            variants.append(("gated", names, lambda act: act(a) * b))
            variants.append(("gated", names[::-1], lambda act: act(b) * a))
        else:
            first, second = outs[0].chunk(2, dim=-1)
            if down.in_features * 2 == ins[0].out_features:
                variants.append(("fused_gated", names, lambda act: act(first) * second))
            variants.append(("plain", names, lambda act: act(outs[0])))
        self._mlp_scales: tuple[str | None, str | None] = (None, None)
        # the gate's pre-activation and the output times config constants (Falcon-H1's mlp_multipliers):
        # tried after none
        found = [(e, v) for e, _, _, v in float_candidates(self.fields) if v not in (0.0, 1.0)]
        scales = [((None, 1.0), (None, 1.0))] + [
            pair for pair in itertools.product([(None, 1.0), *found], repeat=2) if pair[0][0] or pair[1][0]
        ]
        for (gate_expr, gate_scale), (down_expr, down_scale) in scales:
            for field_name in _ACT_FIELDS:
                act_name = self.fields.get(field_name)
                if not isinstance(act_name, str) or act_name not in ACT2FN:
                    continue
                act = ACT2FN[act_name]
                if learned is not None and type(learned) is type(act):  # its own learned parameters
                    act = learned
                scaled = act if gate_expr is None else lambda t, a=act, s=gate_scale: a(t * s)
                for kind, order, combine in variants:
                    with torch.no_grad():
                        if _close(project(combine(scaled)) * down_scale, expected):
                            self._mlp_scales = (gate_expr, down_expr)
                            if gate_expr or down_expr:
                                self.notes.append(
                                    f"MLP gate times {gate_expr or 1}, output times {down_expr or 1}"
                                )
                            return kind, order, field_name
        # no config field names it: the module hard-codes one. Small random weights keep the
        # pre-activations small, where GELU and its tanh form agree to 1e-5: the closest match wins.
        matches = []
        for act_name in _LITERAL_ACTIVATIONS:
            for kind, order, combine in variants:
                with torch.no_grad():
                    actual = project(combine(ACT2FN[act_name]))
                if _close(actual, expected):
                    matches.append((float((actual - expected).abs().max()), act_name, kind, order))
        if matches:
            _, act_name, kind, order = min(matches, key=lambda match: match[0])
            self.notes.append(f"activation {act_name} fixed by the architecture")
            return kind, order, f'"{act_name}"'
        raise UnsupportedFeature(path, "feed-forward wiring matches no gated or plain MLP template", _HINT)

    # ---------------------------------------------------------------------------------------- layer

    def _decoder(
        self, layer_path: str, layer: nn.Module, attn_attr: str, ff: MLPSpec | MoESpec
    ) -> DecoderLayerSpec:
        blocks = self._block_names(ff, attn_attr)
        norm_names = [n for n in dict(layer.named_children()) if n not in blocks]
        norm_names = [n for n in norm_names if not isinstance(getattr(layer, n), nn.Dropout)]
        own_linears = [n for n in norm_names if isinstance(getattr(layer, n), nn.Linear)]
        if own_linears:  # a block of the layer's own beside attention and feed-forward
            raise UnsupportedFeature(layer_path, self._own_block(layer, own_linears), _HINT)
        identity = self._identity_norms(layer_path, layer, norm_names)
        specs = {
            self._norm(f"{layer_path}.{n}", identity.get(n, (None, getattr(layer, n)))[1]) for n in norm_names
        }
        if len(specs) != 1:
            raise UnsupportedFeature(layer_path, "decoder norms of different kinds (or none)", _HINT)
        self._residual_factor: float | None = None
        layout = self._probe_layout(layer, attn_attr, ff, norm_names)
        if layout is None and self._residual_factor is not None:
            raise UnsupportedFeature(
                layer_path,
                f"the layer rescales its residual stream (x{self._residual_factor:.4g} across the layer with"
                " the blocks' outputs zeroed: a depth-scaled residual add); no decoder template scales"
                " the residual itself",
                _HINT,
            )
        if layout is None:
            raise UnsupportedFeature(
                layer_path, f"residual layout with norms {norm_names} matches no template", _HINT
            )
        if layout.residual_adds:  # the add's index counts layers: confirmed on a deeper layer
            deeper = self._rebuilt_layer(layer, self.tiny, 1).float().eval()
            if (
                self.tiny.num_hidden_layers < 2
                or self._probe_layout(deeper, attn_attr, ff, norm_names, 1) != layout
            ):
                raise UnsupportedFeature(
                    layer_path, "residual adds scaled by the layer's depth by no known formula", _HINT
                )
            self.notes.append(
                f"depth-scaled residual adds: the n-th add (n = 2 * layer_idx + {layout.residual_adds} for the"
                " attention, + 1 for the feed-forward) keeps sqrt((n - 1) / n) of the residual and adds"
                " the block over sqrt(n)"
            )
        self.notes.append(
            "parallel attention + MLP"
            if layout.parallel
            else f"post-LN: {layout.attn_post} and {layout.mlp_post} normalise the residual sums"
            if layout.norm_after_residual
            else f"norm layout {layout.attn_pre}/{layout.attn_post}"
        )
        if layout.residual_weights != (None, None):
            self.notes.append(
                f"residual times the layer's own vectors {layout.residual_weights} before each add"
            )
        spec = DecoderLayerSpec(
            type(layer).__name__,
            self._confirmed_eps(layer, norm_names, specs.pop()),
            **vars(layout),
            identity_norms=tuple((name, condition) for name, (condition, _) in identity.items()),
        )
        return dataclasses.replace(
            spec, switches=self._layout_switches(layer, attn_attr, ff, spec, norm_names)
        )

    @staticmethod
    def _own_block(layer: nn.Module, linears: list[str]) -> str:
        """What a decoder layer's own linears (outside its attention and feed-forward) amount to: with
        an extra tensor input of the layer (Gemma 4's ``per_layer_input``), a per-layer input block."""
        standard = {"hidden_states", "attention_mask", "position_ids", "position_embeddings", "cache"}
        extra = [
            p.name
            for p in list(inspect.signature(layer.forward).parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in standard
            and "past_key" not in p.name
            and not _shared_stores_annotation(p)
            and p.name not in ("use_cache", "cache_position", "output_attentions")
        ]
        if extra:
            return (
                f"per-layer inputs: the layer takes {', '.join(extra)} beside the hidden states and mixes it in"
                f" with linears of its own ({', '.join(linears)}) after attention and feed-forward (per-layer"
                " embeddings the model computes for every layer); no decoder template covers it"
            )
        return f"linears of the decoder layer's own ({', '.join(linears)}) beside attention and feed-forward"

    def _confirmed_eps(self, layer: nn.Module, norm_names: list[str], norm: NormSpec) -> NormSpec:
        """``norm`` with its epsilon a literal where the config field matched by value does not set
        it: the rebuilt layer with the field x10 keeps its norms' epsilon (CTRL's layers hard-code
        1e-6, only its final norm reads layer_norm_epsilon)."""
        field = norm.eps.removeprefix("config.")
        value = self.fields.get(field)
        if field == norm.eps or not isinstance(value, float):
            return norm
        try:
            rebuilt = self._rebuilt_layer(layer, self._flip({field: value * 10}))
        except Exception:  # noqa: BLE001 - a flip the config or the layer refuses tells nothing
            return norm
        for name in norm_names:
            module = getattr(rebuilt, name, None)
            eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
            if isinstance(module, nn.Identity):
                continue
            if not isinstance(eps, float) or not math.isclose(eps, value):
                return norm  # follows the field (or cannot tell)
        self.notes.append(f"layer norm epsilon {value!r} fixed by the architecture (not config.{field})")
        return dataclasses.replace(norm, eps=repr(value))

    def _identity_norms(
        self, layer_path: str, layer: nn.Module, norm_names: list[str]
    ) -> dict[str, tuple[str, nn.Module]]:
        """The norms that are ``nn.Identity`` on some layers (ModernBERT-decoder's layer-0
        ``attn_norm``): per name, the condition over ``layer_idx`` under which the layer builds the
        norm, confirmed on a deeper rebuild of the layer class, and a real instance to measure."""
        layers = [m for m in self.stack.modules() if type(m) is type(layer)]
        found: dict[str, tuple[str, nn.Module]] = {}
        for name in norm_names:
            if not isinstance(getattr(layer, name), nn.Identity):
                continue
            kinds = [isinstance(getattr(other, name, None), nn.Identity) for other in layers]
            real = [
                getattr(other, name)
                for other, kind in zip(layers, kinds, strict=True)
                if not kind and isinstance(getattr(other, name, None), nn.Module)
            ]
            if not real:
                raise UnsupportedFeature(
                    f"{layer_path}.{name}", "a norm slot that is nn.Identity on every layer", _HINT
                )
            deeper = copy.deepcopy(self.tiny)
            deeper.num_hidden_layers = len(layers) + 2
            for field, value in self.fields.items():  # per-layer lists (layer_types) grow with it
                if isinstance(value, list) and len(value) == len(layers):
                    setattr(deeper, field, value + value[:2])
            try:  # the layers that build the norm, on the deeper config
                with torch.device("meta"):
                    built = tuple(
                        i
                        for i in range(deeper.num_hidden_layers)
                        if not isinstance(getattr(self._rebuilt_layer(layer, deeper, i), name), nn.Identity)
                    )
            except Exception:  # noqa: BLE001 - a layer class not built from (config, layer_idx)
                built = None
            candidates = ("layer_idx != 0", "layer_idx != config.num_hidden_layers - 1")
            condition = next(
                (c for c in candidates if built == predict_layers(deeper, c, deeper.num_hidden_layers)), None
            )
            if condition is None:
                raise UnsupportedFeature(
                    f"{layer_path}.{name}",
                    "a norm that is nn.Identity on layers no known condition names",
                    _HINT,
                )
            self.notes.append(f"{name} only where {condition} (nn.Identity elsewhere)")
            found[name] = (condition, real[0])
        return found

    def _part_settings(self, layer_path: str, layer: nn.Module) -> tuple[tuple[str, str], ...]:
        """Unset or bool fields of part sub-configs (MPT's ``attn_config.clip_qkv``) that change the
        layer: each set (None -> 0.01) or flipped on a rebuilt layer given the first layer's recorded
        inputs. The tiny config measured the file with the current values, so a config that sets one
        is refused by the file, not computed wrongly."""
        parts = [
            name for name, cls in type(self.tiny).sub_configs.items() if not getattr(cls, "model_type", "")
        ]
        if not parts:
            return ()
        seq = 6
        input_ids = torch.arange(2 * seq).reshape(2, seq) % (self.tiny.vocab_size - 1) + 1
        call = record_calls(
            self.model, [layer_path], input_ids=input_ids, position_ids=torch.arange(seq)[None].expand(2, seq),
            use_cache=False,
        )[layer_path][0]  # fmt: skip
        refused = []
        for part in parts:
            for field, value in getattr(self.tiny, part).to_dict().items():
                if value is not None and not isinstance(value, bool) or field in _BASE_CONFIG_FIELDS:
                    continue
                flipped = copy.deepcopy(self.tiny)
                setattr(
                    getattr(flipped, part), field, 0.01 if value is None else not value
                )  # small: it bites
                try:
                    rebuilt = self._rebuilt_layer(layer, flipped).float().eval()
                    rebuilt.load_state_dict(layer.state_dict())
                    with torch.no_grad():
                        changed = not _close(_first(rebuilt(*call.args, **call.kwargs)), call.result)
                except Exception:  # other modules, or a value the layer cannot take: it changes it too
                    changed = True
                if changed:
                    condition = f"config.{part}.{field} is not None" if value is None else (
                        f"{'not ' if value else ''}config.{part}.{field}"
                    )  # fmt: skip
                    refused.append(
                        (condition, f"config.{part}.{field}={'set' if value is None else not value}")
                    )
                    self.notes.append(f"config.{part}.{field} other than {value}: refused by this file")
        return tuple(refused)

    def _feed_forward_switches(self, layer: nn.Module, ff: MLPSpec | MoESpec) -> tuple[tuple[str, str], ...]:
        """Bool config fields whose other value builds another feed-forward class than the dense MLP
        measured here (Doge's ``is_moe``: a product-key expert block): the file refuses a config that
        flips one, as it does part sub-config settings."""
        if not isinstance(ff, MLPSpec) or ff.inline:
            return ()
        measured = type(getattr(layer, ff.attr)).__name__
        refused = []
        for name, value in self.fields.items():
            if not isinstance(value, bool) or name in _BASE_CONFIG_FIELDS:
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, not value)
                other = type(getattr(self._rebuilt_layer(layer, flipped), ff.attr)).__name__
            except Exception:  # noqa: BLE001 - a flip the config or the layer refuses tells nothing
                continue
            if other != measured:
                refused.append((f"{'not ' if value else ''}config.{name}", f"config.{name}={not value}"))
                self.notes.append(
                    f"config.{name}={not value}: the feed-forward {other} is not reproduced by this file"
                )
        return tuple(refused)

    def _output_scale(self, layer_path: str, layers: nn.ModuleList) -> dict[str, Any]:
        """A checkpoint tensor of the layer's own (not a block's) that multiplies the layer's whole
        output, residual included (Gemma 4's ``layer_scalar``): set to a telling value in a copy of the
        first layer, which must then return that value times its recorded output; the same tensor
        on every layer. Another tensor of the layer's own is refused by name."""
        layer = layers[0]
        own = dict(layer.named_parameters(recurse=False))
        persistent = {n for n, _ in layer.named_buffers(recurse=False)} - layer._non_persistent_buffers_set
        own.update({name: getattr(layer, name) for name in sorted(persistent)})
        own = {name: tensor for name, tensor in own.items() if name not in self._residual_weights}
        if not own:
            return {}
        name, tensor = next(iter(own.items()))
        shapes = {  # None for a layer without it
            tuple(other_tensor.shape)
            if isinstance(other_tensor := getattr(other, name, None), torch.Tensor)
            else None
            for other in layers
        }
        if len(own) > 1 or tensor.numel() != 1 or shapes != {tuple(tensor.shape)}:
            raise UnsupportedFeature(
                f"{layer_path}.{sorted(own)[0]}",
                f"decoder layer tensors of its own {sorted(own)} (shape {list(tensor.shape)}) beside its"
                " blocks; the decoder template holds one scalar that scales the layer output",
                _HINT,
            )
        seq = 6
        input_ids = torch.arange(2 * seq).reshape(2, seq) % (self.tiny.vocab_size - 1) + 1
        call = record_calls(
            self.model, [layer_path], input_ids=input_ids, position_ids=torch.arange(seq)[None].expand(2, seq),
            use_cache=False,
        )[layer_path][0]  # fmt: skip
        probe = copy.deepcopy(layer)
        with torch.no_grad():
            getattr(probe, name).fill_(1.7)
            scaled = _first(probe(*call.args, **call.kwargs))
        if not _close(scaled, 1.7 * call.result):
            raise UnsupportedFeature(
                f"{layer_path}.{name}",
                f"decoder layer {'parameter' if name in dict(layer.named_parameters(recurse=False)) else 'buffer'}"
                f" {name} of its own that does not scale the layer output; the decoder template holds one"
                " scalar that does",
                _HINT,
            )
        self.notes.append(f"layer output scaled by its own {name}")
        return {
            "output_scale": name,
            "output_scale_buffer": name in persistent,
            "output_scale_shape": tuple(tensor.shape),
        }

    @staticmethod
    def _block_names(ff: MLPSpec | MoESpec, attn_attr: str) -> set[str]:
        """Children of the layer that are the attention and the feed-forward (its modules if inline)."""
        if isinstance(ff, MLPSpec) and ff.inline:
            return {attn_attr, ff.inputs[0].name, ff.down.name, ff.act_attr}
        return {attn_attr, ff.attr}

    def _layout_switches(
        self,
        layer: nn.Module,
        attn_attr: str,
        ff: MLPSpec | MoESpec,
        spec: DecoderLayerSpec,
        norm_names: list[str],
    ) -> tuple[tuple[str, bool, DecoderLayerSpec], ...]:
        """Bool config fields that place the norms differently (OPT's ``do_layer_norm_before``): each
        flipped on a rebuilt layer and its layout probed again; a flip no layout explains is noted."""
        base = _Layout(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(_Layout)})
        found = []
        for name, current in self.fields.items():
            if not isinstance(current, bool):
                continue
            try:
                rebuilt = self._rebuilt_layer(layer, self._flip({name: not current})).float().eval()
            except Exception:  # a field whose flip the config or the layer refuses tells nothing
                continue
            names = [n for n, c in rebuilt.named_children() if n not in self._block_names(ff, attn_attr)]
            names = [n for n in names if not isinstance(getattr(rebuilt, n), nn.Dropout)]
            if sorted(names) != sorted(norm_names):
                note = f"config.{name}={not current}: other layer modules, not built by this file"
                if note not in self.notes:
                    self.notes.append(note)
                continue
            try:
                layout = self._probe_layout(rebuilt, attn_attr, ff, names)
            except Exception:  # the flip changed the blocks themselves: not a layout switch
                layout = None
            if layout is None:
                self.notes.append(f"config.{name}={not current}: layer layout not reproduced by this file")
            elif layout != base:
                found.append((name, not current, dataclasses.replace(spec, **vars(layout), switches=())))
        if len(found) > 1:
            raise UnsupportedFeature(
                type(layer).__name__, "layer layouts that several config flags switch", _HINT
            )
        if found:
            self.notes.append(f"layer layout switched by config.{found[0][0]}")
        return tuple(found)

    def _probe_layout(
        self,
        layer: nn.Module,
        attn_attr: str,
        ff: MLPSpec | MoESpec,
        norm_names: list[str],
        index: int | None = None,
    ) -> _Layout | None:
        """Replace the blocks of a copy of the layer by distinct nonlinear stand-ins and match the output
        (an MLP that sits on the layer becomes the stand-in as its up projection, with identity
        activation and down projection)."""
        probe = copy.deepcopy(layer)
        generator = torch.Generator().manual_seed(4)
        stand_ins = {name: _Affine(1.0 + 0.3 * i, 0.1 * (i + 1)) for i, name in enumerate(norm_names)}
        for name, module in stand_ins.items():
            setattr(probe, name, module)
        inline = isinstance(ff, MLPSpec) and ff.inline
        with torch.no_grad():
            mlp_tuple = not inline and isinstance(
                _call_filled(getattr(layer, ff.attr), torch.zeros(1, 2, self.hidden)), tuple
            )
        attn, mlp = (
            _Mixer(
                self.hidden,
                generator,
                True,
                _output_kind(getattr(layer, attn_attr), self.hidden),
                _takes_residual(getattr(layer, attn_attr)),
            ),  # fmt: skip
            _Mixer(
                self.hidden,
                generator,
                False,
                mlp_tuple,
                not inline and _takes_residual(getattr(layer, ff.attr)),
            ),
        )
        setattr(probe, attn_attr, attn)
        if inline:
            setattr(probe, ff.inputs[0].name, mlp)
            setattr(probe, ff.act_attr, nn.Identity())
            setattr(probe, ff.down.name, nn.Identity())
        else:
            setattr(probe, ff.attr, mlp)
        weights = _telling_residual_weights(probe, self.hidden)
        x = torch.randn(2, 5, self.hidden, generator=generator)
        tables = (torch.ones(2, 5, self._head_dim()), torch.zeros(2, 5, self._head_dim()))
        inputs = {
            "attention_mask": None,
            "position_ids": torch.arange(5)[None],
            "position_embeddings": tables,
        }
        with torch.no_grad():
            try:
                expected = _first(_call_filled(probe, x, inputs, fill=None))
            except ValueError as err:  # the layer unpacks more from its attention (GPT-NeoX-Japanese's bias)
                wanted = re.search(r"values to unpack \(expected (\d+)", str(err))
                if wanted is None:
                    raise
                attn.arity = int(wanted.group(1))
                expected = _first(_call_filled(probe, x, inputs, fill=None))
        index = self._layer_indices.get(id(layer), 0) if index is None else index
        for layout, residual in itertools.product(_layouts(norm_names), _residual_weight_slots(weights)):
            if residual != (None, None) and (layout.parallel or layout.norm_after_residual):
                continue
            for scale, value in self._residual_multipliers():
                candidate = dataclasses.replace(layout, residual_multiplier=scale, residual_weights=residual)
                if _close(candidate.apply(x, stand_ins, attn, mlp, value, weights), expected):
                    self._residual_weights |= {name for name in residual if name}
                    return candidate
        for layout, first in itertools.product(_layouts(norm_names), _FIRST_RESIDUAL_ADDS):
            candidate = dataclasses.replace(layout, residual_adds=first)  # depth-scaled residual adds (Beam)
            if not (layout.parallel or layout.norm_after_residual) and _close(
                candidate.apply(x, stand_ins, attn, mlp, 1.0, layer_idx=index), expected
            ):
                return candidate
        # no layout: with every block output zero and every norm the identity, a residual stream of
        # plain adds passes its input on; a rescaled one (Beam's depth-scaled add) shows its factor
        with torch.no_grad():
            attn.matrix.zero_()
            mlp.matrix.zero_()
            for module in stand_ins.values():
                module.scale, module.shift = 1.0, 0.0
            passed = _first(_call_filled(probe, x, inputs, fill=None))
        factor = float((passed * x).sum() / (x * x).sum())
        if _close(passed, factor * x) and not _close(passed, x):
            self._residual_factor = factor
        return None

    def _residual_multipliers(self) -> list[tuple[str | None, float]]:
        """Candidate scales of each block output before the residual add, (expression, value): none,
        a float config field (Granite's residual_multiplier first), or one over the square root of the
        depth (MiniCPM3's scale_depth / sqrt(num_hidden_layers))."""
        found: list[tuple[str | None, float]] = [(None, 1.0)]
        floats = {
            name: value
            for name, value in self.fields.items()
            if isinstance(value, float)
            and value not in (0.0, 1.0)
            and not any(part in name for part in ("eps", "dropout", "range", "theta"))
        }
        ordered = sorted(floats, key=lambda name: name != "residual_multiplier")
        found += [(f"config.{name}", floats[name]) for name in ordered]
        depth = self.fields.get("num_hidden_layers")
        if _is_int(depth) and depth > 1:
            found += [
                (f"config.{name} / math.sqrt(config.num_hidden_layers)", floats[name] / math.sqrt(depth))
                for name in ordered
            ]
        return found

    # ---------------------------------------------------------------------------------------- model

    def _embedding(
        self, inner: nn.Module, prefix: str, parts: dict[str, tuple[str, Any]], layer: nn.Module
    ) -> EmbeddingSpec:
        """The first layer's input against the raw embedding rows: a scale matched to config
        expressions, plus learned position rows (at some offset) and a norm where the model has them."""
        attr, embed = parts["embed"]
        positions, embed_norm = parts.get("positions"), parts.get("embed_norm")
        positions = positions or _position_buffer(inner, self.hidden)  # a table kept as a buffer (CTRL)
        project_in, project_out = parts.get("project_in"), parts.get("project_out")
        captured: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        input_ids = torch.arange(1, 6)[None]
        position_ids = torch.arange(5)[None] + (3 if positions else 0)  # an offset shows in the rows used
        try:
            with torch.no_grad():
                inner(input_ids=input_ids, position_ids=position_ids)
        finally:
            hook.remove()
        raw = embed.weight[input_ids]
        scaled_class = type(embed).__name__ if type(embed) is not nn.Embedding else None
        candidates = [
            (None, 1.0),
            ("config.hidden_size**0.5", self.hidden**0.5),
            ("config.embedding_multiplier", self.fields.get("embedding_multiplier")),
            *(  # another numeric scale field (MiniCPM3's scale_emb)
                (f"config.{name}", float(value))
                for name, value in self.fields.items()
                if name != "embedding_multiplier"
                and any(part in name for part in ("scale", "multiplier"))
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value not in (0, 1)
            ),
        ]
        offsets: list[int | None] = [None] if positions is None else list(range(4))
        # the final norm may also normalise the embeddings (NanoChat calls one norm module twice)
        norm_options = [embed_norm] if embed_norm is not None else [None, parts.get("norm")]
        for (expression, value), offset, norm in itertools.product(candidates, offsets, norm_options):
            if not isinstance(value, float):
                continue
            expected = raw * value
            if project_in is not None:
                with torch.no_grad():
                    expected = project_in[1](expected)
            if offset is not None and isinstance(positions[1], nn.Embedding):
                expected = expected + positions[1].weight[position_ids + offset]
            elif offset is not None:  # a sinusoidal table: offset and base measured after the match
                with torch.no_grad():
                    expected = expected + positions[1](position_ids)
            with torch.no_grad():
                if norm is not None:
                    expected = norm[1](expected)
            if not _close(captured[0], expected):
                continue
            if expression == "config.hidden_size**0.5" and self._bf16_rounded_scale(inner):
                expression = f"float(torch.tensor({expression}, dtype=torch.bfloat16))"
            if expression and scaled_class:
                expression = self._embedding_scale_flags(attr, expression, value)
            if expression:
                self.notes.append(f"embeddings scaled by {expression}")
            if norm is not None and embed_norm is None:
                self.notes.append(f"the final norm ({norm[0]}) also normalises the embeddings")
            spec = EmbeddingSpec(
                attr,
                expression,
                scaled_class if expression else None,
                padding_idx=hasattr(self.tiny, "pad_token_id"),
                positions=self._positions(prefix, positions, offset) if offset is not None else None,
                norm=self._embedding_norm(prefix, norm, layer),
                wrapper=self._embed_wrapper,
            )
            return self._projected(prefix, spec, embed, project_in, project_out)
        raise UnsupportedFeature(f"{prefix}.{attr}", "embedding scale from no known config field", _HINT)

    def _bf16_rounded_scale(self, inner: nn.Module) -> bool:
        """Whether the ``sqrt(hidden_size)`` embedding scale is rounded to bf16 in every dtype
        (RecurrentGemma keeps it as a bf16 buffer): invisible at the tiny width (sqrt(64) = 8), measured
        on the model rebuilt 96 wide, where sqrt(96) = 9.798 rounds to 9.8125."""
        config = copy.deepcopy(self.tiny)
        try:
            config.hidden_size = 96
            rebuilt = type(inner)(config).eval()
            first = next(m for m in rebuilt.modules() if isinstance(m, nn.ModuleList))[0]
        except Exception:  # noqa: BLE001 - a config that cannot be rebuilt wider tells nothing
            return False
        captured: list[torch.Tensor] = []
        hook = first.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        input_ids = torch.arange(1, 6)[None]
        try:
            with torch.no_grad():
                rebuilt(input_ids=input_ids, position_ids=torch.arange(5)[None])
        except Exception:  # noqa: BLE001
            return False
        finally:
            hook.remove()
        raw = rebuilt.get_input_embeddings().weight[input_ids]
        rounded = float(torch.tensor(96**0.5, dtype=torch.bfloat16))
        return (
            bool(captured) and _close(captured[0], raw * rounded) and not _close(captured[0], raw * 96**0.5)
        )

    def _embedding_scale_flags(self, attr: str, expression: str, value: float) -> str:
        """``expression``, or ``(expression if config.F else 1.0)`` where flipping the bool field F
        and rebuilding the stack leaves the scaled embedding module unscaled (BioGPT's and XGLM's
        ``scale_embedding``)."""
        input_ids = torch.arange(1, 6)[None]
        for name, current in self.fields.items():
            if not isinstance(current, bool):
                continue
            try:
                embed = getattr(type(self.stack)(self._flip({name: not current})), attr)
                with torch.no_grad():
                    scaled = embed(input_ids)
            except Exception:  # a flip the config or the model refuses tells nothing
                continue
            raw = embed.weight[input_ids]
            if _close(scaled, raw * value):
                continue
            if not _close(scaled, raw):
                raise UnsupportedFeature(attr, f"embedding scale switched by config.{name}", _HINT)
            self.notes.append(f"embedding scale switched by config.{name}")
            return f"({expression} if {'' if current else 'not '}config.{name} else 1.0)"
        return expression

    def _projected(
        self,
        prefix: str,
        spec: EmbeddingSpec,
        embed: nn.Embedding,
        project_in: tuple[str, nn.Module] | None,
        project_out: tuple[str, nn.Module] | None,
    ) -> EmbeddingSpec:
        """Embeddings narrower or wider than the hidden size: the config field of their width, and
        the projections in and out that exist exactly when it differs from ``hidden_size`` (checked
        on a stack rebuilt with the field set to the hidden size)."""
        width = embed.embedding_dim
        if width == self.hidden and project_in is None and project_out is None:
            return spec
        fields = [
            n for n, v in self.fields.items() if v == width and isinstance(v, int) and n != "hidden_size"
        ]
        if any(
            isinstance(getattr(part[1], "bias", None), torch.Tensor)
            for part in (project_in, project_out)
            if part
        ):
            raise UnsupportedFeature(f"{prefix}.{spec.attr}", "embedding projections with a bias", _HINT)
        if project_in is None or project_out is None or not fields:
            raise UnsupportedFeature(
                f"{prefix}.{spec.attr}", f"embeddings of width {width} without projections", _HINT
            )
        flipped = copy.deepcopy(self.tiny)
        setattr(flipped, fields[0], self.hidden)
        rebuilt = type(self.stack)(flipped)
        if any(getattr(rebuilt, part[0], None) is not None for part in (project_in, project_out)):
            raise UnsupportedFeature(
                f"{prefix}.{project_in[0]}", "embedding projections not switched by their width", _HINT
            )
        self.notes.append(f"embeddings of config.{fields[0]} channels, projected in and out")
        return dataclasses.replace(
            spec, width=f"config.{fields[0]}", project_in=project_in[0], project_out=project_out[0]
        )

    def _positions(self, prefix: str, positions: tuple[str, nn.Module], offset: int) -> PositionEmbeddingSpec:
        """Learned position rows: ``config.max_position_embeddings + offset`` of them, read at ``offset``;
        or a sinusoidal table: ``cat(sin, cos)`` of ``(position + offset) * base^(-i / (half - 1))``,
        offset and base measured against the module's rows."""
        attr, module = positions
        if not isinstance(module, nn.Embedding):
            return self._sinusoidal(prefix, attr, module)
        rows = getattr(self.tiny, "max_position_embeddings", None)
        if module.num_embeddings != (rows or 0) + offset or module.embedding_dim != self.hidden:
            raise UnsupportedFeature(
                f"{prefix}.{attr}",
                f"position table of {module.num_embeddings} rows is not max_position_embeddings + {offset}",
                _HINT,
            )
        self.notes.append("learned absolute position embeddings" + (f" (offset {offset})" if offset else ""))
        return PositionEmbeddingSpec(attr, offset)

    def _sinusoidal(self, prefix: str, attr: str, module: nn.Module) -> PositionEmbeddingSpec:
        position_ids = torch.arange(9)[None]
        with torch.no_grad():
            rows = module(position_ids)[0].double()
        half = self.hidden // 2
        # a buffer table (CTRL's pos_encoding) gets a lean module of the model's name
        class_name = getattr(module, "class_name", type(module).__name__)
        matches = []  # both forms fit one table (base^(-i/(half-1)) = base'^(-i/half)): the round base wins
        for denominator, steps in (("half - 1", half - 1), ("half", half)) if half > 1 else ():
            angles = torch.atan2(rows[:, 1], rows[:, half + 1])  # the second frequency, row by row
            step = torch.remainder(angles[1] - angles[0], 2 * torch.pi)  # = f_1 = base^(-1 / steps)
            base = float(f"{float(step**-steps):.6g}") if 0 < step < 1 else 0.0
            freqs = base ** (-torch.arange(half, dtype=torch.float64) / steps) if base > 1 else None
            for offset in range(4) if freqs is not None else ():
                table = (position_ids[0, :, None] + offset).double() * freqs
                if torch.allclose(torch.cat((table.sin(), table.cos()), -1), rows, atol=1e-5):
                    matches.append((base != round(base), denominator, base, offset))
                    break
        if matches:
            _, denominator, base, offset = min(matches)
            self.notes.append(f"sinusoidal absolute position embeddings (base {base:g}, offset {offset})")
            return PositionEmbeddingSpec(
                attr, offset, sinusoidal_base=base, class_name=class_name, denominator=denominator
            )
        raise UnsupportedFeature(f"{prefix}.{attr}", "position table matches no sinusoidal template", _HINT)

    def _embedding_norm(
        self, prefix: str, embed_norm: tuple[str, nn.Module] | None, layer: nn.Module
    ) -> str | None:
        if embed_norm is None:
            return None
        attr, module = embed_norm
        if self._norm(f"{prefix}.{attr}", module) != self._layer_norm_spec:
            raise UnsupportedFeature(f"{prefix}.{attr}", "embedding norm differs from the layer norms", _HINT)
        self.notes.append("normalised embeddings")
        return attr

    def _head_bias_expression(self, model: nn.Module, attr: str, present: bool) -> bool | str:
        """``present``, or ``config.<flag>`` where flipping a bool ``*bias*`` field the lean file reads
        elsewhere too (ERNIE-4.5's ``use_bias``) adds or drops the head's bias in the rebuilt model."""
        for name, value in self.fields.items():
            if not isinstance(value, bool) or "bias" not in name:
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, not value)
                with torch.device("meta"):
                    rebuilt = getattr(type(model)(flipped), attr)
            except Exception:  # noqa: BLE001 - a flip the config or the model refuses tells nothing
                continue
            if (rebuilt.bias is not None) != present:
                return f"config.{name}" if present == value else f"not config.{name}"
        return present

    def _head_transform(
        self, model: nn.Module, known: set[str]
    ) -> tuple[HeadTransformSpec, nn.Module] | None:
        """The causal LM's one other child, where it maps the final hidden state by
        ``norm(act(dense(h)))`` before the output projection (ModernBERT's prediction head): its spec
        and module, the activation and the dense bias tied to the config fields that switch them on a
        rebuilt module; None where there is no such child (``_check_children`` then names it)."""
        others = [
            (n, c) for n, c in model.named_children() if n not in known and not isinstance(c, nn.Dropout)
        ]
        if len(others) != 1:
            return None
        attr, module = others[0]
        linears = projections(module)
        children = {
            n: c for n, c in module.named_children() if n not in linears and not isinstance(c, nn.Dropout)
        }
        if len(linears) != 1 or len(children) != 2:
            return None
        dense_name, dense = next(iter(linears.items()))
        if (dense.in_features, dense.out_features) != (self.hidden, self.hidden) or dense.transposed:
            return None
        acts = [n for n, c in children.items() if not list(c.parameters()) and _elementwise(c, self.hidden)]
        norms = [n for n in children if n not in acts]
        if len(acts) != 1 or len(norms) != 1:
            return None
        norm = self._norm(f"{attr}.{norms[0]}", children[norms[0]])
        x = torch.randn(2, 3, self.hidden, generator=torch.Generator().manual_seed(12))
        with torch.no_grad():
            expected = module(x)
        act_fields = []
        for name, value in self.fields.items():
            if not isinstance(value, str) or value not in ACT2FN:
                continue
            with torch.no_grad():
                if not _close(children[norms[0]](ACT2FN[value](dense(x))), expected):
                    continue
            other = "relu" if value != "relu" else "silu"
            try:
                rebuilt = type(module)(self._flip({name: other}))
            except Exception:  # noqa: BLE001 - a module not built from the config alone tells nothing
                continue
            if type(getattr(rebuilt, acts[0])) is type(ACT2FN[other]):
                act_fields.append(name)
        if len(act_fields) != 1:
            raise UnsupportedFeature(
                attr, f"head transform {type(module).__name__} with an activation no config field sets", _HINT
            )
        bias = str(dense.has_bias)
        for name, value in self.fields.items():
            if not isinstance(value, bool) or "bias" not in name:
                continue
            try:
                rebuilt = getattr(type(module)(self._flip({name: not value})), dense_name)
            except Exception:  # noqa: BLE001 - a flip the config or the module refuses tells nothing
                continue
            if (rebuilt.bias is not None) != dense.has_bias:
                bias = f"config.{name}" if dense.has_bias == value else f"not config.{name}"
                break
        self.notes.append(f"prediction head {type(module).__name__}: {norms[0]}({acts[0]}({dense_name}(h)))")
        spec = HeadTransformSpec(
            attr=attr,
            class_name=type(module).__name__,
            dense=LinearSpec(dense_name, bias),
            act_attr=acts[0],
            act=f"config.{act_fields[0]}",
            norm_attr=norms[0],
            norm=norm,
        )
        return spec, module

    def _head(self, model: nn.Module, inner: nn.Module, final_attr: str, attr: str) -> HeadSpec:
        """Compare the logits with lm_head(final hidden state) under the known post-processings."""
        lm_head = getattr(model, attr)
        if not isinstance(lm_head, nn.Linear):
            raise UnsupportedFeature(attr, f"head {type(lm_head).__name__}", _HINT)
        input_ids, positions = torch.arange(1, 6)[None], torch.arange(5)[None]
        with torch.no_grad():
            hidden = inner(input_ids=input_ids, position_ids=positions).last_hidden_state
            logits = model(input_ids=input_ids, position_ids=positions).logits
            if self._transform is not None:  # the prediction head's transform, measured on its own
                hidden = self._transform[1](hidden)
            base = lm_head(hidden)
        candidates: list[tuple[str, str | None, Callable[[float], torch.Tensor]]] = [
            ("none", None, lambda _v: base)
        ]
        for name in _LOGIT_SCALES:  # MuP-style scales: Granite divides, Cohere and HyperCLOVA X multiply
            candidates += [("divide", name, lambda v: base / v), ("multiply", name, lambda v: base * v)]
        for name in _LOGIT_SOFTCAPS:
            candidates.append(("softcap", name, lambda v: torch.tanh(base / v) * v))
        for op, name, apply in candidates:
            # a field, or a property the config class derives (MiniCPM3's hidden_size / dim_model_base)
            value = 1.0 if name is None else self.fields.get(name, getattr(self.tiny, name, None))
            if isinstance(value, (int, float)) and value and _close(apply(float(value)), logits):
                if name:
                    self.notes.append(f"logits {op} by config.{name}")
                value_expression = f"config.{name}" if name else None
                bias = self._head_bias_expression(model, attr, lm_head.bias is not None)
                return HeadSpec(final_attr, bias, op, value_expression, attr)  # type: ignore[arg-type]
        raise UnsupportedFeature(attr, "logit post-processing matches no template", _HINT)


class _Affine(nn.Module):
    """Norm stand-in: a distinct affine map per norm, so the probe can tell the norms apart."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _Mixer(nn.Module):
    """Attention / MLP stand-in: a fixed nonlinear map; a tuple (output, None) where the real block
    returns one (HF attention: (output, weights); GPT-OSS MoE: (output, router scores))."""

    def __init__(
        self,
        hidden: int,
        generator: torch.Generator,
        is_attention: bool,
        returns_tuple: bool,
        adds_residual: bool = False,
    ) -> None:
        super().__init__()
        self.matrix = torch.randn(hidden, hidden, generator=generator) / hidden**0.5
        self.is_attention = is_attention
        self.returns_tuple = returns_tuple
        self.adds_residual = adds_residual  # like BLOOM's blocks, which take the residual and add it
        self.arity = 2  # of the tuple: (output, None, ...)

    def map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.matrix) if self.is_attention else torch.sin(x @ self.matrix)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.map(hidden_states)
        if self.adds_residual:
            out = out + kwargs.get("residual", args[0] if args else None)
        if self.returns_tuple == "list":  # OpenAI GPT's attention returns [output]
            return [out]
        return (out, *[None] * (self.arity - 1)) if self.returns_tuple else out


@dataclasses.dataclass(frozen=True)
class _Layout:
    attn_pre: str | None
    attn_post: str | None
    mlp_pre: str | None
    mlp_post: str | None
    parallel: bool = False
    residual_multiplier: str | None = None
    norm_after_residual: bool = False
    residual_weights: tuple[str | None, str | None] = (None, None)
    residual_adds: int | None = None

    def apply(
        self,
        x: torch.Tensor,
        norms: dict[str, nn.Module],
        attn: _Mixer,
        mlp: _Mixer,
        multiplier: float,
        weights: dict[str, torch.Tensor] | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        def norm(name: str | None, value: torch.Tensor) -> torch.Tensor:
            return norms[name](value) if name else value

        def kept(slot: int, value: torch.Tensor) -> torch.Tensor:  # the residual, times its weight if any
            name = self.residual_weights[slot]
            return (weights or {})[name] * value if name else value

        scale = multiplier if self.residual_multiplier else 1.0
        if self.parallel:
            normed = norm(self.attn_pre, x)
            mlp_in = norm(self.mlp_pre, x) if self.mlp_pre else normed
            return x + (norm(self.attn_post, attn.map(normed)) + norm(self.mlp_post, mlp.map(mlp_in))) * scale
        if self.norm_after_residual:  # post-LN: each norm takes the residual sum
            x = norm(self.attn_post, x + attn.map(norm(self.attn_pre, x)) * scale)
            return norm(self.mlp_post, x + mlp.map(norm(self.mlp_pre, x)) * scale)
        if self.residual_adds:  # the n-th residual add: sqrt((n - 1) / n) * residual + block / sqrt(n)
            n = 2 * layer_idx + self.residual_adds
            x = math.sqrt((n - 1) / n) * x + norm(
                self.attn_post, attn.map(norm(self.attn_pre, x))
            ) / math.sqrt(n)
            n += 1
            return math.sqrt((n - 1) / n) * x + norm(
                self.mlp_post, mlp.map(norm(self.mlp_pre, x))
            ) / math.sqrt(n)
        x = kept(0, x) + norm(self.attn_post, attn.map(norm(self.attn_pre, x))) * scale
        return kept(1, x) + norm(self.mlp_post, mlp.map(norm(self.mlp_pre, x))) * scale


#: Candidate indices of a layer 0's first residual add, counted from one (Beam's embedding is add one).
_FIRST_RESIDUAL_ADDS = (2, 3)


def _telling_residual_weights(layer: nn.Module, hidden: int) -> dict[str, torch.Tensor]:
    """The layer's own hidden-size vectors (candidate residual weights, Doge's), set in place to
    ``1 + 0.5 * N(0, 1)`` (they start at one, where they would hide), by name."""
    generator = torch.Generator().manual_seed(11)
    found = {}
    for name, parameter in layer.named_parameters(recurse=False):
        if parameter.dim() == 1 and parameter.numel() == hidden:
            with torch.no_grad():
                parameter.copy_(1 + 0.5 * torch.randn(hidden, generator=generator))
            found[name] = parameter.detach()
    return found


def _residual_weight_slots(weights: dict[str, torch.Tensor]) -> list[tuple[str | None, str | None]]:
    """Ways to place the candidate residual weights before the attention's and the feed-forward's
    add: none first, then each vector in each slot (two vectors: both orders)."""
    names: list[str | None] = [*weights, None]
    slots = [(a, m) for a, m in itertools.product(names, repeat=2) if a != m or a is None]
    return sorted(slots, key=lambda slot: slot != (None, None))


class _CosSinTables(nn.Module):
    """A rotary module that returns one complex table (``freqs_cis``, DeepSeek-V2's), read as the
    NeoX (cos, sin) tables it stands for; ``module`` is the transformers module itself."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        return cos_sin_tables(self.module(x, position_ids, **kwargs))


def _raw(rotary: nn.Module) -> nn.Module:
    """The transformers rotary module (what its attention takes) behind a ``_CosSinTables``."""
    return rotary.module if isinstance(rotary, _CosSinTables) else rotary


def _returns_complex(module: nn.Module, hidden: int) -> bool:
    try:
        with torch.no_grad():
            table = module(torch.zeros(1, 2, hidden), torch.arange(2)[None])
    except Exception:  # another signature (a layer_type argument): not the one-table kind
        return False
    return isinstance(table, torch.Tensor) and table.is_complex()


def _rope_kind(table: dict[str, Any]) -> str:
    """A table's rope_type; "dynamic" with a fixed ``alpha`` is "ntk_alpha" (HunYuan's checkpoints
    label a static, alpha-stretched base "dynamic"), which the table check confirms."""
    rope_type = table.get("rope_type", "default")
    return "ntk_alpha" if rope_type == "dynamic" and table.get("alpha") else rope_type


def _hidden_streams(modules: nn.ModuleList, hidden: int) -> bool:
    """A list of square hidden-size linears beside the decoder layers: projections of the hidden state
    into (or out of) extra parallel streams (Gemma 3n's AltUp), not a second stack of layers."""
    return (
        isinstance(modules, nn.ModuleList)
        and len(modules) > 0
        and all(isinstance(m, nn.Linear) and m.in_features == m.out_features == hidden for m in modules)
    )


def _holds_inv_freq(module: nn.Module) -> bool:
    return any("inv_freq" in buffer for buffer, _ in module.named_buffers())


def _attention_rotary(layers: nn.ModuleList) -> tuple[str, nn.Module] | None:
    """(name, module) of the rotary module an attention block holds itself (RecurrentGemma computes
    its tables inside the attention from the position ids), for a model without one of its own; the
    lean file builds it once at the model level (its ``inv_freq`` is no checkpoint key)."""
    for layer in layers:
        for block in layer.children():
            for name, child in block.named_children():
                if _holds_inv_freq(child) and not list(child.parameters()):
                    return name, child
    return None


def _sinusoidal_positions(module: nn.Module, hidden: int) -> bool:
    """A parameter-free module that maps position ids to rows of the hidden width (XGLM's fixed
    sinusoidal table), told from a rotary module by what it returns."""
    parameters = list(inspect.signature(module.forward).parameters)
    if list(module.parameters()) or not parameters or parameters[0] != "position_ids":
        return False
    try:
        with torch.no_grad():
            rows = module(torch.arange(4)[None])
    except Exception:  # not a table of positions
        return False
    return isinstance(rows, torch.Tensor) and tuple(rows.shape) == (1, 4, hidden)


def _position_ids(attn: nn.Module, positions: torch.Tensor) -> dict[str, Any]:
    """``{"position_ids": positions}`` for an attention whose forward takes them (Ministral3's reads
    them for a q scale), and an empty store for each required dict parameter (Gemma 4's
    ``shared_kv_states``, where a layer leaves its keys and values for others: written, not read)."""
    found: dict[str, Any] = _shared_stores(attn)
    if "position_ids" in inspect.signature(attn.forward).parameters:
        found["position_ids"] = positions
    return found


def _shared_stores(module: nn.Module) -> dict[str, dict[str, Any]]:
    """An empty dict for each forward parameter without a default annotated as a dict (a store the
    module may write to for other layers)."""
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    return {
        p.name: {}
        for p in parameters
        if (p.default is p.empty or p.default is None and _kv_store_annotation(p))
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and _shared_stores_annotation(p)
    }


def _refuse_weightless_selectors(layer_path: str, layers: nn.ModuleList, attr: str) -> None:
    """Refuse a child of an attention that holds no weights yet takes three tensors or more (Kolibri
    1.1's ``indexer``, called with the queries, keys and mask: it picks the keys each query attends
    to): no template reproduces what such a child computes, and a probe on hidden states alone
    cannot run it."""
    stack = layer_path.rsplit(".", 1)[0]
    for index, layer in enumerate(layers):
        for name, child in getattr(layer, attr).named_children():
            if any(True for _ in child.parameters()) or isinstance(child, (nn.Dropout, nn.Identity)):
                continue
            required = [
                p.name
                for p in list(inspect.signature(child.forward).parameters.values())
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if len(required) >= 3:
                raise UnsupportedFeature(
                    f"{stack}.{index}.{attr}.{name}",
                    f"a module without weights that takes {', '.join(required)}"
                    f" ({type(child).__name__}: a key selection such as a sparse-attention indexer without"
                    " weights), which no attention template covers",
                    _HINT,
                )


def _kv_store_annotation(parameter: inspect.Parameter) -> bool:
    """An optional store of keys and values other layers read (Kolibri 1.1's ``shared_kv_states:
    KVSharingDict | None = None``): a store layer writes to it whenever it runs."""
    return bool(re.search(r"KVSharingDict|dict\[str, tuple\[", str(parameter.annotation)))


def _shared_stores_annotation(parameter: inspect.Parameter) -> bool:
    """A parameter annotated as a dict (Gemma 4's ``shared_kv_states: KVSharingDict``)."""
    return bool(re.search(r"\b(dict|Dict|\w*Dict)\b", str(parameter.annotation)))


def _needs_recording(attn: nn.Module) -> bool:
    """An attention that cannot run on hidden states alone: a forward parameter without a default
    besides them (BLOOM's residual and alibi) and the stores ``_shared_stores`` fills."""
    parameters = list(inspect.signature(attn.forward).parameters.values())[1:]
    stores = _shared_stores(attn)
    return any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in parameters
        if p.name not in ("position_embeddings", "attention_mask", "position_ids", *stores)
    )


def _output_kind(attn: nn.Module, hidden: int) -> bool | str:
    """How an attention returns its output: a tuple (True, transformers' usual (output, weights)) or
    a list ("list", OpenAI GPT's [output]); a tuple where it cannot run on hidden states alone."""
    try:
        with torch.no_grad():
            output = attn(torch.zeros(1, 2, hidden))
    except Exception:  # needs its model's inputs (RoPE tables, BLOOM's residual): the usual tuple
        return True
    return "list" if isinstance(output, list) else True


def _takes_residual(module: nn.Module) -> bool:
    """Whether a block takes the residual and adds it to its output itself (BLOOM's attention and
    MLP): a ``residual`` parameter of its forward."""
    return "residual" in inspect.signature(module.forward).parameters


def _weight_in_fp32(module: nn.Module, eps: float) -> bool:
    """Whether an RMSNorm run in bf16 multiplies its weight into the fp32 normalised value before the
    cast back (bit for bit), where the Llama norm casts first: told apart on telling weights."""
    if module.weight.dim() != 1:
        return False
    probe = copy.deepcopy(module).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(3)
    width = probe.weight.shape[-1]
    with torch.no_grad():
        probe.weight.copy_(1 + 0.5 * torch.randn(probe.weight.shape, generator=generator))
        x = (torch.randn(4, 7, width, generator=generator) * 3).to(torch.bfloat16)
        try:
            actual = probe(x)
        except Exception:  # not runnable in bf16: the usual cast
            return False
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        in_fp32 = (normed * probe.weight.float()).to(torch.bfloat16)
        cast_first = probe.weight * normed.to(torch.bfloat16)
    return torch.equal(actual, in_fp32) and not torch.equal(actual, cast_first)


def _call_filled(
    module: nn.Module, x: torch.Tensor, kwargs: dict[str, Any] | None = None, fill: Any = "zeros"
) -> Any:
    """``module(x, **kwargs)`` with every other parameter that has no default filled: with zeros
    like ``x`` (a residual) or ``fill`` (None for tensors the layer only passes on, BLOOM's alibi)."""
    kwargs = dict(kwargs or {})
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    signature_names = {p.name for p in parameters}
    for parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.name in kwargs:
            continue
        if parameter.default is parameter.empty:
            kwargs[parameter.name] = torch.zeros_like(x) if fill == "zeros" else fill
    if not any(p.kind == p.VAR_KEYWORD for p in parameters):
        kwargs = {k: v for k, v in kwargs.items() if k in signature_names}
    return module(x, **kwargs)


def _elementwise(module: nn.Module, width: int) -> bool:
    """Whether ``module`` maps each element on its own (an activation, not a norm): changing one input
    element changes only that output element."""
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(8))
    changed = x.clone()
    changed[0, 0] += 1.0
    try:
        with torch.no_grad():
            before, after = module(x), module(changed)
    except Exception:  # not a tensor -> tensor map
        return False
    if not isinstance(before, torch.Tensor) or before.shape != x.shape:
        return False
    diff = (before != after).flatten().tolist()
    return not any(diff[1:])


def _layouts(norm_names: list[str]) -> list[_Layout]:
    """Every way to place the layer's norms in the four sequential or three parallel slots."""
    found = []
    slots = [None, *norm_names]
    for a_pre, a_post, m_pre, m_post in itertools.product(slots, repeat=4):
        used = [n for n in (a_pre, a_post, m_pre, m_post) if n]
        if sorted(used) == sorted(norm_names):
            found.append(_Layout(a_pre, a_post, m_pre, m_post))
    for a_pre, a_post, m_post in itertools.product(slots, repeat=3):
        used = [n for n in (a_pre, a_post, m_post) if n]
        if a_pre and sorted(used) == sorted(norm_names):
            found.append(_Layout(a_pre, a_post, None, m_post, parallel=True))
    for a_pre, m_pre in itertools.product(norm_names, repeat=2):  # parallel, a norm for each block
        if a_pre != m_pre and sorted([a_pre, m_pre]) == sorted(norm_names):
            found.append(_Layout(a_pre, None, m_pre, None, parallel=True))
    for a_post, m_post in itertools.product(norm_names, repeat=2):  # post-LN
        if sorted({a_post, m_post}) == sorted(norm_names):
            found.append(_Layout(None, a_post, None, m_post, norm_after_residual=True))
    return found


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str, table_layout: str
) -> torch.Tensor:
    """Plain RoPE on ``[B, S, N, D]``: the leading ``cos.shape[-1]`` channels, as halves or as pairs."""
    width, half = cos.shape[-1], cos.shape[-1] // 2
    if table_layout == "half":
        width, half = 2 * width, width
    c, s = (t[..., :half] if table_layout in ("neox", "half") else t[..., ::2] for t in (cos, sin))
    c, s = c[:, :, None], s[:, :, None]
    rot, rest = x[..., :width], x[..., width:]
    if style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    else:
        x1, x2 = rot[..., ::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)


@contextlib.contextmanager
def _telling_norm_weights(norms: list[nn.Module | None]) -> Any:
    """Norm weights set to ``1 + 0.5 * N(0, 1)`` for the duration (unit weights hide where a norm
    sits), then restored."""
    weights = [n.weight for n in norms if isinstance(getattr(n, "weight", None), torch.Tensor)]
    saved = [w.detach().clone() for w in weights]
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for weight in weights:
            weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, old in zip(weights, saved, strict=True):
                weight.copy_(old)


@contextlib.contextmanager
def _telling_vectors(vectors: list[torch.Tensor]) -> Any:
    """Parameters set to ``0.3 * N(0, 1)`` for the duration (the lambdas of differential attention
    start near zero, where their pairings would look alike), then restored."""
    saved = [v.detach().clone() for v in vectors]
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for vector in vectors:
            vector.copy_(0.3 * torch.randn(vector.shape, generator=generator))
    try:
        yield
    finally:
        with torch.no_grad():
            for vector, old in zip(vectors, saved, strict=True):
                vector.copy_(old)


def _reference_attention(
    attn: nn.Module,
    spec: AttentionSpec,
    config: PretrainedConfig,
    x: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor] | None,
    style: str,
    table_layout: str,
    scale: float,
    cap: float | None,
    *,
    layout: tuple[int, tuple[str, ...]] = (1, ("q", "k", "v")),
    kv_heads: int | None = None,
    causal: bool = False,
    alibi: bool = False,
    q_scale: torch.Tensor | None = None,
    layer_idx: int = 0,
) -> torch.Tensor:
    """What the spec says the attention computes (no mask), in plain torch, on the HF module's weights.

    ``tables``: (cos, sin) to rotate q and k with, None for attention without RoPE; ``layout``: the
    groups and part order of a fused q/k/v projection; ``kv_heads`` where the config has no field."""
    batch, seq = x.shape[:2]
    heads = config.num_attention_heads
    kv_heads = kv_heads or config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections = [getattr(attn, p.name)(x) for p in spec.projections]
    gate = getattr(attn, spec.gate.name)(x) if spec.output_gate in ("separate", "head_scalar") else None
    if gate is not None and spec.gate_bias:  # one bias per head on the gate's channels (Beam)
        gate = (gate.view(batch, seq, heads, -1) + getattr(attn, spec.gate_bias)[:, None]).reshape(gate.shape)
    if spec.output_gate == "per_head":  # per head [q | gate]
        q_gate = projections[0].view(batch, seq, heads, 2 * head_dim)
        projections[0], gate = q_gate[..., :head_dim], q_gate[..., head_dim:].reshape(batch, seq, -1)
    if spec.fused_qkv:
        q, k, v = split_fused_qkv(projections[0], *layout, heads, kv_heads, head_dim)
    else:
        q, k, v = (t.reshape(batch, seq, -1, head_dim) for t in projections)
        if spec.v_head_dim is not None:  # value heads of another width
            v = projections[2].reshape(batch, seq, kv_heads, -1)
    if spec.v_norm_name:
        v = getattr(attn, spec.v_norm_name)(v)
    if spec.value_scale is not None:
        v = v * eval(spec.value_scale, {"config": config})  # noqa: S307 - a config expression
    q_norm, k_norm = (getattr(attn, name, None) for name in spec.qk_norm_names)
    if q_norm is None:  # switched off by the config (``qk_norm_flag``)
        spec = dataclasses.replace(spec, qk_norm=None)
    if spec.qk_norm is not None and not spec.qk_norm_per_head:
        q, k = (norm(t.flatten(-2)).view(t.shape) for norm, t in ((q_norm, q), (k_norm, k)))
    if spec.qk_norm is not None and spec.qk_norm_per_head and not spec.qk_norm_after_rope:
        q, k = q_norm(q), k_norm(k)
    if tables is not None:
        cos, sin = tables
        q, k = (_rotate(t, cos, -sin if spec.rope_inverse else sin, style, table_layout) for t in (q, k))
    if spec.qk_norm is not None and spec.qk_norm_per_head and spec.qk_norm_after_rope:
        q, k = q_norm(q), k_norm(k)
    if q_scale is not None:  # [B, S]: one factor per query position
        q = q * q_scale[:, :, None, None]
    key_bias = _key_bias_of(attn, spec, v, config)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if key_bias is not None:
        scores = scores + key_bias.repeat_interleave(heads // kv_heads, dim=1)[:, :, None, :]
        window = eval(spec.key_bias_window, {"config": config}) if spec.key_bias_window else None  # noqa: S307
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril() if causal else None
        kept = kept_keys(key_bias, allowed, seq, window)
        if kept is not None:
            scores = scores.masked_fill(~kept.repeat_interleave(heads // kv_heads, dim=1), float("-inf"))
    if alibi:  # slope_h * key position (the query's position would only shift a softmax row)
        scores = scores + alibi_slopes(heads)[:, None, None] * torch.arange(seq, dtype=scores.dtype)
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if spec.sinks and getattr(attn, "sinks", None) is not None:  # one extra logit per head, no value
        sinks = attn.sinks.reshape(1, -1, 1, 1).expand(batch, heads, seq, 1)
        scores = torch.cat((scores, sinks), dim=-1)
    weights = torch.softmax(scores.float(), dim=-1)[..., :seq]
    if spec.differential is not None:
        out = _differential_output(attn, spec, weights, v, heads // kv_heads, layer_idx)
    else:
        out = weights @ v
    out = out.transpose(1, 2).reshape(batch, seq, -1)
    if gate is not None:
        act = F.softplus(gate.float()) if spec.gate_activation == "softplus" else torch.sigmoid(gate)
        out = (out.view(batch, seq, heads, -1) * act.view(batch, seq, heads, -1)).reshape(out.shape)
    if spec.out_norm is not None:
        out = getattr(attn, spec.out_norm_name)(out)
    return getattr(attn, spec.out.name)(out)


def _gate_head_bias(attn: nn.Module, heads: int) -> str:
    """The attention's own vector of one value per head beside a separate output gate (Beam's
    ``gate_bias``, added to each head's gate channels before the activation; the probe confirms it),
    else ""."""
    own = [
        name
        for name, tensor in attn.named_parameters(recurse=False)
        if tensor.dim() == 1 and tensor.numel() == heads and name != "sinks"
    ]
    return own[0] if len(own) == 1 else ""


def _key_bias_parts(attn: nn.Module, linears: dict[str, Any], head_dim: int) -> tuple[str, str] | None:
    """(projection, vector) of a bias per key/value head on the scores, read from the values (Doge's
    ``dt_proj`` of the value heads to one value per KV head, and ``A`` of one value per KV head): the
    one such pair of shapes; None where the attention has none (the probes confirm the formula)."""
    own = [(n, p) for n, p in attn.named_parameters(recurse=False) if p.dim() == 1]
    pairs = [
        (name, vector)
        for name, linear in linears.items()
        for vector, tensor in own
        if linear.out_features == tensor.numel()
        and linear.in_features == tensor.numel() * head_dim
        and not linear.transposed
    ]
    return pairs[0] if len(pairs) == 1 else None


def _key_bias_of(
    attn: nn.Module, spec: AttentionSpec, v: torch.Tensor, config: PretrainedConfig
) -> torch.Tensor | None:
    """``[B, KV, S]``: the spec's bias per key/value head and key, ``exp(A * softplus(dt_proj(values)))``
    from the value heads ``v`` ``[B, S, KV, D]``; None without one."""
    if spec.key_bias is None:
        return None
    projection, vector = (getattr(attn, name) for name in spec.key_bias[:2])
    return torch.exp(vector * F.softplus(projection(v.flatten(-2)))).transpose(1, 2)


def _differential_output(
    attn: nn.Module, spec: AttentionSpec, weights: torch.Tensor, v: torch.Tensor, groups: int, layer_idx: int
) -> torch.Tensor:
    """Differential attention on softmax ``weights`` [B, H, S, S] and the value heads ``v`` (already
    repeated ``groups`` times per KV head): every head reads both halves of the KV heads; heads h and
    h + H/2 pair up as ``a_h - lambda * a_{h + H/2}``, normalised per pair and scaled by 1 - lambda_init."""
    kv = v[:, ::groups]  # the KV heads themselves
    halves = [torch.cat([half, half], dim=1).repeat_interleave(groups, dim=1) for half in kv.chunk(2, dim=1)]
    out = torch.cat([weights @ half for half in halves], dim=-1)  # [B, H, S, 2 * head_dim]
    first, second = out.chunk(2, dim=1)
    a, b, c, d = (getattr(attn, name) for name in spec.differential or ())
    lambda_init = eval(DIFFERENTIAL_LAMBDA_INIT, {"math": math, "layer_idx": layer_idx})  # noqa: S307
    lam = torch.exp((a * b).sum()) - torch.exp((c * d).sum()) + lambda_init
    out = getattr(attn, spec.differential_norm_name)(first - lam * second) * (1 - lambda_init)
    return out  # [B, H/2, S, 2 * head_dim]


def _matches_without_tables(probe: _AttentionProbe, layouts: list[tuple[str, int, tuple[str, ...]]]) -> bool:
    """Whether ``probe``'s attention, called with ``position_embeddings=None`` (as a model passes to
    its NoPE layers, Cohere-Compass's full-attention ones), matches the unrotated math."""
    rotated = probe.expected
    try:
        with torch.no_grad():
            probe.expected = _first(probe.attn(probe.x, position_embeddings=None, attention_mask=None))
    except (TypeError, ValueError, RuntimeError):  # the attention cannot run without its tables
        return False
    try:
        return probe.match(layouts) is not None
    finally:
        probe.expected = rotated


class _AttentionProbe:
    """One HF attention run on fixed inputs (no mask), to compare with the spec's math under
    candidate fused-q/k/v layouts; with a rotary module the inputs carry its tables.

    An attention that needs more than the hidden states (BLOOM's takes the residual and the ALiBi
    tensor its model builds) is instead recorded inside one forward of ``recorded_from`` (model,
    path): causal, with the residual it adds taken off; the match then also tells whether an ALiBi
    bias joins the scores.
    """

    def __init__(
        self,
        attn: nn.Module,
        spec: AttentionSpec,
        config: PretrainedConfig,
        scale: float,
        kv_heads: int,
        rotary: nn.Module | None = None,
        rope: RopeSpec | None = None,
        style: str = "neox",
        kwargs: dict[str, Any] | None = None,
        recorded_from: tuple[nn.Module, str] | None = None,
        positions: torch.Tensor | None = None,
        layer_idx: int = 0,
    ) -> None:
        self.attn, self.spec, self.config, self.scale, self.kv_heads = attn, spec, config, scale, kv_heads
        self.layer_idx = layer_idx
        #: the rotary tables' positions; ``positions`` (same shape) only reach an attention that reads
        #: ``position_ids`` itself, ``q_scale`` ([B, S]) is what the candidate math scales q by
        self.positions = torch.tensor([[0, 3, 1, 7, 2, 5]] * 2)
        self.q_scale: torch.Tensor | None = None
        self.style = style
        self.table_layout = rope.table_layout if rope is not None else "neox"
        self.x = torch.randn(2, 6, config.hidden_size, generator=torch.Generator().manual_seed(5))
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cap = getattr(config, "attn_logit_softcapping", None) if spec.softcap else None
        self.causal, self.alibi_options, self.matched_alibi = False, (False,), False
        if recorded_from is not None:
            self._record(*recorded_from)
            return
        with torch.no_grad():
            if rotary is None or rope is None:
                self.expected = _first(attn(self.x, attention_mask=None))
            else:
                tables = _raw(rotary)(self.x, self.positions, **(kwargs or {}))
                if spec.qk_norm is not None and isinstance(tables, tuple):  # scaled as YaRN's attention
                    tables = tuple(t * 1.25 for t in tables)  # factor does: tells a q/k norm before RoPE
                elif spec.qk_norm is not None and isinstance(tables, torch.Tensor) and tables.is_complex():
                    tables = tables * 1.25  # one complex table (Llama 4's freqs_cis), scaled the same way
                self.tables = tables[::-1] if rope.sin_first else cos_sin_tables(tables)  # from one after
                extra = _position_ids(attn, self.positions if positions is None else positions)
                self.expected = _first(attn(self.x, position_embeddings=tables, attention_mask=None, **extra))

    def _record(self, model: nn.Module, path: str) -> None:
        input_ids = torch.arange(12).reshape(2, 6) % (self.config.vocab_size - 1) + 1
        call = record_calls(
            model,
            [path],
            input_ids=input_ids,
            position_ids=torch.arange(6)[None].expand(2, 6),
            use_cache=False,
        )[path][0]
        self.attn = model.get_submodule(path)
        self.x, self.expected = call.hidden_states, call.result
        if _takes_residual(self.attn):  # the block adds the residual it is given
            residual = call.kwargs.get("residual", call.args[1] if len(call.args) > 1 else None)
            self.expected = self.expected - residual
        self.causal, self.alibi_options = True, (False, True)

    def match(
        self, layouts: list[tuple[str, int, tuple[str, ...]]]
    ) -> tuple[str, int, tuple[str, ...]] | None:
        """The first layout (groups expression, groups, order) under which the math matches HF."""
        for alibi in self.alibi_options:
            for groups, count, order in layouts:
                with torch.no_grad():
                    try:
                        actual = _reference_attention(
                            self.attn, self.spec, self.config, self.x, self.tables, self.style,
                            self.table_layout, self.scale, self.cap, layout=(count, order),
                            kv_heads=self.kv_heads, causal=self.causal, alibi=alibi, q_scale=self.q_scale,
                            layer_idx=self.layer_idx,
                        )  # fmt: skip
                    except RuntimeError:  # the groups do not divide the heads
                        continue
                if _close(actual, self.expected):
                    self.matched_alibi = alibi
                    return groups, count, order
        return None


def _snake(name: str) -> str:
    """``Lfm2MLP`` -> ``lfm2_mlp``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _reading_input(block: nn.Module, linears: dict[str, Projection], hidden: int) -> set[str]:
    """Names of the ``linears`` of ``block`` that one forward feeds the block's own input."""
    x = torch.randn(1, 3, hidden, generator=torch.Generator().manual_seed(3))
    read: set[str] = set()

    def hook(name: str) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor) and torch.equal(args[0], x):
                read.add(name)

        return record

    handles = [proj.module.register_forward_pre_hook(hook(name)) for name, proj in linears.items()]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for handle in handles:
            handle.remove()
    return read
