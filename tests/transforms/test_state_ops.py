"""Cached state ops (conv, Mamba2 SSM, gated delta rule per head and per channel, RG-LRU) against their canonical ops on whole sequences.

Float64 inputs (the ops compute in fp32, as the canonical ops do): a prefill of the prompt writes the
state, then one-token steps continue from it; the outputs must equal the canonical op run over the
whole sequence from scratch. Batches of sequences of different lengths (padded rows, packed rows,
chunked prefill, state slots in any order) must equal each sequence run alone, and a sequence that
starts (``input_pos`` 0) must ignore whatever its slot held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import onboardlm.transforms.state_ops  # noqa: F401  (registers the cached state ops)

OPS = torch.ops.auto_deploy
TOL = {"rtol": 1e-5, "atol": 1e-5}


@dataclass(frozen=True)
class Kind:
    """How to build one op's inputs and call its canonical and cached versions."""

    make: Callable[[int, int], list[torch.Tensor]]  # (batch, seq_len) -> tensor inputs
    per_token: tuple[int, ...]  # which inputs have a sequence dim (dim 1)
    state: Callable[[list[torch.Tensor]], tuple[int, ...]]  # one sequence's state shape
    state_dtype: torch.dtype
    full: Callable[[list[torch.Tensor]], torch.Tensor]
    cached: Callable[..., torch.Tensor]  # (inputs, state, slots, input_pos, seq_lens)


def _conv_make(batch: int, seq: int) -> list[torch.Tensor]:
    return [torch.randn(batch, seq, 6, dtype=torch.float64), torch.randn(6, 1, 4, dtype=torch.float64),
            torch.randn(6, dtype=torch.float64)]  # fmt: skip


def _ssm_make(batch: int, seq: int) -> list[torch.Tensor]:
    heads, head_dim, groups, n = 4, 3, 2, 5
    f64 = dict(dtype=torch.float64)
    return [
        torch.randn(batch, seq, heads, head_dim, **f64),
        -torch.exp(0.5 * torch.randn(heads, **f64)),
        torch.randn(batch, seq, groups, n, **f64),
        torch.randn(batch, seq, groups, n, **f64),
        torch.randn(heads, **f64),
        torch.randn(batch, seq, heads, **f64),
        torch.randn(heads, **f64),
    ]


def _gdr_make(batch: int, seq: int) -> list[torch.Tensor]:
    k_heads, v_heads, k_dim, v_dim = 2, 4, 4, 3
    f64 = dict(dtype=torch.float64)
    return [
        torch.randn(batch, seq, k_heads, k_dim, **f64),
        torch.randn(batch, seq, k_heads, k_dim, **f64),
        torch.randn(batch, seq, v_heads, v_dim, **f64),
        torch.randn(batch, seq, v_heads, **f64),
        torch.randn(batch, seq, v_heads, **f64),
        torch.log(torch.empty(v_heads, **f64).uniform_(0.01, 4)),
        torch.randn(v_heads, **f64),
    ]


def _channel_make(batch: int, seq: int) -> list[torch.Tensor]:
    k_heads, v_heads, k_dim, v_dim = 2, 4, 4, 3
    f64 = dict(dtype=torch.float64)
    decay = torch.empty(v_heads, k_dim, **f64).uniform_(0.01, 4)
    return [
        torch.randn(batch, seq, k_heads, k_dim, **f64),
        torch.randn(batch, seq, k_heads, k_dim, **f64),
        torch.randn(batch, seq, v_heads, v_dim, **f64),
        -decay * torch.nn.functional.softplus(torch.randn(batch, seq, v_heads, k_dim, **f64)),
        2 * torch.rand(batch, seq, v_heads, **f64),  # up to 2: negative eigenvalues allowed
    ]


def _rg_lru_make(batch: int, seq: int) -> list[torch.Tensor]:
    heads, block = 2, 3
    f64 = dict(dtype=torch.float64)
    return [
        torch.randn(batch, seq, heads * block, **f64),
        torch.randn(heads, block, block, **f64),
        torch.randn(heads, block, **f64),
        torch.randn(heads, block, block, **f64),
        torch.randn(heads, block, **f64),
        torch.empty(heads * block, **f64).uniform_(-4, 3),
    ]


CONV_ARGS = dict(stride=1, padding=6, dilation=2, groups=6)  # dilated depthwise: a state of 6 inputs
SSM_LIMIT, SSM_CHUNK = [0.0, math.inf], 4

KINDS = {
    "conv": Kind(
        _conv_make, (0,), lambda t: (6, t[0].shape[-1]), torch.float64,
        lambda t: OPS.torch_causal_conv1d(*t, **CONV_ARGS),
        lambda t, *c: OPS.onboardlm_cached_causal_conv1d(*t, *c, **CONV_ARGS),
    ),
    "ssm": Kind(
        _ssm_make, (0, 2, 3, 5), lambda t: (t[0].shape[2], t[0].shape[3], t[2].shape[3]), torch.float32,
        lambda t: OPS.torch_ssm(*t, SSM_LIMIT, SSM_CHUNK),
        lambda t, *c: OPS.onboardlm_cached_ssm(*t, *c, SSM_LIMIT, SSM_CHUNK),
    ),
    "gated_delta_rule": Kind(
        _gdr_make, (0, 1, 2, 3, 4), lambda t: (t[2].shape[2], t[0].shape[3], t[2].shape[3]), torch.float32,
        lambda t: OPS.torch_gated_delta_rule(*t),
        lambda t, *c: OPS.onboardlm_cached_gated_delta_rule(*t, *c),
    ),
    "channel_gated_delta_rule": Kind(
        _channel_make, (0, 1, 2, 3, 4), lambda t: (t[2].shape[2], t[0].shape[3], t[2].shape[3]), torch.float32,
        lambda t: OPS.torch_channel_gated_delta_rule(*t),
        lambda t, *c: OPS.onboardlm_cached_channel_gated_delta_rule(*t, *c),
    ),
    "rg_lru": Kind(
        _rg_lru_make, (0,), lambda t: (t[0].shape[2],), torch.float32,
        lambda t: OPS.torch_rg_lru(*t),
        lambda t, *c: OPS.onboardlm_cached_rg_lru(*t, *c),
    ),
}  # fmt: skip


def _tokens(
    kind: Kind, inputs: list[torch.Tensor], start: int, end: int, rows=slice(None)
) -> list[torch.Tensor]:
    return [t[rows, start:end] if i in kind.per_token else t for i, t in enumerate(inputs)]


def _long(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _state(kind: Kind, inputs: list[torch.Tensor], slots: int) -> torch.Tensor:
    return torch.randn(slots, *kind.state(inputs)).to(kind.state_dtype)  # garbage: must be ignored at start


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("prompt", [1, 5, 70])  # 70: more than one chunk of the delta rule (64)
def test_prefill_then_decode_steps_equal_a_full_recompute(name: str, prompt: int) -> None:
    kind, steps = KINDS[name], 4
    inputs = kind.make(2, prompt + steps)
    expected = kind.full(inputs)
    state = _state(kind, inputs, 2)
    pieces = [kind.cached(_tokens(kind, inputs, 0, prompt), state, None, _long(0, 0), _long(prompt, prompt))]
    for t in range(prompt, prompt + steps):
        pieces.append(kind.cached(_tokens(kind, inputs, t, t + 1), state, None, _long(t, t), _long(1, 1)))
    torch.testing.assert_close(torch.cat(pieces, dim=1).double(), expected.double(), **TOL)


@pytest.mark.parametrize("name", list(KINDS))
def test_padded_packed_and_chunked_batches_equal_each_sequence_alone(name: str) -> None:
    kind, lengths = KINDS[name], (7, 2, 5)
    inputs = kind.make(3, max(lengths) + 1)
    alone = [kind.full(_tokens(kind, inputs, 0, n + 1, slice(i, i + 1)))[0] for i, n in enumerate(lengths)]

    # padded rows, state rows in batch order; then a decode step
    state = _state(kind, inputs, 3)
    out = kind.cached(_tokens(kind, inputs, 0, max(lengths)), state, None, _long(0, 0, 0), _long(*lengths))
    step = [t if i not in kind.per_token else torch.stack([t[r, n] for r, n in enumerate(lengths)])[:, None]
            for i, t in enumerate(inputs)]  # fmt: skip
    last = kind.cached(step, state, None, _long(*lengths), _long(1, 1, 1))
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[i, :n].double(), alone[i][:n].double(), **TOL)
        torch.testing.assert_close(last[i, 0].double(), alone[i][n].double(), **TOL)

    # packed, slots out of order, prefill in two chunks (the second starts at input_pos 3 for row 0)
    slots = _long(4, 0, 2)
    state = _state(kind, inputs, 5)
    first = [3, 2, 5]

    def packed(bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [t if i not in kind.per_token else torch.cat([t[r, a:b] for r, (a, b) in enumerate(bounds)])[None]
                for i, t in enumerate(inputs)]  # fmt: skip

    out1 = kind.cached(packed([(0, f) for f in first]), state, slots, _long(0, 0, 0), _long(*first))
    rest = [(3, 7 + 1), (2, 2 + 1), (5, 5 + 1)]  # row 0: the rest of its prompt and a step; others: a step
    out2 = kind.cached(packed(rest), state, slots, _long(3, 2, 5), _long(*(b - a for a, b in rest)))
    got = [torch.cat([a, b]) for a, b in zip(out1[0].split(first), out2[0].split([5, 1, 1]), strict=True)]
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[i].double(), alone[i][: n + 1].double(), **TOL)


def test_one_token_packed_decode_matches_padded_rows() -> None:
    kind = KINDS["ssm"]
    inputs = kind.make(3, 1)
    state = _state(kind, inputs, 3)
    rows = kind.cached(inputs, state.clone(), None, _long(4, 2, 9), _long(1, 1, 1))
    flat = [t.transpose(0, 1) if i in kind.per_token else t for i, t in enumerate(inputs)]
    packed = kind.cached(flat, state, _long(0, 1, 2), _long(4, 2, 9), _long(1, 1, 1))
    torch.testing.assert_close(packed[0], rows[:, 0])


def test_cached_ops_trace_with_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for name, kind in KINDS.items():
            inputs = kind.make(2, 5)
            out = kind.cached(inputs, torch.zeros(2, *kind.state(inputs)), None, _long(0, 0), _long(5, 3))
            assert out.shape[:2] == (2, 5), name
