"""Cached state ops that the state-cache transform puts in place of the canonical stateful ops.

``torch_causal_conv1d``, ``torch_ssm`` (Mamba2) and ``torch_gated_delta_rule`` carry state from token
to token. Their cached versions keep that state per sequence in a slot of a state cache
``[num_slots, *state]`` and update it in place: a call computes the new tokens of every sequence from
the state its slot holds (or from zero, for a sequence that starts here) and leaves the state after
the sequence's last new token in the slot. A prompt is prefilled in one call (or in chunks, one call
each), then decoded one token per call.

Every cached op takes, after the canonical op's tensor inputs, the same four:

- ``state``: the cache, mutated. Conv: ``[slots, W, C_in]`` (the last ``W = dilation * (K - 1)``
  inputs, oldest first, in the input dtype); SSM: ``[slots, H, P, N]`` fp32; gated delta rule:
  ``[slots, Hv, K, V]`` fp32; RG-LRU: ``[slots, C]`` fp32.
- ``slots`` ``[S]`` int64: the state slot of each sequence (None: sequence ``i`` uses slot ``i``).
- ``input_pos`` ``[S]`` int64: how many tokens of each sequence came before this call (0: the
  sequence starts from a zero state; whatever its slot held is ignored).
- ``seq_lens`` ``[S]`` int64: how many new tokens each sequence has in this call.

The batch is either padded rows ``[S, L, ...]`` (row ``i`` holds sequence ``i``; its first
``seq_lens[i]`` tokens are real, the rest is padding that never reaches the state) or packed
``[1, T, ...]`` (``S > 1``; the sequences' tokens one after another, ``T = sum(seq_lens)``). Outputs
have the input's layout; outputs at padded positions are unspecified.

These are reference implementations (plain PyTorch, CPU and CUDA): a one-token step is the
recurrence itself; a longer chunk reuses the chunked scans (the canonical op for the zero-state part
of the SSM, the same chunked solve as ``torch_gated_delta_rule`` from a given state for the delta
rule). A one-token step on padded rows or on a packed batch of one-token chunks never synchronises
with the host, so decode steps can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import onboardlm.ops  # noqa: F401  (registers the canonical ops the SSM path calls)
from onboardlm.ops.ssm import (
    GATED_DELTA_CHUNK_SIZE,
    _pad_to_chunks,
    _segsum,
    channel_delta_from_state,
    delta_query_key,
    linear_recurrence_from_state,
    rg_lru_inputs,
)

NAMESPACE = "auto_deploy"
CACHED_CAUSAL_CONV1D = "onboardlm_cached_causal_conv1d"
CACHED_SSM = "onboardlm_cached_ssm"
CACHED_GATED_DELTA_RULE = "onboardlm_cached_gated_delta_rule"
CACHED_CHANNEL_GATED_DELTA_RULE = "onboardlm_cached_channel_gated_delta_rule"
CACHED_RG_LRU = "onboardlm_cached_rg_lru"

#: canonical stateful op -> its cached op
CACHED_STATE_OPS = {
    "torch_causal_conv1d": CACHED_CAUSAL_CONV1D,
    "torch_ssm": CACHED_SSM,
    "torch_gated_delta_rule": CACHED_GATED_DELTA_RULE,
    "torch_channel_gated_delta_rule": CACHED_CHANNEL_GATED_DELTA_RULE,
    "torch_rg_lru": CACHED_RG_LRU,
}


# ---------------------------------------------------------------------------------------------------
# batch layout and state slots
# ---------------------------------------------------------------------------------------------------


def _is_packed(x: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    num_seqs = seq_lens.shape[0]
    if x.shape[0] == num_seqs:
        return False
    if x.shape[0] == 1:
        return True
    raise ValueError(
        f"the batch must be padded rows [{num_seqs}, L, ...] or packed [1, T, ...] for {num_seqs} "
        f"sequences, got batch {x.shape[0]}"
    )


def _to_rows(x: torch.Tensor, seq_lens: torch.Tensor, packed: bool) -> torch.Tensor:
    """``[S, L, ...]`` padded rows of a packed ``[1, T, ...]`` batch (``x`` itself when not packed)."""
    if not packed:
        return x
    num_seqs = seq_lens.shape[0]
    if x.shape[1] == num_seqs:  # one token per sequence (a decode step): no host synchronisation
        return x[0].unsqueeze(1)
    offsets = torch.arange(int(seq_lens.max()), device=x.device)
    starts = seq_lens.cumsum(0) - seq_lens
    index = torch.where(offsets < seq_lens[:, None], starts[:, None] + offsets, 0)
    return x[0][index]


def _from_rows(y: torch.Tensor, seq_lens: torch.Tensor, packed: bool) -> torch.Tensor:
    """The inverse of :func:`_to_rows` for an output ``[S, L, ...]`` (padding dropped when packed)."""
    if not packed:
        return y.contiguous()
    if y.shape[1] == 1:
        return y[:, 0].unsqueeze(0).contiguous()
    valid = torch.arange(y.shape[1], device=y.device) < seq_lens[:, None]
    return y[valid].unsqueeze(0).contiguous()


def _read_state(state: torch.Tensor, slots: torch.Tensor | None, input_pos: torch.Tensor) -> torch.Tensor:
    """Each sequence's state as a new ``[S, ...]`` tensor in ``state``'s dtype; zero where it starts here."""
    num_seqs = input_pos.shape[0]
    if slots is None:
        if state.shape[0] < num_seqs:
            raise ValueError(f"the state cache holds {state.shape[0]} sequences, this call has {num_seqs}")
        current = state[:num_seqs]
    else:
        current = state.index_select(0, slots)
    fresh = (input_pos == 0).view(num_seqs, *([1] * (state.dim() - 1)))
    return torch.where(fresh, torch.zeros((), dtype=state.dtype, device=state.device), current)


def _write_state(state: torch.Tensor, slots: torch.Tensor | None, new: torch.Tensor) -> None:
    if slots is None:
        state[: new.shape[0]].copy_(new)
    else:
        state.index_copy_(0, slots, new.to(state.dtype))


def _real(seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[S, L]`` bool: which positions of the padded rows hold real tokens."""
    return torch.arange(length, device=seq_lens.device) < seq_lens[:, None]


# ---------------------------------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------------------------------


def conv_state_width(weight_shape: torch.Size | tuple[int, ...], dilation: int) -> int:
    """Inputs a causal conv must remember: ``dilation * (kernel - 1)``."""
    return dilation * (int(weight_shape[-1]) - 1)


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_CAUSAL_CONV1D}", mutates_args=("conv_state",))
def cached_causal_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    shardable: bool = False,
    output_sizes: list[int] | None = None,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``torch_causal_conv1d`` continuing from each sequence's last ``W`` inputs (see the module docstring)."""
    width = conv_state_width(weight.shape, dilation)
    if stride != 1 or padding != width or padding_mode != "zeros":
        raise ValueError(
            f"cached causal conv needs stride 1, padding {width} and zero padding mode, "
            f"got {stride}, {padding}, {padding_mode!r}"
        )
    packed = _is_packed(input, seq_lens)
    x = _to_rows(input, seq_lens, packed)  # [S, L, C]
    history = _read_state(conv_state, slots, input_pos).to(x.dtype)  # [S, W, C]
    full = torch.cat([history, x], dim=1)  # full[:, j] is the input at position j - W
    b = None if bias is None else bias.to(x.dtype)
    out = F.conv1d(full.transpose(1, 2), weight.to(x.dtype), b, dilation=dilation, groups=groups)
    # the new state: the last W inputs up to each sequence's last real one
    keep = seq_lens[:, None] + torch.arange(width, device=x.device)
    new_state = full.gather(1, keep[..., None].expand(-1, -1, full.shape[-1]))
    _write_state(conv_state, slots, new_state)
    return _from_rows(out.transpose(1, 2), seq_lens, packed)


@cached_causal_conv1d.register_fake
def _cached_causal_conv1d_fake(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    shardable: bool = False,
    output_sizes: list[int] | None = None,
    layer_type: str = "unknown",
) -> torch.Tensor:
    return input.new_empty(input.shape[0], input.shape[1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------
# Mamba2 SSM
# ---------------------------------------------------------------------------------------------------


def _reverse_exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[t] = x[t+1] + ... + x[-1]`` along ``dim`` (summed directly: no difference of two cumsums)."""
    inclusive = x.flip(dim).cumsum(dim).flip(dim)
    return torch.cat([inclusive.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim)


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_SSM}", mutates_args=("ssm_state",))
def cached_ssm(
    hidden_states: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    time_step_limit: list[float],
    chunk_size: int,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``torch_ssm`` continuing from each sequence's state ``h`` ``[H, P, N]`` (see the module docstring).

    From a state ``h₀`` the output is the zero-state scan plus ``C_t · e^{Σ_{j<=t} Δ_j A} h₀``; the state
    after the chunk is ``e^{Σ Δ A} h₀ + Σ_t e^{Σ_{j>t} Δ_j A} Δ_t x_t B_tᵀ``, with ``Δ = 0`` on padding
    (no decay, no input), so the state stops at each sequence's last real token. Returns fp32.
    """
    packed = _is_packed(hidden_states, seq_lens)
    x, Bs, Cs, dts = (_to_rows(t, seq_lens, packed) for t in (hidden_states, B, C, dt))
    num_seqs, length, heads, _ = x.shape
    per_group = heads // Bs.shape[2]
    h0 = _read_state(ssm_state, slots, input_pos).float()  # [S, H, P, N]
    xf = x.float()
    Bf = Bs.float().repeat_interleave(per_group, dim=2)  # [S, L, H, N]
    Cf = Cs.float().repeat_interleave(per_group, dim=2)
    step = F.softplus(dts.float() + dt_bias.float()).clamp(time_step_limit[0], time_step_limit[1])
    step = torch.where(_real(seq_lens, length)[..., None], step, 0.0)  # [S, L, H]
    log_decay = step * A.float()
    if length == 1:  # one step of the recurrence
        h = h0 * log_decay[:, 0, :, None, None].exp() + torch.einsum(
            "sh,shp,shn->shpn", step[:, 0], xf[:, 0], Bf[:, 0]
        )
        y = (torch.einsum("shpn,shn->shp", h, Cf[:, 0]) + D.float()[:, None] * xf[:, 0])[:, None]
    else:
        zero_state = torch.ops.auto_deploy.torch_ssm(
            x, A, Bs, Cs, D, dts, dt_bias, time_step_limit, chunk_size
        ).float()
        cum = log_decay.cumsum(1)  # [S, L, H]
        y = zero_state + torch.einsum("slhn,shpn,slh->slhp", Cf, h0, cum.exp())
        to_end = _reverse_exclusive_cumsum(log_decay, 1).exp()
        h = h0 * cum[:, -1, :, None, None].exp() + torch.einsum(
            "slh,slh,slhp,slhn->shpn", to_end, step, xf, Bf
        )
    _write_state(ssm_state, slots, h)
    return _from_rows(y, seq_lens, packed)


@cached_ssm.register_fake
def _cached_ssm_fake(
    hidden_states: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    time_step_limit: list[float],
    chunk_size: int,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# gated delta rule
# ---------------------------------------------------------------------------------------------------


def gated_delta_from_state(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over ``[S, L, H, ...]`` fp32 rows from ``state`` ``[S, H, K, V]``.

    ``query`` is normalised and scaled, ``key`` normalised, both with ``H`` (value) heads;
    ``log_decay`` and ``beta`` ``[S, L, H]``. Returns the outputs ``[S, L, H, V]`` and the final state.
    One token: the recurrence; more: the chunked solve of ``torch_gated_delta_rule``, started from
    ``state`` instead of zero.
    """
    if query.shape[1] == 1:
        state = state * log_decay[:, 0, :, None, None].exp()
        error = value[:, 0] - torch.einsum("shkv,shk->shv", state, key[:, 0])
        state = state + torch.einsum("shk,shv->shkv", key[:, 0], beta[:, 0, :, None] * error)
        return torch.einsum("shkv,shk->shv", state, query[:, 0])[:, None], state
    length, chunk = query.shape[1], GATED_DELTA_CHUNK_SIZE

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [s, l, h, ...] -> [s, h, chunk, pos, ...]
        return _pad_to_chunks(t.transpose(1, 2), 2, chunk)

    query, key, value = heads_first(query), heads_first(key), heads_first(value)
    log_decay, beta = heads_first(log_decay), heads_first(beta)[..., None]
    cum = log_decay.cumsum(-1)
    decay = torch.exp(_segsum(log_decay))
    system = ((key * beta) @ key.transpose(-1, -2) * decay).tril(-1)
    new_values = torch.linalg.solve_triangular(system, value * beta, upper=False, unitriangular=True)
    state_read = torch.linalg.solve_triangular(
        system, key * beta * cum.exp()[..., None], upper=False, unitriangular=True
    )
    intra = query @ key.transpose(-1, -2) * decay
    query_from_start = query * cum.exp()[..., None]
    key_to_end = key * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    outputs = []
    for i in range(query.shape[2]):
        u = new_values[:, :, i] - state_read[:, :, i] @ state
        outputs.append(query_from_start[:, :, i] @ state + intra[:, :, i] @ u)
        state = state * chunk_decay[:, :, i] + key_to_end[:, :, i].transpose(-1, -2) @ u
    out = torch.cat(outputs, dim=2)[:, :, :length]
    return out.transpose(1, 2), state


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_GATED_DELTA_RULE}", mutates_args=("delta_state",))
def cached_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    delta_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``torch_gated_delta_rule`` continuing from each sequence's state ``S`` ``[Hv, K, V]``.

    Padding gets no decay and no write (``g = 0``, ``β = 0``), so the state stops at each sequence's last
    real token. Returns ``v``'s dtype.
    """
    packed = _is_packed(v, seq_lens)
    q, k, v, a, b = (_to_rows(t, seq_lens, packed) for t in (q, k, v, a, b))
    query, key = delta_query_key(q, k, v.shape[2], scale)
    real = _real(seq_lens, v.shape[1])[..., None]
    log_decay = torch.where(real, -A_log.float().exp() * F.softplus(a.float() + dt_bias.float()), 0.0)
    beta = torch.where(real, b.float().sigmoid(), 0.0)
    state = _read_state(delta_state, slots, input_pos).float()
    out, state = gated_delta_from_state(query, key, v.float(), log_decay, beta, state)
    _write_state(delta_state, slots, state)
    return _from_rows(out.to(v.dtype), seq_lens, packed)


@cached_gated_delta_rule.register_fake
def _cached_gated_delta_rule_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    delta_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    return v.new_empty(v.shape)


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_CHANNEL_GATED_DELTA_RULE}", mutates_args=("delta_state",))
def cached_channel_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    delta_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``torch_channel_gated_delta_rule`` continuing from each sequence's state ``S`` ``[Hv, K, V]``.

    Padding gets no decay and no write (``g = 0``, ``β = 0``), so the state stops at each sequence's last
    real token. Returns ``v``'s dtype.
    """
    packed = _is_packed(v, seq_lens)
    q, k, v, g, beta = (_to_rows(t, seq_lens, packed) for t in (q, k, v, g, beta))
    query, key = delta_query_key(q, k, v.shape[2], scale)
    real = _real(seq_lens, v.shape[1])[..., None]
    log_decay = torch.where(real[..., None], g.float(), 0.0)
    write = torch.where(real, beta.float(), 0.0)
    state = _read_state(delta_state, slots, input_pos).float()
    out, state = channel_delta_from_state(query, key, v.float(), log_decay, write, state)
    _write_state(delta_state, slots, state)
    return _from_rows(out.to(v.dtype), seq_lens, packed)


@cached_channel_gated_delta_rule.register_fake
def _cached_channel_gated_delta_rule_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    delta_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    return v.new_empty(v.shape)


@torch.library.custom_op(f"{NAMESPACE}::{CACHED_RG_LRU}", mutates_args=("lru_state",))
def cached_rg_lru(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    lru_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    gate_scale: float = 8.0,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """``torch_rg_lru`` continuing from each sequence's state ``h`` ``[C]``.

    Only a sequence's token at position 0 skips the input normalisation; padding gets no decay and no
    input (``log a = 0``, ``x = 0``), so the state stops at each sequence's last real token. Returns
    ``x``'s dtype.
    """
    packed = _is_packed(x, seq_lens)
    rows = _to_rows(x, seq_lens, packed)
    length = rows.shape[1]
    first = (input_pos[:, None] + torch.arange(length, device=x.device)) == 0
    params = (input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias, recurrent_param)
    inputs, log_a = rg_lru_inputs(rows, *params, first, gate_scale)
    real = _real(seq_lens, length)[..., None]
    inputs, log_a = torch.where(real, inputs, 0.0), torch.where(real, log_a, 0.0)
    state = _read_state(lru_state, slots, input_pos).float()
    out, state = linear_recurrence_from_state(inputs, log_a, state)
    _write_state(lru_state, slots, state)
    return _from_rows(out.to(x.dtype), seq_lens, packed)


@cached_rg_lru.register_fake
def _cached_rg_lru_fake(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    lru_state: torch.Tensor,
    slots: torch.Tensor | None,
    input_pos: torch.Tensor,
    seq_lens: torch.Tensor,
    gate_scale: float = 8.0,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    return x.new_empty(x.shape)
