"""Measurements for the classic decoder layouts (GPT-2, GPT-NeoX, GPT-J, BLOOM, OPT, Falcon, ...).

Helpers of ``analyze``: which submodules are linear maps and in which weight layout (``nn.Linear``'s
``[out, in]`` or transformers' ``Conv1D`` ``[in, out]``), how a fused q/k/v projection lays out its
output (flat ``[q | k | v]``, per head, per KV group, or in fixed model-parallel groups, with the
parts in any order), and the ALiBi slopes. Every answer comes from running the module, not from
its name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Projection",
    "alibi_slopes",
    "linear_layout",
    "projections",
    "separate_qkv_roles",
    "split_fused_qkv",
]

_TOL = 1e-5


@dataclass(frozen=True)
class Projection:
    """A linear submodule: its name, the module, and its weight layout (``transposed``: Conv1D)."""

    name: str
    module: nn.Module
    transposed: bool
    in_features: int
    out_features: int

    @property
    def has_bias(self) -> bool:
        return isinstance(getattr(self.module, "bias", None), torch.Tensor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def linear_layout(module: nn.Module) -> bool | None:
    """None unless ``module`` is a linear map ``x -> x W^T + b`` (False) or ``x -> x W + b`` (True,
    transformers' Conv1D) of its 2-D ``weight`` and optional ``bias``, as its forward shows."""
    weight = getattr(module, "weight", None)
    names = {name for name, _ in module.named_parameters()}
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or names - {"weight", "bias"}:
        return None
    if isinstance(module, nn.Embedding):  # a lookup table, not a linear map
        return None
    if list(module.children()):
        return None
    bias = getattr(module, "bias", None)
    bias = bias.detach() if isinstance(bias, torch.Tensor) else None
    w = weight.detach()
    generator = torch.Generator().manual_seed(11)
    for transposed in (False, True):
        width = w.shape[0] if transposed else w.shape[1]
        x = torch.randn(2, 3, width, generator=generator, dtype=w.dtype)
        try:
            with torch.no_grad():
                actual = module(x)
        except (RuntimeError, TypeError, ValueError, IndexError):  # wrong input width for this layout
            continue
        expected = x @ w if transposed else F.linear(x, w)
        if bias is not None:
            expected = expected + bias
        if actual.shape == expected.shape and torch.allclose(actual, expected, rtol=_TOL, atol=_TOL):
            return transposed
    return None


def projections(module: nn.Module) -> dict[str, Projection]:
    """The direct children of ``module`` that are linear maps, by name."""
    found = {}
    for name, child in module.named_children():
        transposed = linear_layout(child)
        if transposed is None:
            continue
        rows, columns = child.weight.shape
        in_features, out_features = (rows, columns) if transposed else (columns, rows)
        found[name] = Projection(name, child, transposed, in_features, out_features)
    return found


def split_fused_qkv(
    fused: torch.Tensor, groups: int, order: tuple[str, ...], heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[..., heads or kv_heads, head_dim]`` from a fused projection output: its last dim is
    ``groups`` equal groups, each holding that group's share of q, k and v in ``order``."""
    sizes = {"q": heads * head_dim // groups, "k": kv_heads * head_dim // groups}
    sizes["v"] = sizes["k"]
    grouped = fused.reshape(*fused.shape[:-1], groups, -1)
    parts = dict(zip(order, grouped.split([sizes[name] for name in order], dim=-1), strict=True))
    lead = fused.shape[:-1]
    return (
        parts["q"].reshape(*lead, heads, head_dim),
        parts["k"].reshape(*lead, kv_heads, head_dim),
        parts["v"].reshape(*lead, kv_heads, head_dim),
    )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.): ``2^(-8 i / n)`` for the ``n`` heads of the closest power of two
    below ``num_heads``, then every other slope of ``2n`` heads for the rest (as BLOOM builds them)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        extra_powers = torch.arange(1, 1 + 2 * extra, 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(torch.tensor(extra_base), extra_powers)])
    return slopes.float()


def separate_qkv_roles(
    attn: nn.Module, linears: dict[str, Projection], call: tuple[tuple, dict], width: int
) -> tuple[str, str, str, str] | None:
    """(q, k, v, output) names of an attention's four ``width -> width`` projections whose names say
    nothing (CTRL's ``Wq``/``Wk``/``Wv``/``dense``), measured on one recorded call (args, kwargs) of an
    attention without RoPE: the output projection's output is the attention's output; doubling v's
    output doubles the output projection's input (attention is linear in v); adding one vector to
    every row of k's output leaves it unchanged (a softmax ignores a shift that is the same for every
    key), where the same change to q's does not. None where the four are not told apart that way."""
    candidates = [n for n, p in linears.items() if (p.in_features, p.out_features) == (width, width)]
    if len(candidates) != 4 or len(linears) != 4:
        return None
    args, kwargs = call
    shift = torch.randn(width, generator=torch.Generator().manual_seed(13))

    def run(edit: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            linears[n].module.register_forward_hook(lambda _m, _a, out, f=f: f(out)) for n, f in edit.items()
        ]
        hooks += [
            linears[n].module.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0]))
            for n in candidates
        ]
        try:
            with torch.no_grad():
                output = attn(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        seen[""] = output[0] if isinstance(output, tuple) else output
        return seen

    base = run({})
    outs = []
    for name in candidates:
        with torch.no_grad():
            if torch.allclose(linears[name](base[name]), base[""], rtol=_TOL, atol=_TOL):
                outs.append(name)
    if len(outs) != 1:
        return None
    out, ins = outs[0], [n for n in candidates if n != outs[0]]
    values = [
        n for n in ins if torch.allclose(run({n: lambda t: t * 2})[out], 2 * base[out], rtol=1e-4, atol=1e-5)
    ]
    keys = [
        n
        for n in ins
        if n not in values
        and torch.allclose(run({n: lambda t: t + shift})[out], base[out], rtol=1e-4, atol=1e-5)
    ]
    queries = [n for n in ins if n not in values and n not in keys]
    if len(values) != 1 or len(keys) != 1 or len(queries) != 1:
        return None
    return queries[0], keys[0], values[0], out
