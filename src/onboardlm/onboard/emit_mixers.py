"""Emitters of the non-attention token mixers (gated delta rule, short convolution) on canonical ops.

Each returns the source of one block class (plus, for the gated delta rule, its gated-norm class);
module names equal the checkpoint keys, and every linear, split, view, conv and scan carries the
sharding hints seed 002 gives for these layers (``layer_type="delta"`` / ``"ssm"``).
"""

from __future__ import annotations

from onboardlm.onboard.generate import render
from onboardlm.onboard.spec_mixers import (
    ChannelDeltaSpec,
    DeltaProjectionSpec,
    GatedDeltaSpec,
    LinearSpec,
    MixerSpec,
    RgLruSpec,
    ShortConvSpec,
)

#: Flat width of each gated-delta part, and its width inside one key head's group.
_FLAT_WIDTH = {"q": "key_dim", "k": "key_dim", "v": "value_dim", "z": "value_dim", "b": "self.num_v_heads"}
_FLAT_WIDTH["a"] = _FLAT_WIDTH["b"]
_GROUP_WIDTH = {
    "q": "self.head_k_dim",
    "k": "self.head_k_dim",
    "v": "per_k * self.head_v_dim",
    "z": "per_k * self.head_v_dim",
    "b": "per_k",
    "a": "per_k",
}
_INIT_WIDTH = {
    "q": "self.key_dim",
    "k": "self.key_dim",
    "v": "self.value_dim",
    "z": "self.value_dim",
    "b": "self.num_v_heads",
    "a": "self.num_v_heads",
}
_QKV = ("q", "k", "v")


def _sum(terms: list[str]) -> str:
    """``a + a + b`` written ``2 * a + b`` (terms in first-seen order)."""
    counts = {term: terms.count(term) for term in dict.fromkeys(terms)}
    return " + ".join(term if n == 1 else f"{n} * {term}" for term, n in counts.items())


def _view(name: str, shape: str) -> str:
    return f'{name} = ops.view({name}, [batch, seq_len, {shape}], tp_scaled_dim=2, layer_type="delta")'


def _projection_lines(proj: DeltaProjectionSpec) -> list[str]:
    """Lines computing one in-projection and leaving its parts as q, k, v ``[b, s, width]`` (flat),
    z ``[b, s, Hv, Dv]`` and b, a ``[b, s, Hv]``; ``mixed_qkv`` where one projection is ``[q|k|v]``."""
    weight, bias = f"self.{proj.name}.weight", f"self.{proj.name}.bias"
    joined = "mixed_" + "".join(proj.parts)
    lines: list[str] = []
    if proj.per_key_head:
        # one group per key head: colwise shards whole groups, the split inside a group stays local
        total = _sum([_GROUP_WIDTH[p] for p in proj.parts])
        lines.append(
            f'{joined} = ops.torch_linear_simple(hidden_states, {weight}, {bias}, tp_mode="colwise", layer_type="delta")'
        )
        lines.append(
            f'{joined} = ops.view({joined}, [batch, seq_len, self.num_k_heads, {total}], tp_scaled_dim=2, layer_type="delta")'
        )
        sizes = ", ".join(_GROUP_WIDTH[p] for p in proj.parts)
        lines.append(
            f'{", ".join(proj.parts)} = ops.split_with_sizes({joined}, [{sizes}], dim=-1, layer_type="delta")'
        )
        for part in proj.parts:
            if part in _QKV:
                lines.append(_view(part, _FLAT_WIDTH[part]))
            elif part == "z":
                lines.append(_view(part, "self.num_v_heads, self.head_v_dim"))
            else:
                lines.append(_view(part, "self.num_v_heads"))
        return lines
    target = "mixed_qkv" if proj.parts == _QKV else joined
    if len(proj.parts) == 1:
        lines.append(
            f'{proj.parts[0]} = ops.torch_linear_simple(hidden_states, {weight}, {bias}, tp_mode="colwise", layer_type="delta")'
        )
    else:
        sizes = ", ".join(_FLAT_WIDTH[p] for p in proj.parts)
        lines.append(
            f"{target} = ops.torch_linear_simple(hidden_states, {weight}, {bias}, "
            f'tp_mode="colwise", output_sizes=[{sizes}], layer_type="delta")'
        )
        if target != "mixed_qkv":
            lines.append(
                f'{", ".join(proj.parts)} = ops.split_with_sizes({joined}, [{sizes}], dim=-1, enable_sharding=True, layer_type="delta")'
            )
    if "z" in proj.parts:
        lines.append(_view("z", "self.num_v_heads, self.head_v_dim"))
    return lines


def emit_gated_delta(spec: GatedDeltaSpec, config_class: str) -> str:
    """Source of the gated-delta block class (its gated-norm class comes from :func:`emit_gated_norm`)."""
    init_lines = [
        f"self.{p.name} = nn.Linear(hidden_size, {_sum([_INIT_WIDTH[part] for part in p.parts])}, bias={p.bias})"
        for p in spec.projections
    ]
    forward_lines = [line for p in spec.projections for line in _projection_lines(p)]
    if not any(p.parts == _QKV and not p.per_key_head for p in spec.projections):
        forward_lines.append("mixed_qkv = torch.cat([q, k, v], dim=-1)")
    return render(
        "gated_delta.py.j2",
        spec=spec,
        config_class=config_class,
        init_lines=init_lines,
        forward_lines=forward_lines,
        uses_per_k=any("per_k" in line for line in forward_lines),
    )


def emit_gated_norm(spec: GatedDeltaSpec) -> str:
    return render("norm_rms_gated.py.j2", norm_class=spec.norm_class, norm_before_gate=spec.norm_before_gate)


def emit_short_conv(spec: ShortConvSpec, config_class: str) -> str:
    return render("short_conv.py.j2", spec=spec, config_class=config_class)


def _linear_init(linear: LinearSpec) -> str:
    return f"self.{linear.name} = nn.Linear({linear.in_width}, {linear.out_width}, bias={linear.bias})"


def _chain_lines(target: str, chain: tuple[LinearSpec, ...], owner: str = "self") -> list[str]:
    """``target`` = the hidden states through ``chain``: a low-rank first map stays whole on every
    rank (``none``), the last one is cut colwise (its outputs are heads)."""
    lines, current = [], "hidden_states"
    for position, linear in enumerate(chain):
        mode = "colwise" if position == len(chain) - 1 else "none"
        weight, bias = f"{owner}.{linear.name}.weight", f"{owner}.{linear.name}.bias"
        lines.append(
            f'{target} = ops.torch_linear_simple({current}, {weight}, {bias}, tp_mode="{mode}", layer_type="delta")'
        )
        current = target
    return lines


def emit_channel_delta(spec: ChannelDeltaSpec, config_class: str) -> str:
    """Source of the Kimi-Delta-Attention block, its forget gate and its sigmoid-gated norm classes."""
    shapes = ", ".join(spec.A_log_shape)
    gate_parts = {
        **{linear.name: _linear_init(linear) for linear in spec.gate_chain},
        spec.dt_bias: f"self.{spec.dt_bias} = nn.Parameter(torch.zeros(key_dim))",
        spec.A_log: f"self.{spec.A_log} = nn.Parameter(torch.zeros({shapes}))",
    }
    conv = (
        f"self.{spec.conv} = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size,"
        f" groups=self.conv_dim, bias={spec.conv_bias}, padding=self.conv_kernel_size - 1)"
    )
    parts = {
        **{linear.name: _linear_init(linear) for linear in (spec.q, spec.k, spec.v, spec.beta, spec.out)},
        **{linear.name: _linear_init(linear) for linear in spec.out_gate},
        spec.conv: conv,
        spec.gate_attr: f"self.{spec.gate_attr} = {spec.gate_class}(config)",
        spec.norm: f"self.{spec.norm} = {spec.norm_class}(self.head_v_dim, {spec.norm_eps})",
    }
    return render(
        "channel_delta.py.j2",
        spec=spec,
        config_class=config_class,
        gate_init=[gate_parts[name] for name in spec.gate_children if name in gate_parts],
        gate_forward=_chain_lines("gate", spec.gate_chain),
        init_lines=[parts[name] for name in spec.children if name in parts],
        qkv_lines=[line for part in "qkv" for line in _chain_lines(part, (getattr(spec, part),))],
        beta_lines=_chain_lines("beta", (spec.beta,)),
        out_gate_lines=_chain_lines("gate", spec.out_gate),
    )


def emit_rg_lru(spec: RgLruSpec, config_class: str) -> str:
    """Source of Griffin's recurrent block and its RG-LRU child (parameters in registration order)."""
    gates = ("torch.empty(heads, block, block)", "torch.empty(heads, block)")
    lru_parts = {
        spec.recurrent_param: "torch.empty(width)",
        spec.input_gate_weight: gates[0],
        spec.input_gate_bias: gates[1],
        spec.recurrent_gate_weight: gates[0],
        spec.recurrent_gate_bias: gates[1],
    }
    conv = (
        f"self.{spec.conv} = nn.Conv1d(self.width, self.width, self.conv_kernel_size,"
        f" groups=self.width, bias={spec.conv_bias}, padding=self.conv_kernel_size - 1)"
    )
    init_lines = [
        _linear_init(spec.gate),
        _linear_init(spec.value),
        _linear_init(spec.out),
        conv,
        f"self.{spec.lru_attr} = {spec.lru_class}(self.width, {spec.heads})",
    ]
    return render(
        "rg_lru.py.j2",
        spec=spec,
        config_class=config_class,
        lru_init=[f"self.{name} = nn.Parameter({lru_parts[name]})" for name in spec.lru_children],
        init_lines=init_lines,
    )


def emit_mixer_classes(spec: MixerSpec, config_class: str) -> str:
    """Every class one mixer needs, helpers first (the gated norm before the gated-delta block)."""
    if isinstance(spec, ChannelDeltaSpec):
        return emit_channel_delta(spec, config_class)
    if isinstance(spec, RgLruSpec):
        return emit_rg_lru(spec, config_class)
    if isinstance(spec, GatedDeltaSpec):
        return emit_gated_norm(spec) + "\n\n" + emit_gated_delta(spec, config_class)
    return emit_short_conv(spec, config_class)
