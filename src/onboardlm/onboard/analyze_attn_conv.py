"""Measure short causal convolutions inside an attention (over the sequence, on the q/k/v projections).

Some attentions convolve projection outputs along the sequence before attending: Inkling's
``k_sconv`` / ``v_sconv`` (a depthwise causal conv of ``k_proj`` / ``v_proj`` plus the input as a
residual), ZAYA's compressed convolutional attention (a depthwise conv then a grouped conv over
``cat(q_proj, k_proj)``). Nothing here reads a class or attribute name: one forward pass of the model
records the inputs and outputs of the attention's linear maps, of the child holding the convolution
and of each ``nn.Conv1d`` it calls; which projections feed a convolution is found by matching the
convolution's input channels against the projection outputs, and a convolution that the child runs
functionally (on the module's weights) is fitted: a causal conv with those weights, with or without
an activation and an identity residual, predicted and compared with the child's output.

No attention template emits these convolutions yet; ``attention_conv_refusal`` turns the
measurement into the one-line reason a user reads (what is convolved, kernel, groups, bias,
residual, and the convolutions the decoder layer runs outside the attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from onboardlm.errors import UnsupportedFeature

_HINT = (
    "teach onboardlm/onboard/analyze_attn_conv.py and the attention template to emit the convolution"
    " on torch_causal_conv1d (its state is cached per sequence by the state-cache transform)"
)
_TOL = 1e-5
#: Tokens in the probe: longer than any kernel the tiny configs keep.
_TOKENS = 9
_ACTIVATIONS = (None, "silu")


@dataclasses.dataclass(frozen=True)
class ConvStep:
    """One ``nn.Conv1d`` applied along the sequence."""

    name: str  # path under the attention (``qkv_proj.conv_qk_depthwise``)
    channels: int
    kernel_size: int
    groups: int
    bias: bool

    @property
    def depthwise(self) -> bool:
        return self.groups == self.channels

    def describe(self) -> str:
        kind = (
            "depthwise"
            if self.depthwise
            else f"grouped ({self.groups} groups of {self.channels // self.groups})"
        )
        return f"{kind}, kernel {self.kernel_size}, {'with' if self.bias else 'no'} bias"


@dataclasses.dataclass(frozen=True)
class AttentionConv:
    """A child of the attention that convolves projection outputs along the sequence."""

    module: str  # the child's name under the attention
    inputs: tuple[str, ...]  # the projections whose outputs it convolves, in channel order
    steps: tuple[ConvStep, ...]  # the convolutions, in the order they run
    residual: bool | None  # output = conv(x) + x (None: not measured, the child holds the projections)
    activation: str | None
    causal: bool  # output at t reads inputs up to t only (measured or, when fitted, by construction)

    def describe(self) -> str:
        convs = " then ".join(f"{s.name} ({s.describe()})" for s in self.steps)
        fed = " + ".join(self.inputs) if self.inputs else "an input that is no projection output"
        extras = []
        if self.activation:
            extras.append(f"{self.activation} activation")
        if self.residual:
            extras.append("plus its input as a residual")
        tail = f", {', '.join(extras)}" if extras else ""
        return f"{self.module} convolves {fed} along the sequence: {convs}{tail}"


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=_TOL, atol=_TOL)


def _record(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(first input, first output) of each of ``modules`` at its first call in one model forward."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(name, (args[0], _first(output)))

        return record

    hooks = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(1, _TOKENS + 1) * 7 % vocab)[None]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except Exception:  # a model that will not run on its own tells nothing here
        return {}
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def _segments(x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> tuple[str, ...] | None:
    """The projections whose outputs, concatenated in this order, are ``x``'s channels (``[T, C]``)."""
    found: list[str] = []
    offset = 0
    while offset < x.shape[-1]:
        match = next(
            (
                name
                for name, out in outputs.items()
                if offset + out.shape[-1] <= x.shape[-1]
                and _close(x[:, offset : offset + out.shape[-1]], out)
            ),
            None,
        )
        if match is None:
            return None
        found.append(match)
        offset += outputs[match].shape[-1]
    return tuple(found)


def _causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``conv`` along the sequence of ``x`` (``[B, T, C]``), left-padded so that it is causal."""
    k = conv.kernel_size[0]
    xt = F.pad(x.float().transpose(1, 2), (k - 1, 0))
    weight = conv.weight.float()
    bias = conv.bias.float() if conv.bias is not None else None
    return F.conv1d(xt, weight, bias, groups=conv.groups).transpose(1, 2)


def measure_attention_conv(model: nn.Module, attn_path: str, name: str) -> AttentionConv | None:
    """How ``{attn_path}.{name}`` convolves along the sequence, measured on one forward of ``model``;
    None where it runs no convolution the probe can see."""
    attn = model.get_submodule(attn_path)
    child = attn.get_submodule(name)
    convs = {n: m for n, m in child.named_modules() if isinstance(m, nn.Conv1d)}
    if not convs:
        return None
    linears = {n: m for n, m in attn.named_modules() if isinstance(m, nn.Linear)}
    probes: dict[str, nn.Module] = {f"linear:{n}": m for n, m in linears.items()}
    probes.update({f"conv:{n}": m for n, m in convs.items()})
    probes["child"] = child
    seen = _record(model, probes)
    if "child" not in seen:
        return None
    outputs = {n.removeprefix("linear:"): v[1][0] for n, v in seen.items() if n.startswith("linear:")}
    steps = tuple(
        ConvStep(f"{name}.{n}" if n else name, m.in_channels, m.kernel_size[0], m.groups, m.bias is not None)
        for n, m in convs.items()
    )
    called = [n for n in convs if f"conv:{n}" in seen]
    if called:  # the child calls its Conv1d modules: read which projections feed the first
        conv_in = seen[f"conv:{called[0]}"][0][0].transpose(0, 1)  # [T (+ left pad), C]
        pad = conv_in.shape[0] - _TOKENS
        inputs = _segments(conv_in[pad:], outputs) or ()
        ordered = tuple(s for n in called for s in steps if s.name == (f"{name}.{n}" if n else name))
        # left zero padding as wide as the stacked kernels reach back, and no output past the input
        reach = sum(s.kernel_size - 1 for s in ordered)
        last = seen[f"conv:{called[-1]}"][1]
        causal = pad == reach and bool((conv_in[:pad] == 0).all()) and last.shape[-1] == _TOKENS
        return AttentionConv(name, inputs, ordered, None, None, causal)
    # the child convolves functionally with its Conv1d's weights: fit what it computes
    x, y = seen["child"]
    inputs = _segments(x[0], outputs) or ()
    if len(convs) != 1:
        return AttentionConv(name, inputs, steps, None, None, False)
    convolved = _causal_conv(x, next(iter(convs.values())))
    for activation in _ACTIVATIONS:
        out = ACT2FN[activation](convolved) if activation else convolved
        for residual in (False, True):
            if _close(out + x.float() if residual else out, y):
                return AttentionConv(name, inputs, steps, residual, activation, True)
    return AttentionConv(name, inputs, steps, None, None, False)


def attention_conv_refusal(model: nn.Module, attn_path: str, names: list[str]) -> UnsupportedFeature | None:
    """The reason no template covers the attention at ``attn_path``, whose children ``names`` hold a
    convolution: each measured, plus the convolutions the decoder layer runs outside the attention."""
    try:
        found = [c for c in (measure_attention_conv(model, attn_path, n) for n in names) if c is not None]
    except AttributeError:  # a path that names no submodule of ``model``: the generic reason stands
        return None
    if not found:
        return None
    parts = [found[0].describe()]
    for conv in found[1:]:
        same = (conv.steps[0].describe(), conv.residual, conv.activation) == (
            found[0].steps[0].describe(),
            found[0].residual,
            found[0].activation,
        )
        parts.append(f"{conv.module} likewise on {' + '.join(conv.inputs)}" if same else conv.describe())
    grouped = [s.name for conv in found for s in conv.steps if not s.depthwise]
    limits = (
        f"torch_causal_conv1d is depthwise only ({', '.join(grouped)} is not)"
        if grouped
        else "no attention template emits a convolution on the projections"
    )
    layer_path = attn_path.rsplit(".", 1)[0]
    attn = model.get_submodule(attn_path)
    outside = sorted(
        n
        for n, c in model.get_submodule(layer_path).named_children()
        if c is not attn and any(isinstance(m, nn.Conv1d) for m in c.modules())
    )
    also = (
        f"; the decoder layer also convolves outside the attention ({', '.join(outside)})" if outside else ""
    )
    others = _other_parts(attn, names)
    also += f"; other attention parts no template covers: {', '.join(others)}" if others else ""
    kind = type(attn.get_submodule(found[0].module)).__name__
    return UnsupportedFeature(
        f"{attn_path}.{found[0].module}",
        f"short convolution {kind} inside the attention (over the sequence, on the q/k/v projections):"
        f" {'; '.join(parts)}; {limits}{also}",
        _HINT,
    )


def _other_parts(attn: nn.Module, convolving: list[str]) -> list[str]:
    """The attention's children other than linear maps, the convolving ones and plain norms (one 1-D
    ``weight``), with their own parameters: what a template would have to cover next."""
    parts = []
    for name, child in attn.named_children():
        if name in convolving or isinstance(child, (nn.Linear, nn.Dropout)):
            continue
        params = dict(child.named_parameters())
        if not params or (list(params) == ["weight"] and params["weight"].dim() == 1):
            continue
        parts.append(f"{name} ({type(child).__name__} with parameters {sorted(params)})")
    return parts
