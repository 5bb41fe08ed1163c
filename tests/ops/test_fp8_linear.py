"""``torch_fake_quant_fp8_linear`` against an fp64 reference written here with plain torch.

The reference dequantises the FP8 weight (per tensor, per channel, 128 x 128 blocks with partial
edge blocks), quantises the activation to FP8 per the scheme (per token, per token and 128-channel
group, static) and dequantises it, all in float64, then multiplies. The op computes in fp32 for
bf16/fp32 inputs and in fp64 for fp64 inputs (where it must agree to rounding).
"""

from __future__ import annotations

import pytest
import torch

import onboardlm.ops  # noqa: F401  (registers the ops)
from onboardlm.ops.quantization import weight_scheme

E4M3 = torch.float8_e4m3fn
OPS = torch.ops.auto_deploy


def _q(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 of ``x / scale``, back in fp64 times ``scale`` (the fake quantisation, in fp64)."""
    return (x / scale).clamp(-448, 448).to(E4M3).double() * scale


def _activation64(x: torch.Tensor, static: float | None, group: int | None) -> torch.Tensor:
    x = x.double()
    if static is not None:
        return _q(x, torch.tensor(static).double())  # the fp32 scale the op is given, exactly
    if group is None:
        return _q(x, (x.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12))
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], group):
        part = x[..., start : start + group]
        out[..., start : start + group] = _q(part, (part.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12))
    return out


def _block_weight64(wq: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    w = wq.double()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] *= scale[i, j].double()
    return w


def _weights(n: int, k: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fp8 weight, scale, dequantised fp64 weight)`` built with plain torch."""
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    if kind == "tensor":
        scale = w.abs().amax() / 448
        wq = (w / scale).to(E4M3)
        return wq, scale.reshape(()), wq.double() * scale.double()
    if kind == "channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        wq = (w / scale).to(E4M3)
        return wq, scale, wq.double() * scale.double()
    rows, cols = -(-n // 128), -(-k // 128)
    scale = torch.rand(rows, cols, generator=g) * 1e-3 + 1e-4
    wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(E4M3)
    return wq, scale, _block_weight64(wq, scale, 128, 128)


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("static", [None, 0.02])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fake_quant_linear_equals_the_fp64_reference(
    kind: str, static: float | None, with_bias: bool
) -> None:
    n, k = 320, 392  # partial 128-blocks on both axes
    wq, scale, w64 = _weights(n, k, kind)
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64) if with_bias else None
    inputs = [torch.tensor(static)] if static is not None else []
    out = OPS.torch_fake_quant_fp8_linear(x, wq, bias, inputs, [scale], [], [])
    group = 128 if kind == "block" and static is None else None
    expected = torch.nn.functional.linear(_activation64(x, static, group), w64, bias)
    assert out.dtype == torch.float64 and out.shape == (2, 5, n)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # bf16 / fp32 activations: fp32 compute, the input dtype back
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = OPS.torch_fake_quant_fp8_linear(
            x.to(dtype), wq, None if bias is None else bias.to(dtype), inputs, [scale], [], []
        )
        ref = torch.nn.functional.linear(_activation64(x.to(dtype), static, group), w64, bias)
        assert got.dtype == dtype
        ratio = float((got.double() - ref).norm() / ref.norm())
        assert ratio < tol, (dtype, ratio)


def test_weight_scheme_reads_the_scale_shape() -> None:
    w = torch.empty(300, 260, dtype=E4M3)
    assert weight_scheme(w, torch.tensor(1.0)) == ("tensor", None)
    assert weight_scheme(w, torch.ones(300)) == ("channel", None)
    assert weight_scheme(w, torch.ones(300, 1)) == ("channel", None)
    assert weight_scheme(w, torch.ones(3, 3)) == ("block", (128, 128))
    with pytest.raises(ValueError, match="block grid"):
        weight_scheme(w, torch.ones(7, 3))


def test_fused_op_falls_back_to_the_reference_off_cuda_and_both_have_fake_kernels() -> None:
    wq, scale, _ = _weights(64, 96, "channel")
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    args = (x, wq, None, [], [scale], [], [])
    torch.testing.assert_close(OPS.torch_quant_fp8_linear(*args), OPS.torch_fake_quant_fp8_linear(*args))
    with torch.device("meta"):
        meta = OPS.torch_fake_quant_fp8_linear(
            torch.empty(3, 96, dtype=torch.bfloat16), wq.to("meta"), None, [], [scale.to("meta")], [], []
        )
    assert meta.shape == (3, 64) and meta.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="zero points"):
        OPS.torch_fake_quant_fp8_linear(x, wq, None, [], [scale], [torch.tensor(0)], [])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_fused_kernels_equal_the_reference_on_cuda(kind: str, tokens: int) -> None:
    wq, scale, _ = _weights(512, 1024, kind)
    wq, scale = wq.cuda(), scale.cuda()
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    for b in (None, bias):
        fused = OPS.torch_quant_fp8_linear(x, wq, b, [], [scale], [], [])
        ref = OPS.torch_fake_quant_fp8_linear(x, wq, b, [], [scale], [], [])
        ratio = float((fused.double() - ref.double()).norm() / ref.double().norm())
        assert ratio < 5e-3, ratio
