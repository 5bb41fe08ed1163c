"""Phase 1b: measure an ArchitectureSpec from the transformers model built on a tiny config.

Structure comes from the module tree (class names, children, parameter shapes). Behaviour comes from
numeric probes of HF modules against the math each template emits: the norm formula (RMS or
mean-centred, ``1 + w`` offset, epsilon), the MLP wiring and activation, the residual layout (stand-in
blocks in a copy of the decoder layer), which layers use RoPE and how attention rotates q/k (the whole
attention block against a plain-torch reference), embedding and logit scaling, and whether a sliding
window is applied. Which config field switches a bias or an optional module comes from toggling the
field and rebuilding the layer. A module or behaviour that no template covers raises
``UnsupportedFeature`` naming the module path.
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
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze_moe import analyze_mla, analyze_moe
from onboardlm.onboard.spec import (
    ArchitectureSpec,
    AttentionSpec,
    DecoderLayerSpec,
    EmbeddingSpec,
    HeadSpec,
    LinearSpec,
    MLPSpec,
    NormSpec,
    RopeSpec,
    SlidingMode,
)
from onboardlm.onboard.spec_moe import MLASpec, MoESpec
from onboardlm.testing import tiny_config

_TOL = 1e-5
_EPS_NAMES = ("variance_epsilon", "eps", "variance_eps", "epsilon")
_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function")
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


def analyze(config: PretrainedConfig) -> ArchitectureSpec:
    """Measure the architecture of ``config``'s transformers causal LM (built tiny, random weights)."""
    try:
        tiny = tiny_config(config)
    except ValueError as err:
        raise UnsupportedFeature(type(config).__name__, str(err), "pass the text decoder's config") from err
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
    try:
        return _Analyzer(config, tiny, model).spec()
    except (AttributeError, TypeError, IndexError, KeyError, RuntimeError) as err:
        raise UnsupportedFeature(
            type(config).__name__, f"analysis failed ({type(err).__name__}: {err})", _HINT
        ) from err


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=_TOL, atol=_TOL)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


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
        self._check_children(model, "", {prefix, "lm_head"})
        parts = self._model_parts(inner, prefix)
        layers = parts["layers"][1]
        layer = layers[0]
        if len({type(m).__name__ for m in layers}) != 1:
            raise UnsupportedFeature(f"{prefix}.{parts['layers'][0]}", "decoder layers of different classes")
        layer_path = f"{prefix}.{parts['layers'][0]}.0"
        rope = self._rope(inner, prefix, parts.get("rotary"))
        attention = analyze_mla(self.tiny, model)  # multi-head latent attention, else MHA/GQA
        if attention is None:
            attention, rope = self._attention(layer_path, layers, rope)
        feed_forward = analyze_moe(self.tiny, model) or self._mlp(layer_path, layer, attention.attr)
        self.notes += [
            block.note for block in (attention, feed_forward) if isinstance(block, (MLASpec, MoESpec))
        ]
        decoder = self._decoder(layer_path, layer, attention.attr, feed_forward.attr)
        final_attr, final_norm = parts["norm"]
        final_spec = self._norm(f"{prefix}.{final_attr}", final_norm)
        if final_spec != decoder.norm:
            raise UnsupportedFeature(
                f"{prefix}.{final_attr}", "final norm differs from the layer norms", _HINT
            )
        embedding = self._embedding(inner, prefix, parts["embed"][0], layer)
        head = self._head(model, inner, final_attr)
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
            tie_word_embeddings=bool(getattr(self.config, "tie_word_embeddings", False)),
            layer_types=tuple(layer_types) if isinstance(layer_types, list) else (),
            notes=tuple(self.notes),
        )

    def _check_children(self, module: nn.Module, path: str, known: set[str]) -> None:
        for name, child in module.named_children():
            if name not in known and not isinstance(child, nn.Dropout):
                where = f"{path}.{name}" if path else name
                raise UnsupportedFeature(where, f"unrecognised module {type(child).__name__}", _HINT)

    def _model_parts(self, inner: nn.Module, prefix: str) -> dict[str, tuple[str, Any]]:
        """Embedding, layer list, final norm and rotary module of the inner model, by what they are."""
        parts: dict[str, tuple[str, Any]] = {}
        for name, child in inner.named_children():
            if isinstance(child, nn.Dropout):
                continue
            if isinstance(child, nn.Embedding):
                role = "embed"
            elif isinstance(child, nn.ModuleList):
                role = "layers"
            elif any("inv_freq" in buffer for buffer, _ in child.named_buffers()):
                role = "rotary"
            elif not list(child.children()):  # a leaf: the final norm (the probe checks it is one)
                role = "norm"
            else:
                raise UnsupportedFeature(
                    f"{prefix}.{name}", f"unrecognised module {type(child).__name__}", _HINT
                )
            if role in parts:
                raise UnsupportedFeature(f"{prefix}.{name}", f"a second {role} module", _HINT)
            parts[role] = (name, child)
        for role in ("embed", "layers", "norm"):
            if role not in parts:
                raise UnsupportedFeature(prefix, f"no {role} module found", _HINT)
        return parts

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
        params = self.tiny.rope_parameters or {}
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
        for layer_type in layer_types:
            kwargs = {"layer_type": layer_type} if per_layer_type else {}
            cos, _ = module(x, positions, **kwargs)
            half = cos.shape[-1] // 2
            if torch.equal(cos[..., :half], cos[..., half:]):
                styles.add("neox")
            elif torch.equal(cos[..., ::2], cos[..., 1::2]):
                styles.add("interleaved")
            elif 2 * cos.shape[-1] == head_dim:  # each frequency once, for both halves (GPT-OSS)
                styles.add("half")
                dims.add(head_dim)
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
        expected_dim = (
            int(head_dim * params.get("partial_rotary_factor", 1.0)) if not per_layer_type else head_dim
        )
        if rotary_dim != expected_dim:
            raise UnsupportedFeature(
                f"{prefix}.{attr}", f"rotary dim {rotary_dim} is not derived from head_dim", _HINT
            )
        layout = styles.pop()
        self.notes.append(f"RoPE types {', '.join(rope_types)}" + (", partial" if partial else ""))
        return RopeSpec(type(module).__name__, attr, layout, layout, rope_types, partial, per_layer_type)  # type: ignore[arg-type]

    def _head_dim(self) -> int:
        return getattr(self.tiny, "head_dim", None) or self.tiny.hidden_size // self.tiny.num_attention_heads

    # ---------------------------------------------------------------------------------------- attention

    def _attention(
        self, layer_path: str, layers: nn.ModuleList, rope: RopeSpec | None
    ) -> tuple[AttentionSpec, RopeSpec | None]:
        layer = layers[0]
        attrs = [
            name
            for name, child in layer.named_children()
            if "position_embeddings" in inspect.signature(child.forward).parameters
        ]
        if len(attrs) != 1:
            raise UnsupportedFeature(
                layer_path, f"expected one attention block, found {attrs or 'none'}", _HINT
            )
        attr = attrs[0]
        path = f"{layer_path}.{attr}"
        attn = getattr(layer, attr)
        if not isinstance(getattr(self.tiny, "num_key_value_heads", None), int):
            raise UnsupportedFeature(path, "a config without num_key_value_heads", _HINT)
        heads, kv_heads, head_dim = (
            self.tiny.num_attention_heads,
            self.tiny.num_key_value_heads,
            self._head_dim(),
        )
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        linears = {n: c for n, c in attn.named_children() if isinstance(c, nn.Linear)}
        norms = {n: c for n, c in attn.named_children() if not isinstance(c, nn.Linear)}
        separate = ["q_proj", "k_proj", "v_proj"]
        if set(separate) <= set(linears):
            ins = separate
        else:
            ins = [n for n, c in linears.items() if c.out_features == q_size + 2 * kv_size]
        outs = [n for n in linears if n not in ins]
        fused = ins != separate
        if len(ins) != 1 + 2 * (not fused) or len(outs) != 1:
            raise UnsupportedFeature(path, f"attention projections {sorted(linears)}", _HINT)
        widths = [linears[n].out_features for n in ins]
        if not fused and widths != [q_size, kv_size, kv_size]:
            raise UnsupportedFeature(path, f"projection widths {widths} != heads x head_dim", _HINT)
        if (linears[outs[0]].in_features, linears[outs[0]].out_features) != (q_size, self.hidden):
            raise UnsupportedFeature(
                f"{path}.{outs[0]}", "output projection is not heads x head_dim -> hidden", _HINT
            )
        biases = self._bias_expressions(layer, [f"{attr}.{n}" for n in linears])
        projections = tuple(LinearSpec(n, biases[f"{attr}.{n}"]) for n in ins)
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
        scaling, scale = self._scaling(path, attn, head_dim)
        uses_rope = self._uses_rope(layers, attr, rope)
        spec = AttentionSpec(
            class_name=type(attn).__name__,
            attr=attr,
            kind=kind,
            projections=projections,
            out=LinearSpec(outs[0], biases[f"{attr}.{outs[0]}"]),
            fused_qkv=fused,
            scaling=scaling,
            qk_norm=qk_norm,
            qk_norm_names=qk_names,
            qk_norm_per_head=per_head,
            qk_norm_flag=self._module_flag(layer, f"{attr}.{qk_names[0]}") if qk_norm else None,
            sliding=self._sliding(path),
            softcap=self._attention_softcap(),
            rope_flag=self._rope_flag(path, uses_rope),
            sinks=isinstance(getattr(attn, "sinks", None), torch.Tensor),
            **real,
        )
        if rope is not None:
            index = uses_rope.index(True) if True in uses_rope else 0
            rope = self._probe_attention(path, index, layers[index], spec, scale, rope)
        return spec, rope

    def _probe_attention(
        self, path: str, index: int, layer: nn.Module, spec: AttentionSpec, scale: float, rope: RopeSpec
    ) -> RopeSpec:
        """Match the HF attention output (no mask) with the spec's math; the match fixes the RoPE style."""
        attn = getattr(layer, spec.attr)
        generator = torch.Generator().manual_seed(5)
        x = torch.randn(2, 6, self.hidden, generator=generator)
        kwargs = {"layer_type": self.tiny.layer_types[index]} if rope.per_layer_type else {}
        rotary = getattr(getattr(self.model, self.model.base_model_prefix), rope.attr)
        cos, sin = rotary(x, torch.tensor([[0, 3, 1, 7, 2, 5]] * 2), **kwargs)
        with torch.no_grad():
            expected = _first(attn(x, position_embeddings=(cos, sin), attention_mask=None))
            cap = self.fields.get("attn_logit_softcapping") if spec.softcap else None
            for style in ("neox", "interleaved"):
                actual = _reference_attention(
                    attn, spec, self.tiny, x, (cos, sin), style, rope.table_layout, scale, cap
                )
                if _close(actual, expected):
                    self.notes.append(f"RoPE rotates {style} channels")
                    return dataclasses.replace(rope, style=style)
        raise UnsupportedFeature(
            path, "attention output matches no template (RoPE application, scale or wiring)", _HINT
        )

    def _real_heads(self) -> dict[str, int]:
        """Head counts and head dim of the analyzed config (the probes ran on a tiny copy)."""
        config = self.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return {"num_heads": heads, "num_kv_heads": config.num_key_value_heads or heads, "head_dim": head_dim}

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
        rotary = getattr(getattr(self.model, self.model.base_model_prefix), rope.attr)
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
            name
            for name, child in layer.named_children()
            if name != attention_attr and any(isinstance(c, nn.Linear) for c in child.children())
        ]
        if len(candidates) != 1:
            raise UnsupportedFeature(
                layer_path, f"expected one feed-forward block, found {candidates}", _HINT
            )
        attr = candidates[0]
        path = f"{layer_path}.{attr}"
        mlp = getattr(layer, attr)
        linears = {n: c for n, c in mlp.named_children() if isinstance(c, nn.Linear)}
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
        sizes = [n for n, v in self.fields.items() if v == width and "intermediate" in n]
        if not sizes:
            raise UnsupportedFeature(path, f"intermediate width {width} is no config field", _HINT)
        biases = self._bias_expressions(layer, [f"{attr}.{n}" for n in linears])
        self.notes.append(f"{kind} MLP, {act}")
        return MLPSpec(
            class_name=type(mlp).__name__,
            attr=attr,
            kind=kind,
            inputs=tuple(LinearSpec(n, biases[f"{attr}.{n}"]) for n in inputs),
            down=LinearSpec(downs[0], biases[f"{attr}.{downs[0]}"]),
            act_attr=act_attr,
            act=f"config.{act}",
            intermediate=f"config.{'intermediate_size' if 'intermediate_size' in sizes else sizes[0]}",
            activation=str(getattr(self.config, act)),
        )

    def _mlp_wiring(
        self, path: str, mlp: nn.Module, ins: list[nn.Linear], names: list[str], down: nn.Linear
    ) -> tuple[str, list[str], str]:
        """Which input is the gate, whether a fused projection is (gate, up), which activation field."""
        x = torch.randn(2, 3, self.hidden, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = mlp(x)
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
        raise UnsupportedFeature(path, "feed-forward wiring matches no gated or plain MLP template", _HINT)

    # ---------------------------------------------------------------------------------------- layer

    def _decoder(self, layer_path: str, layer: nn.Module, attn_attr: str, mlp_attr: str) -> DecoderLayerSpec:
        norm_names = [n for n in dict(layer.named_children()) if n not in (attn_attr, mlp_attr)]
        norm_names = [n for n in norm_names if not isinstance(getattr(layer, n), nn.Dropout)]
        specs = {self._norm(f"{layer_path}.{n}", getattr(layer, n)) for n in norm_names}
        if len(specs) != 1:
            raise UnsupportedFeature(layer_path, "decoder norms of different kinds (or none)", _HINT)
        layout = self._probe_layout(layer_path, layer, attn_attr, mlp_attr, norm_names)
        self.notes.append(
            "parallel attention + MLP"
            if layout.parallel
            else f"norm layout {layout.attn_pre}/{layout.attn_post}"
        )
        return DecoderLayerSpec(type(layer).__name__, specs.pop(), **vars(layout))

    def _probe_layout(
        self, layer_path: str, layer: nn.Module, attn_attr: str, mlp_attr: str, norm_names: list[str]
    ) -> _Layout:
        """Replace the blocks of a copy of the layer by distinct nonlinear stand-ins and match the output."""
        probe = copy.deepcopy(layer)
        generator = torch.Generator().manual_seed(4)
        stand_ins = {name: _Affine(1.0 + 0.3 * i, 0.1 * (i + 1)) for i, name in enumerate(norm_names)}
        for name, module in stand_ins.items():
            setattr(probe, name, module)
        with torch.no_grad():
            mlp_tuple = isinstance(getattr(layer, mlp_attr)(torch.zeros(1, 2, self.hidden)), tuple)
        attn, mlp = (
            _Mixer(self.hidden, generator, True, True),
            _Mixer(self.hidden, generator, False, mlp_tuple),
        )
        setattr(probe, attn_attr, attn)
        setattr(probe, mlp_attr, mlp)
        x = torch.randn(2, 5, self.hidden, generator=generator)
        tables = (torch.ones(2, 5, self._head_dim()), torch.zeros(2, 5, self._head_dim()))
        with torch.no_grad():
            expected = _first(
                probe(x, attention_mask=None, position_ids=torch.arange(5)[None], position_embeddings=tables)
            )
        multiplier = self.fields.get("residual_multiplier")
        multipliers = [None] + (["config.residual_multiplier"] if isinstance(multiplier, float) else [])
        for layout in _layouts(norm_names):
            for scale in multipliers:
                candidate = dataclasses.replace(layout, residual_multiplier=scale)
                if _close(candidate.apply(x, stand_ins, attn, mlp, multiplier or 1.0), expected):
                    return candidate
        raise UnsupportedFeature(
            layer_path, f"residual layout with norms {norm_names} matches no template", _HINT
        )

    # ---------------------------------------------------------------------------------------- model

    def _embedding(self, inner: nn.Module, prefix: str, attr: str, layer: nn.Module) -> EmbeddingSpec:
        """Ratio of the first layer's input to the raw embedding rows, matched to config expressions."""
        embed = getattr(inner, attr)
        captured: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        input_ids = torch.arange(1, 6)[None]
        try:
            with torch.no_grad():
                inner(input_ids=input_ids, position_ids=torch.arange(5)[None])
        finally:
            hook.remove()
        raw = embed.weight[input_ids]
        scaled_class = type(embed).__name__ if type(embed) is not nn.Embedding else None
        candidates = [
            (None, 1.0),
            ("config.hidden_size**0.5", self.hidden**0.5),
            ("config.embedding_multiplier", self.fields.get("embedding_multiplier")),
        ]
        for expression, value in candidates:
            if isinstance(value, float) and _close(captured[0], raw * value):
                if expression:
                    self.notes.append(f"embeddings scaled by {expression}")
                return EmbeddingSpec(attr, expression, scaled_class if expression else None)
        raise UnsupportedFeature(f"{prefix}.{attr}", "embedding scale from no known config field", _HINT)

    def _head(self, model: nn.Module, inner: nn.Module, final_attr: str) -> HeadSpec:
        """Compare the logits with lm_head(final hidden state) under the known post-processings."""
        lm_head = model.lm_head
        if not isinstance(lm_head, nn.Linear):
            raise UnsupportedFeature("lm_head", f"head {type(lm_head).__name__}", _HINT)
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
                return HeadSpec(final_attr, lm_head.bias is not None, op, f"config.{name}" if name else None)  # type: ignore[arg-type]
        raise UnsupportedFeature("lm_head", "logit post-processing matches no template", _HINT)


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
        self, hidden: int, generator: torch.Generator, is_attention: bool, returns_tuple: bool
    ) -> None:
        super().__init__()
        self.matrix = torch.randn(hidden, hidden, generator=generator) / hidden**0.5
        self.is_attention = is_attention
        self.returns_tuple = returns_tuple

    def map(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.matrix) if self.is_attention else torch.sin(x @ self.matrix)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.map(hidden_states)
        return (out, None) if self.returns_tuple else out


@dataclasses.dataclass(frozen=True)
class _Layout:
    attn_pre: str | None
    attn_post: str | None
    mlp_pre: str | None
    mlp_post: str | None
    parallel: bool = False
    residual_multiplier: str | None = None

    def apply(
        self, x: torch.Tensor, norms: dict[str, nn.Module], attn: _Mixer, mlp: _Mixer, multiplier: float
    ) -> torch.Tensor:
        def norm(name: str | None, value: torch.Tensor) -> torch.Tensor:
            return norms[name](value) if name else value

        scale = multiplier if self.residual_multiplier else 1.0
        if self.parallel:
            normed = norm(self.attn_pre, x)
            return x + (norm(self.attn_post, attn.map(normed)) + norm(self.mlp_post, mlp.map(normed))) * scale
        x = x + norm(self.attn_post, attn.map(norm(self.attn_pre, x))) * scale
        return x + norm(self.mlp_post, mlp.map(norm(self.mlp_pre, x))) * scale


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
    tables: tuple[torch.Tensor, torch.Tensor],
    style: str,
    table_layout: str,
    scale: float,
    cap: float | None,
) -> torch.Tensor:
    """What the spec says the attention computes (no mask), in plain torch, on the HF module's weights."""
    batch, seq = x.shape[:2]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    projections = [getattr(attn, p.name)(x) for p in spec.projections]
    if spec.fused_qkv:
        projections = list(
            projections[0].split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        )
    q, k, v = projections
    q_norm, k_norm = (getattr(attn, name, None) for name in spec.qk_norm_names)
    if spec.qk_norm is not None and not spec.qk_norm_per_head:
        q, k = q_norm(q), k_norm(k)
    q, k, v = (t.view(batch, seq, -1, head_dim) for t in (q, k, v))
    if spec.qk_norm is not None and spec.qk_norm_per_head:
        q, k = q_norm(q), k_norm(k)
    q, k = (_rotate(t, *tables, style, table_layout) for t in (q, k))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if spec.sinks:  # one extra logit per head in the denominator, contributing no value
        sinks = attn.sinks.reshape(1, -1, 1, 1).expand(batch, heads, seq, 1)
        scores = torch.cat((scores, sinks), dim=-1)
    out = torch.softmax(scores.float(), dim=-1)[..., :seq] @ v
    return getattr(attn, spec.out.name)(out.transpose(1, 2).reshape(batch, seq, heads * head_dim))
