"""State-space and linear-attention ops: causal conv1d, Mamba2 chunked scan and the gated delta rule
with a decay per head (Gated DeltaNet) or per key channel (Kimi Delta Attention), and Griffin's RG-LRU.

All of them take channels-last ``[batch, seq, ...]`` tensors (bsnd for the per-head ones). The scans
run in fp32 on chunks of the sequence, padded at the end to a whole number of chunks; the padding
is cut from the output.
"""

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op
from onboardlm.ops.sharding import check_hints

#: Chunk length of the gated delta rule scan (AutoDeploy's and FLA's default).
GATED_DELTA_CHUNK_SIZE = 64


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = x[..., j+1] + ... + x[..., i]`` for ``i >= j`` (0 on the diagonal), -inf above.

    Built from a masked cumsum rather than differences of one cumsum, so it stays accurate for long
    chunks; ``exp`` of it is the causal decay matrix between positions ``j`` and ``i``.
    """
    n = x.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device)
    rows = x[..., :, None].expand(*x.shape, n).masked_fill(~lower.tril(-1), 0.0)
    return rows.cumsum(dim=-2).masked_fill(~lower.tril(), float("-inf"))


def _pad_to_chunks(x: torch.Tensor, dim: int, chunk_size: int) -> torch.Tensor:
    """Zero-pad ``x`` at the end of ``dim`` to a multiple of ``chunk_size``, then split that dim into chunks."""
    pad = (-x.shape[dim]) % chunk_size
    padding = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
    return F.pad(x, padding).unflatten(dim, (-1, chunk_size))


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x * rsqrt(sum(x², -1) + eps)`` (the FLA / HF convention, eps inside the root)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_query_key(
    q: torch.Tensor, k: torch.Tensor, value_heads: int, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule's queries and keys ``[B, S, Hv, K]``: L2-normalised in fp32, each key head
    repeated for its value heads, queries times ``scale`` (default ``K ** -0.5``)."""
    repeats = value_heads // q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    query = _l2norm(q.float()).repeat_interleave(repeats, dim=2) * scale
    return query, _l2norm(k.float()).repeat_interleave(repeats, dim=2)


def _check_heads(kind: str, heads: int, groups: int) -> None:
    if groups <= 0 or heads % groups:
        raise ValueError(f"{kind}: {heads} heads cannot be shared evenly by {groups} groups")


def _check_conv(
    weight: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    padding_mode: str,
    output_sizes: list[int] | None,
    layer_type: str,
) -> None:
    check_hints(layer_type=layer_type)
    if padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros', got {padding_mode!r}")
    if stride != 1:
        raise ValueError(f"stride must be 1 for a causal conv with one output per step, got {stride}")
    causal_padding = dilation * (weight.shape[-1] - 1)
    if padding != causal_padding:
        raise ValueError(
            f"padding must be dilation * (kernel_size - 1) = {causal_padding} for a causal conv, got {padding}"
        )
    if output_sizes is not None and sum(output_sizes) != weight.shape[0]:
        raise ValueError(f"output_sizes {output_sizes} must sum to the {weight.shape[0]} output channels")


@canonical_op("torch_causal_conv1d")
def torch_causal_conv1d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    shardable: bool = False,
    output_sizes: list[int] | None = None,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Causal 1D convolution over the sequence of a channels-last ``[B, S, C_in]`` input.

    Equals ``nn.Conv1d(..., padding=padding)`` on ``[B, C_in, S]`` with the output cut to its first
    ``S`` steps, so step ``t`` sees inputs ``t - padding .. t``. ``weight`` is ``[C_out, C_in / groups,
    K]``; ``padding`` must be ``dilation * (K - 1)``, ``stride`` 1 and ``padding_mode`` ``"zeros"``.
    Computed in the input dtype; returns a contiguous ``[B, S, C_out]``. ``shardable``,
    ``output_sizes`` (channel groups of a fused weight) and ``layer_type`` are sharding hints.
    """
    _check_conv(weight, stride, padding, dilation, padding_mode, output_sizes, layer_type)
    x = F.pad(input.transpose(1, 2), (padding, 0))
    b = None if bias is None else bias.to(input.dtype)
    out = F.conv1d(x, weight.to(input.dtype), b, dilation=dilation, groups=groups)
    return out.transpose(1, 2).contiguous()


@torch_causal_conv1d.register_fake
def _torch_causal_conv1d_fake(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    shardable: bool = False,
    output_sizes: list[int] | None = None,
    layer_type: str = "unknown",
) -> torch.Tensor:
    _check_conv(weight, stride, padding, dilation, padding_mode, output_sizes, layer_type)
    return input.new_empty(input.shape[0], input.shape[1], weight.shape[0])


def _check_ssm(
    hidden_states: torch.Tensor,
    B: torch.Tensor,
    time_step_limit: list[float],
    chunk_size: int,
    layer_type: str,
) -> None:
    check_hints(layer_type=layer_type)
    _check_heads("torch_ssm", hidden_states.shape[2], B.shape[2])
    if len(time_step_limit) != 2:
        raise ValueError(f"time_step_limit must be [min, max], got {time_step_limit}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


@canonical_op("torch_ssm")
def torch_ssm(
    hidden_states: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    time_step_limit: list[float],
    chunk_size: int,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Mamba2 selective scan (SSD) from a zero state, computed chunk by chunk in fp32.

    Shapes: ``hidden_states`` x ``[B, S, H, P]``, ``A`` ``[H]`` (negative: ``-exp(A_log)``), ``B`` and
    ``C`` ``[B, S, G, N]`` shared by ``H / G`` consecutive heads, ``D`` ``[H]``, ``dt`` ``[B, S, H]``
    (raw), ``dt_bias`` ``[H]``. With ``Δ = clamp(softplus(dt + dt_bias), *time_step_limit)`` the
    per-head state ``h [P, N]`` follows ``h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ`` and the output is
    ``y_t = h_t C_t + D x_t``. Returns fp32 ``[B, S, H, P]`` (as AutoDeploy does; the caller casts
    after the gated norm). ``shardable`` and ``layer_type`` are sharding hints.
    """
    _check_ssm(hidden_states, B, time_step_limit, chunk_size, layer_type)
    batch, seq_len, heads, head_dim = hidden_states.shape
    per_group = heads // B.shape[2]

    x = hidden_states.float()
    step = F.softplus(dt.float() + dt_bias.float()).clamp(time_step_limit[0], time_step_limit[1])
    # chunked layouts: x [b, c, l, h, p], B/C [b, c, l, h, n], step [b, c, l, h]
    xs = _pad_to_chunks(x * step[..., None], 1, chunk_size)
    Bs = _pad_to_chunks(B.float().repeat_interleave(per_group, dim=2), 1, chunk_size)
    Cs = _pad_to_chunks(C.float().repeat_interleave(per_group, dim=2), 1, chunk_size)
    log_decay = _pad_to_chunks(step * A.float(), 1, chunk_size).permute(0, 3, 1, 2)  # [b, h, c, l]
    cum = log_decay.cumsum(-1)

    # within each chunk: attention-like form with a causal decay mask
    scores = torch.einsum("bclhn,bcshn->bhcls", Cs, Bs) * torch.exp(_segsum(log_decay))
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xs)

    # state each chunk leaves behind when started from zero, carried across chunks with their decays
    chunk_states = torch.einsum("bhcl,bclhn,bclhp->bchpn", torch.exp(cum[..., -1:] - cum), Bs, xs)
    carry = torch.exp(_segsum(F.pad(cum[..., -1], (1, 0))))[..., :-1, 1:]  # [b, h, chunk, source chunk]
    start_states = torch.einsum("bhcz,bzhpn->bchpn", carry, chunk_states)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, start_states, torch.exp(cum))

    y = y.flatten(1, 2)[:, :seq_len] + D.float()[:, None] * x
    return y.contiguous()


@torch_ssm.register_fake
def _torch_ssm_fake(
    hidden_states: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor,
    time_step_limit: list[float],
    chunk_size: int,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    _check_ssm(hidden_states, B, time_step_limit, chunk_size, layer_type)
    return hidden_states.new_empty(hidden_states.shape, dtype=torch.float32)


def _check_gated_delta(q: torch.Tensor, v: torch.Tensor, layer_type: str) -> None:
    check_hints(layer_type=layer_type)
    _check_heads("torch_gated_delta_rule", v.shape[2], q.shape[2])


@canonical_op("torch_gated_delta_rule")
def torch_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Gated delta rule linear attention (Gated DeltaNet, Qwen3-Next) from a zero state, in fp32.

    Inputs are bsnd: ``q``, ``k`` ``[B, S, Hk, K]`` raw (the op L2-normalises them, eps 1e-6, and
    repeats each of the ``Hk`` heads for ``Hv / Hk`` consecutive value heads), ``v`` ``[B, S, Hv, V]``,
    ``a``, ``b`` ``[B, S, Hv]`` raw projections, ``A_log``, ``dt_bias`` ``[Hv]``. The op forms the
    decay ``g = -exp(A_log) * softplus(a + dt_bias)`` and the write strength ``β = sigmoid(b)``; the
    state ``S [K, V]`` follows ``S_t = e^{g_t} S_{t-1} + k_t β_t (v_t - e^{g_t} S_{t-1}ᵀ k_t)ᵀ`` and
    ``o_t = S_tᵀ q_t · scale`` (default ``K ** -0.5``). Returns ``[B, S, Hv, V]`` in ``v``'s dtype.
    ``shardable`` and ``layer_type`` are sharding hints.
    """
    _check_gated_delta(q, v, layer_type)
    seq_len, k_dim = q.shape[1], q.shape[-1]
    chunk = GATED_DELTA_CHUNK_SIZE

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [b, s, h, ...] -> [b, h, chunk, pos, ...]
        return _pad_to_chunks(t.transpose(1, 2), 2, chunk)

    query, key = delta_query_key(q, k, v.shape[2], scale)
    log_decay = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    beta = b.float().sigmoid()
    query, key, value = heads_first(query), heads_first(key), heads_first(v.float())
    log_decay, beta = heads_first(log_decay), heads_first(beta)[..., None]

    cum = log_decay.cumsum(-1)
    decay = torch.exp(_segsum(log_decay))  # [b, h, c, l, l], causal incl. the diagonal
    # Within a chunk the corrected values u solve (I + tril₋₁(β k kᵀ ∘ decay)) u = β (v - e^{cum} S₀ᵀ k):
    # one triangular solve for the value part, one for the part that reads the chunk's start state.
    system = ((key * beta) @ key.transpose(-1, -2) * decay).tril(-1)
    new_values = torch.linalg.solve_triangular(system, value * beta, upper=False, unitriangular=True)
    state_read = torch.linalg.solve_triangular(
        system, key * beta * cum.exp()[..., None], upper=False, unitriangular=True
    )
    intra = query @ key.transpose(-1, -2) * decay
    query_from_start = query * cum.exp()[..., None]
    key_to_end = key * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]

    state = query.new_zeros(*query.shape[:2], k_dim, v.shape[-1])
    outputs = []
    for i in range(query.shape[2]):
        u = new_values[:, :, i] - state_read[:, :, i] @ state
        outputs.append(query_from_start[:, :, i] @ state + intra[:, :, i] @ u)
        state = state * chunk_decay[:, :, i] + key_to_end[:, :, i].transpose(-1, -2) @ u
    out = torch.cat(outputs, dim=2)[:, :, :seq_len]
    return out.transpose(1, 2).to(v.dtype).contiguous()


@torch_gated_delta_rule.register_fake
def _torch_gated_delta_rule_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    _check_gated_delta(q, v, layer_type)
    return v.new_empty(v.shape)


#: Chunk length of the per-channel-decay delta rule scan (its pairwise decays are [chunk, chunk, K]).
CHANNEL_DELTA_CHUNK_SIZE = 16


def channel_delta_from_state(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule with a per-key-channel decay over ``[S, L, H, ...]`` fp32 rows from ``state``.

    ``query`` (normalised and scaled) and ``key`` (normalised) ``[S, L, H, K]`` with ``H`` value
    heads, ``value`` ``[S, L, H, V]``, ``log_decay`` ``[S, L, H, K]``, ``beta`` ``[S, L, H]``, ``state``
    ``[S, H, K, V]``. Returns the outputs ``[S, L, H, V]`` and the final state. One token: the
    recurrence; more: chunks of :data:`CHANNEL_DELTA_CHUNK_SIZE`, each one triangular solve for the
    corrected values with the pairwise decays ``exp(cum_i - cum_j)`` per channel (no ``exp(-cum)``
    factor, so strong decays cannot overflow).
    """
    if query.shape[1] == 1:
        state = state * log_decay[:, 0, :, :, None].exp()
        error = value[:, 0] - torch.einsum("shkv,shk->shv", state, key[:, 0])
        state = state + torch.einsum("shk,shv->shkv", key[:, 0], beta[:, 0, :, None] * error)
        return torch.einsum("shkv,shk->shv", state, query[:, 0])[:, None], state
    length, chunk = query.shape[1], CHANNEL_DELTA_CHUNK_SIZE

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [s, l, h, ...] -> [s, h, chunk, pos, ...]
        return _pad_to_chunks(t.transpose(1, 2), 2, chunk)

    query, key, value = heads_first(query), heads_first(key), heads_first(value)
    log_decay, beta = heads_first(log_decay), heads_first(beta)[..., None]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).tril()
    outputs = []
    for i in range(query.shape[2]):
        q, k, v, b = query[:, :, i], key[:, :, i], value[:, :, i], beta[:, :, i]
        cum = log_decay[:, :, i].cumsum(-2)  # [s, h, pos, K]
        pairwise = (cum[:, :, :, None] - cum[:, :, None]).masked_fill(~causal[..., None], float("-inf"))
        decay = pairwise.exp()  # [s, h, i, j, K]: exp(cum_i - cum_j) for j <= i, else 0
        system = (torch.einsum("shik,shjk,shijk->shij", k * b, k, decay)).tril(-1)
        new_values = torch.linalg.solve_triangular(system, v * b, upper=False, unitriangular=True)
        state_read = torch.linalg.solve_triangular(system, k * b * cum.exp(), upper=False, unitriangular=True)
        u = new_values - state_read @ state
        intra = torch.einsum("shik,shjk,shijk->shij", q, k, decay)
        outputs.append((q * cum.exp()) @ state + intra @ u)
        last = cum[:, :, -1:]
        state = state * last.transpose(-1, -2).exp() + (k * (last - cum).exp()).transpose(-1, -2) @ u
    out = torch.cat(outputs, dim=2)[:, :, :length]
    return out.transpose(1, 2), state


def _check_channel_delta(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor, layer_type: str) -> None:
    check_hints(layer_type=layer_type)
    _check_heads("torch_channel_gated_delta_rule", v.shape[2], q.shape[2])
    if tuple(g.shape) != (*v.shape[:3], q.shape[-1]):
        raise ValueError(
            f"torch_channel_gated_delta_rule: g must be [B, S, Hv, K] = {[*v.shape[:3], q.shape[-1]]}, "
            f"got {list(g.shape)}"
        )


@canonical_op("torch_channel_gated_delta_rule")
def torch_channel_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Delta rule linear attention with a decay per key channel (Kimi Delta Attention), from a zero state.

    Inputs are bsnd: ``q``, ``k`` ``[B, S, Hk, K]`` raw (L2-normalised here, eps 1e-6, each of the
    ``Hk`` heads repeated for ``Hv / Hk`` consecutive value heads), ``v`` ``[B, S, Hv, V]``, ``g``
    ``[B, S, Hv, K]`` the log decay of each key channel (≤ 0; the model computes it, e.g.
    ``-exp(A_log) * softplus(f + dt_bias)``), ``beta`` ``[B, S, Hv]`` the write strength (the model
    applies its sigmoid, and any factor such as 2 for negative eigenvalues). The state ``S [K, V]``
    follows ``S_t = diag(e^{g_t}) S_{t-1} + k_t β_t (v_t - (diag(e^{g_t}) S_{t-1})ᵀ k_t)ᵀ`` and
    ``o_t = S_tᵀ q_t · scale`` (default ``K ** -0.5``). Computed in fp32; returns ``[B, S, Hv, V]`` in
    ``v``'s dtype. ``shardable`` and ``layer_type`` are sharding hints.
    """
    _check_channel_delta(q, v, g, layer_type)
    k_dim = q.shape[-1]
    query, key = delta_query_key(q, k, v.shape[2], scale)
    state = query.new_zeros(v.shape[0], v.shape[2], k_dim, v.shape[-1])
    out, _ = channel_delta_from_state(query, key, v.float(), g.float(), beta.float(), state)
    return out.to(v.dtype).contiguous()


@torch_channel_gated_delta_rule.register_fake
def _torch_channel_gated_delta_rule_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    _check_channel_delta(q, v, g, layer_type)
    return v.new_empty(v.shape)


#: Chunk length of the RG-LRU scan (its pairwise decays are [chunk, chunk, C]).
RG_LRU_CHUNK_SIZE = 16


def rg_lru_inputs(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    first: torch.Tensor,
    gate_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RG-LRU's scan inputs in fp32 from ``x`` ``[B, S, C]``: the normalised gated input
    ``sqrt(1 - a²) · σ(x W_i + b_i) · x`` (no normalisation at a sequence's first token, ``first``
    ``[B, S]`` bool) and the log recurrence ``log a = -gate_scale · σ(x W_a + b_a) · softplus(Λ)``;
    the gates are block-diagonal, one ``[D, D]`` block per head."""
    heads = input_gate_weight.shape[0]
    blocks = x.float().unflatten(-1, (heads, -1))

    def gate(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(torch.einsum("bshd,hde->bshe", blocks, weight.float()) + bias.float()).flatten(2)

    log_a = (
        -gate_scale * gate(recurrent_gate_weight, recurrent_gate_bias) * F.softplus(recurrent_param.float())
    )
    multiplier = torch.where(first[..., None], 1.0, torch.sqrt(1 - torch.exp(2 * log_a)))
    return x.float() * gate(input_gate_weight, input_gate_bias) * multiplier, log_a


def linear_recurrence_from_state(
    x: torch.Tensor, log_a: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = e^{log_a_t} · h_{t-1} + x_t`` over ``[B, S, C]`` fp32 rows from ``state`` ``[B, C]``.

    One token: the recurrence; more: chunks of :data:`RG_LRU_CHUNK_SIZE` with the pairwise decays
    ``exp(cum_i - cum_j)`` (no ``exp(-cum)`` factor, so strong decays cannot overflow). Returns the
    outputs ``[B, S, C]`` and the state after the last token (zero padding leaves it unchanged).
    """
    if x.shape[1] == 1:
        state = log_a[:, 0].exp() * state + x[:, 0]
        return state[:, None], state
    length, chunk = x.shape[1], RG_LRU_CHUNK_SIZE
    x, log_a = _pad_to_chunks(x, 1, chunk), _pad_to_chunks(log_a, 1, chunk)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    outputs = []
    for i in range(x.shape[1]):
        cum = log_a[:, i].cumsum(1)  # [b, pos, C]
        pairwise = (cum[:, :, None] - cum[:, None]).masked_fill(~causal[..., None], float("-inf"))
        out = torch.einsum("bijc,bjc->bic", pairwise.exp(), x[:, i]) + cum.exp() * state[:, None]
        outputs.append(out)
        state = out[:, -1]
    return torch.cat(outputs, dim=1)[:, :length], state


def _check_rg_lru(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    layer_type: str,
) -> None:
    check_hints(layer_type=layer_type)
    heads, width = input_gate_weight.shape[0], x.shape[-1]
    if x.dim() != 3 or heads <= 0 or width % heads:
        raise ValueError(
            f"torch_rg_lru: x must be [B, S, C] with C divisible by the {heads} gate blocks, got {list(x.shape)}"
        )
    block = width // heads
    expected = {
        "input_gate_weight": (input_gate_weight, (heads, block, block)),
        "input_gate_bias": (input_gate_bias, (heads, block)),
        "recurrent_gate_weight": (recurrent_gate_weight, (heads, block, block)),
        "recurrent_gate_bias": (recurrent_gate_bias, (heads, block)),
        "recurrent_param": (recurrent_param, (width,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"torch_rg_lru: {name} must be {list(shape)}, got {list(tensor.shape)}")


@canonical_op("torch_rg_lru")
def torch_rg_lru(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    gate_scale: float = 8.0,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    """Griffin's real-gated linear recurrent unit (RG-LRU) over a sequence that starts at position 0.

    ``x`` ``[B, S, C]``; ``input_gate_weight`` / ``recurrent_gate_weight`` ``[H, D, D]`` and their
    biases ``[H, D]`` (block-diagonal gates, ``C = H·D``, block ``h`` maps channels ``h·D .. h·D+D-1``:
    ``gate = σ(x_h W_h + b_h)``); ``recurrent_param`` ``[C]`` (Λ). With ``log a_t = -gate_scale ·
    r_t · softplus(Λ)``: ``h_t = a_t h_{t-1} + sqrt(1 - a_t²) · (i_t ⊙ x_t)``, except
    ``h_0 = i_0 ⊙ x_0`` (the first token is not normalised). Computed in fp32; returns ``[B, S, C]``
    in ``x``'s dtype. ``shardable`` and ``layer_type`` are sharding hints (heads are independent).
    """
    params = (input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias, recurrent_param)
    _check_rg_lru(x, *params, layer_type)
    first = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    first[:, 0] = True
    inputs, log_a = rg_lru_inputs(x, *params, first, gate_scale)
    out, _ = linear_recurrence_from_state(inputs, log_a, inputs.new_zeros(x.shape[0], x.shape[-1]))
    return out.to(x.dtype).contiguous()


@torch_rg_lru.register_fake
def _torch_rg_lru_fake(
    x: torch.Tensor,
    input_gate_weight: torch.Tensor,
    input_gate_bias: torch.Tensor,
    recurrent_gate_weight: torch.Tensor,
    recurrent_gate_bias: torch.Tensor,
    recurrent_param: torch.Tensor,
    gate_scale: float = 8.0,
    shardable: bool = False,
    layer_type: str = "unknown",
) -> torch.Tensor:
    params = (input_gate_weight, input_gate_bias, recurrent_gate_weight, recurrent_gate_bias, recurrent_param)
    _check_rg_lru(x, *params, layer_type)
    return x.new_empty(x.shape)
