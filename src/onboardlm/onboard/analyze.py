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
from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature
from onboardlm.models.build_errors import transformers_failure
from onboardlm.onboard.analyze_classic import alibi_slopes, projections, split_fused_qkv
from onboardlm.onboard.analyze_moe import _complex_rotary_table, analyze_mla, analyze_moe
from onboardlm.onboard.spec import (
    ArchitectureSpec,
    AttentionSpec,
    DecoderLayerSpec,
    EmbeddingSpec,
    HeadSpec,
    LinearSpec,
    MLPSpec,
    NormSpec,
    PositionEmbeddingSpec,
    RopeSpec,
    SlidingMode,
)
from onboardlm.onboard.spec_moe import MLASpec, MoESpec
from onboardlm.testing import tiny_config
from onboardlm.testing.capture import record_calls

_TOL = 1e-5
_EPS_NAMES = ("variance_epsilon", "eps", "variance_eps", "epsilon")
_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function", "activation")
#: Activations tried when no config field names the one an MLP applies (BLOOM's tanh GELU).
_LITERAL_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "relu", "silu", "gelu_new")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional", "longrope", "dynamic")
_LOGIT_SCALES = ("logits_scaling", "logit_scale")
#: Scalar multipliers whose default 1.0 would hide them from the probes: set to telling values.
_TELLING_MULTIPLIERS = {
    "embedding_multiplier": 1.9,
    "residual_multiplier": 0.7,
    "logits_scaling": 2.5,
    "logit_scale": 0.4,
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
    for name, value in _TELLING_MULTIPLIERS.items():
        if isinstance(getattr(tiny, name, None), float):
            with contextlib.suppress(AttributeError):  # a read-only property derived from other fields
                setattr(tiny, name, value)
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
    if _complex_rotary(model):
        raise UnsupportedFeature(
            f"{model.base_model_prefix}.rotary_emb",
            "complex-frequency RoPE (one complex table, no cos/sin)",
            _HINT,
        )
    try:
        return _Analyzer(config, tiny, model).spec()
    except (AttributeError, TypeError, IndexError, KeyError, ValueError, RuntimeError) as err:
        # raised inside a transformers module on a probe input: name that module and its line
        located = transformers_failure(tiny, err, "fails on the analyzer's probe input")
        raise located or UnsupportedFeature(
            type(config).__name__, f"analysis failed ({type(err).__name__}: {err})", _HINT
        ) from err


def _complex_rotary(model: nn.Module) -> bool:
    """Whether the rotary module returns one complex table (DeepSeek-V2) instead of cos and sin."""
    try:
        return _complex_rotary_table(model)
    except Exception:  # a rotary module with another signature: the RoPE probe looks at it
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=_TOL, atol=_TOL)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _config_fields(config: PretrainedConfig) -> dict[str, Any]:
    return {**config.to_dict(), **{k: getattr(config, k) for k in vars(config) if not k.startswith("_")}}


class _Analyzer:
    """One measurement session over a tiny HF model; ``spec()`` runs every probe."""

    def __init__(self, config: PretrainedConfig, tiny: PretrainedConfig, model: nn.Module) -> None:
        self.config, self.tiny, self.model = config, tiny, model
        self.fields = _config_fields(tiny)
        self.hidden = tiny.hidden_size
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------------------- top

    def spec(self) -> ArchitectureSpec:
        model = self.model
        prefix = model.base_model_prefix
        inner = getattr(model, prefix, None)
        if inner is None:
            raise UnsupportedFeature(type(model).__name__, f"no base model at '{prefix}'", _HINT)
        head_attr = self._head_attr(model)
        self._check_children(model, "", {prefix, head_attr})
        stack_attr, self.stack = self._stack(inner)
        path = f"{prefix}.{stack_attr}" if stack_attr else prefix
        parts = self._model_parts(self.stack, path)
        layers = parts["layers"][1]
        layer = layers[0]
        if len({type(m).__name__ for m in layers}) != 1:
            raise UnsupportedFeature(f"{path}.{parts['layers'][0]}", "decoder layers of different classes")
        layer_path = f"{path}.{parts['layers'][0]}.0"
        rope = self._rope(self.stack, path, parts.get("rotary"))
        attention = analyze_mla(self.tiny, model)  # multi-head latent attention, else MHA/GQA
        if attention is None:
            attention, rope = self._attention(layer_path, layers, rope)
        feed_forward = analyze_moe(self.tiny, model) or self._mlp(layer_path, layer, attention.attr)
        self.notes += [
            block.note for block in (attention, feed_forward) if isinstance(block, (MLASpec, MoESpec))
        ]
        decoder = self._decoder(layer_path, layer, attention.attr, feed_forward)
        final_attr = self._final_norm_attr(path, parts, decoder)
        self._layer_norm_spec = decoder.norm
        embedding = self._embedding(self.stack, path, parts, layer)
        head = self._head(model, inner, final_attr, head_attr)
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

    def _check_children(self, module: nn.Module, path: str, known: set[str]) -> None:
        for name, child in module.named_children():
            if name not in known and not isinstance(child, nn.Dropout):
                where = f"{path}.{name}" if path else name
                raise UnsupportedFeature(where, f"unrecognised module {type(child).__name__}", _HINT)

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
        if self._norm(f"{path}.{final_attr}", final_norm) != decoder.norm:
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
        for name, child in inner.named_children():
            if isinstance(child, nn.Dropout):
                continue
            leaf = not list(child.children())
            if child is tokens:
                role = "embed"
            elif isinstance(child, nn.Embedding):
                role = "positions"
            elif isinstance(child, nn.ModuleList):
                role = "layers"
            elif leaf and _sinusoidal_positions(child, self.hidden):  # fixed sin/cos rows (XGLM)
                role = "positions"
            elif any("inv_freq" in buffer for buffer, _ in child.named_buffers()) or (
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
            else:
                raise UnsupportedFeature(
                    f"{prefix}.{name}", f"unrecognised module {type(child).__name__}", _HINT
                )
            if role in parts:
                raise UnsupportedFeature(f"{prefix}.{name}", f"a second {role} module", _HINT)
            parts[role] = (name, child)
        if len(norms) == 1:
            parts["norm"] = norms[0]
        elif len(norms) == 2 and "layers" in parts:
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
        width = tuple(weight.shape) if weight is not None else (self.hidden,)  # 2-D: one row per head
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
                rebuilt = type(layer)(flipped, 0)
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
                rebuilt = type(layer)(flipped, 0)
            except Exception:  # a field whose flip the config or the layer refuses tells nothing
                continue
            try:
                rebuilt.get_submodule(path)
            except AttributeError:
                return f"config.{name}"
        return None

    # ---------------------------------------------------------------------------------------- rope

    def _rope(self, inner: nn.Module, prefix: str, rotary: tuple[str, nn.Module] | None) -> RopeSpec | None:
        if rotary is None:
            return None
        attr, module = rotary
        params = getattr(self.tiny, "rope_parameters", None) or {}
        per_layer_type = "layer_type" in inspect.signature(module.forward).parameters
        tables = params.values() if per_layer_type else [params]
        rope_types = tuple(sorted({table.get("rope_type", "default") for table in tables if table}))
        for rope_type in rope_types:
            if rope_type not in _ROPE_TYPES:
                raise UnsupportedFeature(f"{prefix}.{attr}", f"rope_type {rope_type!r}", _HINT)
        x = torch.zeros(1, 6, self.hidden)
        positions = torch.arange(6)[None] + 3
        layer_types = sorted(set(getattr(self.tiny, "layer_types", None) or [])) if per_layer_type else [None]
        head_dim = self._head_dim()
        styles, dims = set(), set()
        sin_first = self._sin_first(module, x, per_layer_type, layer_types)
        for layer_type in layer_types:
            kwargs = {"layer_type": layer_type} if per_layer_type else {}
            cos = module(x, positions, **kwargs)[1 if sin_first else 0]
            half = cos.shape[-1] // 2
            if torch.equal(cos[..., :half], cos[..., half:]):
                styles.add("neox")
            elif torch.equal(cos[..., ::2], cos[..., 1::2]):
                styles.add("interleaved")
            elif 2 * cos.shape[-1] == head_dim or not params:  # each frequency once (GPT-OSS, GPT-J)
                styles.add("half")
                dims.add(2 * cos.shape[-1])
                continue
            else:
                raise UnsupportedFeature(
                    f"{prefix}.{attr}", "rotary tables in an unknown channel layout", _HINT
                )
            dims.add(cos.shape[-1])
        if len(styles) != 1 or len(dims) != 1:
            raise UnsupportedFeature(f"{prefix}.{attr}", "rotary layout differs between layer types", _HINT)
        rotary_dim = dims.pop()
        partial = rotary_dim != head_dim
        layout = styles.pop()
        if not params:  # no rope_parameters: a base and a rotary dim the architecture fixes
            base, dim = self._fixed_rope(f"{prefix}.{attr}", module, rotary_dim, sin_first, layout)
            self.notes.append(f"RoPE base {base:g} on {dim}" + (", partial" if partial else ""))
            return RopeSpec(
                type(module).__name__,
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
        expected_dim = (
            int(head_dim * params.get("partial_rotary_factor", 1.0)) if not per_layer_type else head_dim
        )
        if rotary_dim != expected_dim:
            raise UnsupportedFeature(
                f"{prefix}.{attr}", f"rotary dim {rotary_dim} is not derived from head_dim", _HINT
            )
        self.notes.append(f"RoPE types {', '.join(rope_types)}" + (", partial" if partial else ""))
        return RopeSpec(
            type(module).__name__,
            attr,
            layout,
            layout,
            rope_types,
            partial,
            per_layer_type,
            sin_first,  # type: ignore[arg-type]
        )

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

    def _head_dim(self) -> int:
        return getattr(self.tiny, "head_dim", None) or self.tiny.hidden_size // self.tiny.num_attention_heads

    # ---------------------------------------------------------------------------------------- attention

    def _attention(
        self, layer_path: str, layers: nn.ModuleList, rope: RopeSpec | None
    ) -> tuple[AttentionSpec, RopeSpec | None]:
        layer = layers[0]
        attr = self._attention_attr(layer_path, layer)
        path = f"{layer_path}.{attr}"
        attn = getattr(layer, attr)
        weights = [{name for name, _ in getattr(other, attr).named_parameters()} for other in layers]
        for index, names in enumerate(weights):
            if names != weights[0]:
                extra = sorted(names ^ weights[0])[0]
                where = path if extra in weights[0] else path.replace(".0.", f".{index}.", 1)
                raise UnsupportedFeature(f"{where}.{extra}", "attention weights only some layers have", _HINT)
        heads, head_dim = self.tiny.num_attention_heads, self._head_dim()
        q_size = heads * head_dim
        linears = projections(attn)
        norms = {n: c for n, c in attn.named_children() if n not in linears and not isinstance(c, nn.Dropout)}
        separate = ["q_proj", "k_proj", "v_proj"]
        if set(separate) <= set(linears):
            ins = separate
            kv_heads = linears["k_proj"].out_features // head_dim
        else:
            ins = [
                n
                for n, c in linears.items()
                if c.in_features == self.hidden and c.out_features > q_size and c.out_features % head_dim == 0
            ]
            kv_heads = (linears[ins[0]].out_features // head_dim - heads) // 2 if len(ins) == 1 else 0
        outs = [n for n in linears if n not in ins]
        fused = ins != separate
        if len(ins) != 1 + 2 * (not fused) or len(outs) != 1 or kv_heads < 1 or heads % kv_heads:
            raise UnsupportedFeature(path, f"attention projections {sorted(linears)}", _HINT)
        kv_size = kv_heads * head_dim
        widths = [linears[n].out_features for n in ins]
        if widths != ([q_size, kv_size, kv_size] if not fused else [q_size + 2 * kv_size]):
            raise UnsupportedFeature(path, f"projection widths {widths} != heads x head_dim", _HINT)
        if (linears[outs[0]].in_features, linears[outs[0]].out_features) != (q_size, self.hidden):
            raise UnsupportedFeature(
                f"{path}.{outs[0]}", "output projection is not heads x head_dim -> hidden", _HINT
            )
        biases = self._bias_expressions(layer, [f"{attr}.{n}" for n in linears])
        projections_spec = tuple(LinearSpec(n, biases[f"{attr}.{n}"], linears[n].transposed) for n in ins)
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
        spec = AttentionSpec(
            class_name=type(attn).__name__,
            attr=attr,
            kind=kind,
            projections=projections_spec,
            out=LinearSpec(outs[0], biases[f"{attr}.{outs[0]}"], linears[outs[0]].transposed),
            fused_qkv=fused,
            scaling=scaling,
            qk_norm=qk_norm,
            qk_norm_names=qk_names,
            qk_norm_per_head=per_head,
            qk_norm_flag=self._module_flag(layer, f"{attr}.{qk_names[0]}") if qk_norm else None,
            sliding=self._sliding(path),
            softcap=self._attention_softcap(),
            rope_flag=self._rope_flag(path, uses_rope) if rope is not None else None,
            sinks=isinstance(getattr(attn, "sinks", None), torch.Tensor),
            kv_heads=self._kv_heads_expression(path, kv_heads),
            **real,
        )
        if rope is not None:
            index = uses_rope.index(True) if True in uses_rope else 0
            spec, rope = self._probe_attention(path, index, layers[index], spec, scale, rope, kv_heads)
        else:
            spec = self._probe_plain_attention(path, layer, spec, scale, kv_heads)
        if spec.fused_qkv:
            spec = dataclasses.replace(spec, qkv_switches=self._qkv_switches(path, layer, spec, rope))
        if spec.fused_qkv and spec.qkv_order != ("q", "k", "v") or spec.qkv_groups != "1":
            self.notes.append(f"fused qkv in {spec.qkv_groups} group(s) of {'/'.join(spec.qkv_order)}")
        return spec, rope

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
        if len(attrs) != 1:
            raise UnsupportedFeature(
                layer_path, f"expected one attention block, found {attrs or 'none'}", _HINT
            )
        return attrs[0]

    def _kv_heads_expression(self, path: str, kv_heads: int) -> str:
        config_kv = getattr(self.tiny, "num_key_value_heads", None)
        if isinstance(config_kv, int) and config_kv == kv_heads:
            return "config.num_key_value_heads"
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
        attn = getattr(layer, spec.attr)
        kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
        rotary = getattr(self.stack, rope.attr)
        for style in ("neox", "interleaved"):
            probe = _AttentionProbe(attn, spec, self.tiny, scale, kv_heads, rotary, rope, style, kwargs)
            found = probe.match(self._qkv_layouts(spec, kv_heads))
            if found is not None:
                self.notes.append(f"RoPE rotates {style} channels")
                spec = self._confirm_groups(path, layer, spec, found, rope, style, kwargs)
                return spec, dataclasses.replace(rope, style=style)
        raise UnsupportedFeature(
            path, "attention output matches no template (RoPE application, scale or wiring)", _HINT
        )

    def _probe_plain_attention(
        self, path: str, layer: nn.Module, spec: AttentionSpec, scale: float, kv_heads: int
    ) -> AttentionSpec:
        """Attention without RoPE: the HF output (no mask) against the spec's math."""
        attn = getattr(layer, spec.attr)
        recorded = (self.model, path) if _needs_recording(attn) else None
        probe = _AttentionProbe(attn, spec, self.tiny, scale, kv_heads, recorded_from=recorded)
        found = probe.match(self._qkv_layouts(spec, kv_heads))
        if found is None and recorded is None:  # it masks causally by itself (OpenAI GPT): as called
            probe = _AttentionProbe(attn, spec, self.tiny, scale, kv_heads, recorded_from=(self.model, path))
            found = probe.match(self._qkv_layouts(spec, kv_heads))
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
            rebuilt = type(layer)(config, 0)
            weights = [{k for k in m.state_dict() if not k.endswith(".bias")} for m in (rebuilt, layer)]
            if weights[0] != weights[1]:
                return "other modules"  # the flip builds other modules: more than a layout
            attn = getattr(rebuilt, spec.attr).float().eval()
            fused = getattr(attn, spec.projections[0].name)
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            rotary = None
            if rope is not None:
                rotary = type(getattr(self.stack, rope.attr))(config)
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
            setattr(rebuilt, spec.attr, getattr(type(layer)(variant, 0), spec.attr).float().eval())
            attn = getattr(rebuilt, spec.attr)
            rotary = None
            if rope is not None:
                rotary = type(getattr(self.stack, rope.attr))(variant)
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

    def _scaling(self, path: str, attn: nn.Module, head_dim: int) -> tuple[str, float]:
        measured = getattr(attn, "scaling", head_dim**-0.5)
        candidates = [
            ("config.attention_multiplier", self.fields.get("attention_multiplier")),
            ("config.query_pre_attn_scalar**-0.5", self._power(self.fields.get("query_pre_attn_scalar"))),
            ("self.head_dim**-0.5", head_dim**-0.5),
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
        rotary = getattr(self.stack, rope.attr)
        uses = []
        for index, layer in enumerate(layers):
            outputs = []
            for order in ([0, 1, 2, 3, 4], [4, 0, 3, 1, 2]):  # RoPE is relative: reorder, not shift
                kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
                tables = rotary(x, torch.tensor([order]), **kwargs)
                with torch.no_grad():
                    outputs.append(
                        _first(getattr(layer, attr)(x, position_embeddings=tables, attention_mask=None))
                    )
            uses.append(not _close(outputs[0], outputs[1]))
        return uses

    def _rope_flag(self, path: str, uses: list[bool]) -> str | None:
        """None when every layer uses RoPE, else the config expression saying which layers do."""
        if all(uses):
            return None
        for name, value in self.fields.items():
            if not isinstance(value, list) or len(value) != len(uses):
                continue
            if [bool(v) for v in value] == uses:
                self.notes.append(f"NoPE layers ({name})")
                return f"config.{name}[layer_idx]"
            for kind in sorted({v for v in value if isinstance(v, str)}):
                if [v == kind for v in value] == uses:
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
        if len(others) != 1:
            raise UnsupportedFeature(path, f"feed-forward submodules {sorted(others)}", _HINT)
        act_attr = next(iter(others))
        downs = [n for n, c in linears.items() if c.out_features == self.hidden]
        ins = [n for n in linears if n not in downs]
        if len(downs) != 1 or not 1 <= len(ins) <= 2:
            raise UnsupportedFeature(path, f"feed-forward projections {sorted(linears)}", _HINT)
        kind, inputs, act = self._mlp_wiring(path, mlp, [linears[n] for n in ins], ins, linears[downs[0]])
        width = linears[downs[0]].in_features
        biases = self._bias_expressions(layer, [f"{attr}.{n}" for n in linears])
        self.notes.append(f"{kind} MLP, {act}")
        if any(linear.transposed for linear in linears.values()):
            self.notes.append("Conv1D feed-forward projections, weights stored transposed")
        return MLPSpec(
            class_name=type(mlp).__name__,
            attr=attr,
            kind=kind,
            inputs=tuple(LinearSpec(n, biases[f"{attr}.{n}"], linears[n].transposed) for n in inputs),
            down=LinearSpec(downs[0], biases[f"{attr}.{downs[0]}"], linears[downs[0]].transposed),
            act_attr=act_attr,
            act=act if act.startswith('"') else f"config.{act}",
            intermediate=self._intermediate(path, layer, f"{attr}.{downs[0]}", width),
            activation=act.strip('"') if act.startswith('"') else str(getattr(self.config, act)),
        )

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
            if v == width and isinstance(v, int) and not isinstance(v, bool) and ("inner" in n or "ffn" in n)
        ]
        if sizes:
            return f"config.{sizes[0]}"
        if width % self.hidden:
            raise UnsupportedFeature(path, f"intermediate width {width} is no config field", _HINT)
        default = f"{width // self.hidden} * config.hidden_size"
        for name, value in self.fields.items():
            if value is not None or not any(word in name for word in ("inner", "intermediate", "ffn")):
                continue
            flipped = copy.deepcopy(self.tiny)
            try:
                setattr(flipped, name, 3 * self.hidden)
                rebuilt = type(layer)(flipped, 0).get_submodule(down_path)
            except Exception:  # a field the layer does not take as a width tells nothing
                continue
            if 3 * self.hidden in tuple(rebuilt.weight.shape):
                return f"config.{name} or {default}"
        return default

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
        self, path: str, mlp: nn.Module, ins: list[nn.Linear], names: list[str], down: nn.Linear
    ) -> tuple[str, list[str], str]:
        """Which input is the gate, whether a fused projection is (gate, up), which activation field."""
        x = torch.randn(2, 3, self.hidden, generator=torch.Generator().manual_seed(3))
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
        for field_name in _ACT_FIELDS:
            act_name = self.fields.get(field_name)
            if not isinstance(act_name, str) or act_name not in ACT2FN:
                continue
            act = ACT2FN[act_name]
            for kind, order, combine in variants:
                with torch.no_grad():
                    if _close(down(combine(act)), expected):
                        return kind, order, field_name
        for act_name in _LITERAL_ACTIVATIONS:  # no config field names it: the module hard-codes one
            for kind, order, combine in variants:
                with torch.no_grad():
                    if _close(down(combine(ACT2FN[act_name])), expected):
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
        specs = {self._norm(f"{layer_path}.{n}", getattr(layer, n)) for n in norm_names}
        if len(specs) != 1:
            raise UnsupportedFeature(layer_path, "decoder norms of different kinds (or none)", _HINT)
        layout = self._probe_layout(layer, attn_attr, ff, norm_names)
        if layout is None:
            raise UnsupportedFeature(
                layer_path, f"residual layout with norms {norm_names} matches no template", _HINT
            )
        self.notes.append(
            "parallel attention + MLP"
            if layout.parallel
            else f"post-LN: {layout.attn_post} and {layout.mlp_post} normalise the residual sums"
            if layout.norm_after_residual
            else f"norm layout {layout.attn_pre}/{layout.attn_post}"
        )
        spec = DecoderLayerSpec(type(layer).__name__, specs.pop(), **vars(layout))
        return dataclasses.replace(
            spec, switches=self._layout_switches(layer, attn_attr, ff, spec, norm_names)
        )

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
                rebuilt = type(layer)(self._flip({name: not current}), 0).float().eval()
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
        self, layer: nn.Module, attn_attr: str, ff: MLPSpec | MoESpec, norm_names: list[str]
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
        x = torch.randn(2, 5, self.hidden, generator=generator)
        tables = (torch.ones(2, 5, self._head_dim()), torch.zeros(2, 5, self._head_dim()))
        inputs = {
            "attention_mask": None,
            "position_ids": torch.arange(5)[None],
            "position_embeddings": tables,
        }
        with torch.no_grad():
            expected = _first(_call_filled(probe, x, inputs, fill=None))
        multiplier = self.fields.get("residual_multiplier")
        multipliers = [None] + (["config.residual_multiplier"] if isinstance(multiplier, float) else [])
        for layout in _layouts(norm_names):
            for scale in multipliers:
                candidate = dataclasses.replace(layout, residual_multiplier=scale)
                if _close(candidate.apply(x, stand_ins, attn, mlp, multiplier or 1.0), expected):
                    return candidate
        return None

    # ---------------------------------------------------------------------------------------- model

    def _embedding(
        self, inner: nn.Module, prefix: str, parts: dict[str, tuple[str, Any]], layer: nn.Module
    ) -> EmbeddingSpec:
        """The first layer's input against the raw embedding rows: a scale matched to config
        expressions, plus learned position rows (at some offset) and a norm where the model has them."""
        attr, embed = parts["embed"]
        positions, embed_norm = parts.get("positions"), parts.get("embed_norm")
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
        ]
        offsets: list[int | None] = [None] if positions is None else list(range(4))
        for expression, value in candidates:
            if not isinstance(value, float):
                continue
            for offset in offsets:
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
                    if embed_norm is not None:
                        expected = embed_norm[1](expected)
                if not _close(captured[0], expected):
                    continue
                if expression and scaled_class:
                    expression = self._embedding_scale_flags(attr, expression, value)
                if expression:
                    self.notes.append(f"embeddings scaled by {expression}")
                spec = EmbeddingSpec(
                    attr,
                    expression,
                    scaled_class if expression else None,
                    padding_idx=hasattr(self.tiny, "pad_token_id"),
                    positions=self._positions(prefix, positions, offset) if offset is not None else None,
                    norm=self._embedding_norm(prefix, embed_norm, layer),
                )
                return self._projected(prefix, spec, embed, project_in, project_out)
        raise UnsupportedFeature(f"{prefix}.{attr}", "embedding scale from no known config field", _HINT)

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
        if half > 1:
            angles = torch.atan2(rows[:, 1], rows[:, half + 1])  # the second frequency, row by row
            step = torch.remainder(angles[1] - angles[0], 2 * torch.pi)  # = f_1 = base^(-1 / (half - 1))
            base = float(f"{float(step ** -(half - 1)):.6g}") if 0 < step < 1 else 0.0
            freqs = base ** (-torch.arange(half, dtype=torch.float64) / (half - 1)) if base > 1 else None
            for offset in range(4) if freqs is not None else ():
                table = (position_ids[0, :, None] + offset).double() * freqs
                if torch.allclose(torch.cat((table.sin(), table.cos()), -1), rows, atol=1e-5):
                    self.notes.append(
                        f"sinusoidal absolute position embeddings (base {base:g}, offset {offset})"
                    )
                    return PositionEmbeddingSpec(
                        attr, offset, sinusoidal_base=base, class_name=type(module).__name__
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

    def _head(self, model: nn.Module, inner: nn.Module, final_attr: str, attr: str) -> HeadSpec:
        """Compare the logits with lm_head(final hidden state) under the known post-processings."""
        lm_head = getattr(model, attr)
        if not isinstance(lm_head, nn.Linear):
            raise UnsupportedFeature(attr, f"head {type(lm_head).__name__}", _HINT)
        input_ids, positions = torch.arange(1, 6)[None], torch.arange(5)[None]
        with torch.no_grad():
            hidden = inner(input_ids=input_ids, position_ids=positions).last_hidden_state
            logits = model(input_ids=input_ids, position_ids=positions).logits
            base = lm_head(hidden)
        candidates: list[tuple[str, str | None, Callable[[float], torch.Tensor]]] = [
            ("none", None, lambda _v: base)
        ]
        for name in _LOGIT_SCALES:  # MuP-style scales: Granite divides, Cohere and HyperCLOVA X multiply
            candidates += [("divide", name, lambda v: base / v), ("multiply", name, lambda v: base * v)]
        candidates.append(("softcap", "final_logit_softcapping", lambda v: torch.tanh(base / v) * v))
        for op, name, apply in candidates:
            value = 1.0 if name is None else self.fields.get(name)
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

    def map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.matrix) if self.is_attention else torch.sin(x @ self.matrix)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.map(hidden_states)
        if self.adds_residual:
            out = out + kwargs.get("residual", args[0] if args else None)
        if self.returns_tuple == "list":  # OpenAI GPT's attention returns [output]
            return [out]
        return (out, None) if self.returns_tuple else out


@dataclasses.dataclass(frozen=True)
class _Layout:
    attn_pre: str | None
    attn_post: str | None
    mlp_pre: str | None
    mlp_post: str | None
    parallel: bool = False
    residual_multiplier: str | None = None
    norm_after_residual: bool = False

    def apply(
        self, x: torch.Tensor, norms: dict[str, nn.Module], attn: _Mixer, mlp: _Mixer, multiplier: float
    ) -> torch.Tensor:
        def norm(name: str | None, value: torch.Tensor) -> torch.Tensor:
            return norms[name](value) if name else value

        scale = multiplier if self.residual_multiplier else 1.0
        if self.parallel:
            normed = norm(self.attn_pre, x)
            mlp_in = norm(self.mlp_pre, x) if self.mlp_pre else normed
            return x + (norm(self.attn_post, attn.map(normed)) + norm(self.mlp_post, mlp.map(mlp_in))) * scale
        if self.norm_after_residual:  # post-LN: each norm takes the residual sum
            x = norm(self.attn_post, x + attn.map(norm(self.attn_pre, x)) * scale)
            return norm(self.mlp_post, x + mlp.map(norm(self.mlp_pre, x)) * scale)
        x = x + norm(self.attn_post, attn.map(norm(self.attn_pre, x))) * scale
        return x + norm(self.mlp_post, mlp.map(norm(self.mlp_pre, x))) * scale


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


def _needs_recording(attn: nn.Module) -> bool:
    """An attention that cannot run on hidden states alone: a forward parameter without a default
    besides them (BLOOM's residual and alibi)."""
    parameters = list(inspect.signature(attn.forward).parameters.values())[1:]
    return any(
        p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in parameters
        if p.name not in ("position_embeddings", "attention_mask")
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
) -> torch.Tensor:
    """What the spec says the attention computes (no mask), in plain torch, on the HF module's weights.

    ``tables``: (cos, sin) to rotate q and k with, None for attention without RoPE; ``layout``: the
    groups and part order of a fused q/k/v projection; ``kv_heads`` where the config has no field."""
    batch, seq = x.shape[:2]
    heads = config.num_attention_heads
    kv_heads = kv_heads or config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections = [getattr(attn, p.name)(x) for p in spec.projections]
    if spec.fused_qkv:
        q, k, v = split_fused_qkv(projections[0], *layout, heads, kv_heads, head_dim)
    else:
        q, k, v = (t.view(batch, seq, -1, head_dim) for t in projections)
    q_norm, k_norm = (getattr(attn, name, None) for name in spec.qk_norm_names)
    if q_norm is None:  # switched off by the config (``qk_norm_flag``)
        spec = dataclasses.replace(spec, qk_norm=None)
    if spec.qk_norm is not None and not spec.qk_norm_per_head:
        q, k = (norm(t.flatten(-2)).view(t.shape) for norm, t in ((q_norm, q), (k_norm, k)))
    if spec.qk_norm is not None and spec.qk_norm_per_head:
        q, k = q_norm(q), k_norm(k)
    if tables is not None:
        q, k = (_rotate(t, *tables, style, table_layout) for t in (q, k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if alibi:  # slope_h * key position (the query's position would only shift a softmax row)
        scores = scores + alibi_slopes(heads)[:, None, None] * torch.arange(seq, dtype=scores.dtype)
    if causal:
        scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if spec.sinks:  # one extra logit per head in the denominator, contributing no value
        sinks = attn.sinks.reshape(1, -1, 1, 1).expand(batch, heads, seq, 1)
        scores = torch.cat((scores, sinks), dim=-1)
    out = torch.softmax(scores.float(), dim=-1)[..., :seq] @ v
    return getattr(attn, spec.out.name)(out.transpose(1, 2).reshape(batch, seq, heads * head_dim))


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
    ) -> None:
        self.attn, self.spec, self.config, self.scale, self.kv_heads = attn, spec, config, scale, kv_heads
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
                tables = rotary(self.x, torch.tensor([[0, 3, 1, 7, 2, 5]] * 2), **(kwargs or {}))
                self.tables = tables[::-1] if rope.sin_first else tables
                self.expected = _first(attn(self.x, position_embeddings=tables, attention_mask=None))

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
                            kv_heads=self.kv_heads, causal=self.causal, alibi=alibi,
                        )  # fmt: skip
                    except RuntimeError:  # the groups do not divide the heads
                        continue
                if _close(actual, self.expected):
                    self.matched_alibi = alibi
                    return groups, count, order
        return None
