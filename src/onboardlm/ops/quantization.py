"""FP8 (``float8_e4m3fn``) linear ops: the reference fake-quant op and the fused kernel op.

Both take TensorRT-LLM AutoDeploy's argument list
``(input, weight_quantized, bias, input_scale, weight_scale, input_zp, weight_zp)`` (scales and zero
points as lists; FP8 has no zero points, so ``input_zp`` and ``weight_zp`` are empty). The scheme is
read from the scales:

* ``weight_scale[0]`` holds one value (per tensor), ``N`` values (``[N]`` or ``[N, 1]``: per output
  channel) or a 2-D grid ``[ceil(N / bn), ceil(K / bk)]`` (block scales as DeepSeek-V3 and Qwen3 FP8
  checkpoints ship them; ``bn``/``bk`` are the powers of two that fit the grid, 128 in practice);
  the weight is ``weight_quantized * scale`` per element.
* ``input_scale`` empty: the activation is quantised dynamically, one scale per token (per token and
  per ``bk`` group of channels with block-scaled weights); ``[s]``: statically with that one scale.

Quantising ``x`` with scale ``s`` means ``fp8(clamp(x / s, -448, 448))``; a dynamic scale is
``max(amax / 448, 1e-12)`` over the group. :func:`torch_fake_quant_fp8_linear` quantises and
dequantises the activation, dequantises the weight and multiplies in float (fp32, or fp64 for fp64
inputs): the numbers every fused kernel must reproduce, runnable on the CPU.
:func:`torch_quant_fp8_linear` is the fused op (:mod:`onboardlm.kernels.fp8_linear`: ``torch._scaled_mm``
or Triton kernels on CUDA, the reference elsewhere); :mod:`onboardlm.transforms.fuse_fp8` swaps it in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onboardlm.ops._library import canonical_op

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Smallest dynamic scale (an all-zero group quantises to zeros).
MIN_SCALE = 1e-12


def _pow2_at_least(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def weight_scheme(weight: torch.Tensor, scale: torch.Tensor) -> tuple[str, tuple[int, int] | None]:
    """``("tensor" | "channel" | "block", (bn, bk) or None)`` for an FP8 ``weight [N, K]`` and its ``scale``."""
    n, k = weight.shape
    if scale.numel() == 1:
        return "tensor", None
    if scale.dim() == 1 or (scale.dim() == 2 and tuple(scale.shape) == (n, 1)):
        if scale.numel() != n:
            raise ValueError(f"weight scale of shape {list(scale.shape)} does not fit a [{n}, {k}] weight")
        return "channel", None
    if scale.dim() != 2:
        raise ValueError(f"weight scale must be 0-, 1- or 2-D, got shape {list(scale.shape)}")
    rows, cols = scale.shape
    bn, bk = _pow2_at_least(-(-n // rows)), _pow2_at_least(-(-k // cols))
    if -(-n // bn) != rows or -(-k // bk) != cols:
        raise ValueError(f"weight scale of shape {list(scale.shape)} is no block grid of a [{n}, {k}] weight")
    return "block", (bn, bk)


def dequantize_weight(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype``: ``weight_quantized * scale`` broadcast per tensor, channel or block."""
    kind, block = weight_scheme(weight, scale)
    w = weight.to(dtype)
    s = scale.to(dtype)
    if kind == "tensor":
        return w * s.reshape(())
    if kind == "channel":
        return w * s.reshape(-1, 1)
    assert block is not None
    n, k = weight.shape
    s = s.repeat_interleave(block[0], dim=0)[:n].repeat_interleave(block[1], dim=1)[:, :k]
    return w * s


def quantize_activation(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)``: statically with ``static_scale``, else per token (per ``group`` channels).

    ``scale`` is fp32, shaped ``[*x.shape[:-1], 1]`` per token or ``[*x.shape[:-1], K / group]`` per
    group (``x``'s last dim padded to a multiple of ``group`` with zeros).
    """
    xf = x.float() if x.dtype != torch.float64 else x
    if static_scale is not None:
        scale = static_scale.to(xf.dtype).reshape(())
        return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.float()
    if group is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
        return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    k = x.shape[-1]
    padded = F.pad(xf, (0, -k % group))
    groups = padded.unflatten(-1, (-1, group))
    scale = (groups.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)
    quantized = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.flatten(-2)[..., :k], scale.squeeze(-1)


def fake_quantize_activation(
    x: torch.Tensor, static_scale: torch.Tensor | None, group: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x`` quantised to FP8 (see :func:`quantize_activation`) and dequantised in ``dtype``."""
    quantized, scale = quantize_activation(x, static_scale, group)
    if static_scale is not None or group is None:
        return quantized.to(dtype) * scale.to(dtype)
    k = x.shape[-1]
    expanded = scale.to(dtype).repeat_interleave(group, dim=-1)[..., :k]
    return quantized.to(dtype) * expanded


def _check_lists(
    input_scale: list[torch.Tensor], weight_scale: list[torch.Tensor], input_zp: list, weight_zp: list
) -> None:
    if len(weight_scale) != 1:
        raise ValueError(f"weight_scale takes one tensor, got {len(weight_scale)}")
    if len(input_scale) > 1:
        raise ValueError(f"input_scale takes at most one tensor, got {len(input_scale)}")
    if input_zp or weight_zp:
        raise ValueError("FP8 linears have no zero points: pass input_zp=[] and weight_zp=[]")


@canonical_op("torch_fake_quant_fp8_linear")
def torch_fake_quant_fp8_linear(
    input: torch.Tensor,
    weight_quantized: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    input_zp: list[torch.Tensor],
    weight_zp: list[torch.Tensor],
) -> torch.Tensor:
    """Reference FP8 linear (module doc): Q/DQ of the activation, DQ of the weight, float matmul."""
    _check_lists(input_scale, weight_scale, input_zp, weight_zp)
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    kind, block = weight_scheme(weight_quantized, weight_scale[0])
    static = input_scale[0] if input_scale else None
    group = block[1] if kind == "block" and static is None else None
    x = fake_quantize_activation(input, static, group, compute)
    w = dequantize_weight(weight_quantized, weight_scale[0], compute)
    out = F.linear(x, w, None if bias is None else bias.to(compute))
    return out.to(input.dtype)


@torch_fake_quant_fp8_linear.register_fake
def _torch_fake_quant_fp8_linear_fake(
    input: torch.Tensor,
    weight_quantized: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    input_zp: list[torch.Tensor],
    weight_zp: list[torch.Tensor],
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight_quantized.shape[0]))


@canonical_op("torch_quant_fp8_linear")
def torch_quant_fp8_linear(
    input: torch.Tensor,
    weight_quantized: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    input_zp: list[torch.Tensor],
    weight_zp: list[torch.Tensor],
) -> torch.Tensor:
    """Fused FP8 linear: the reference's numbers from FP8 kernels (``onboardlm.kernels.fp8_linear``)."""
    from onboardlm.kernels import fp8_linear

    _check_lists(input_scale, weight_scale, input_zp, weight_zp)
    static = input_scale[0] if input_scale else None
    if fp8_linear.is_available(input, weight_quantized, weight_scale[0]):
        return fp8_linear.fp8_linear(input, weight_quantized, bias, static, weight_scale[0])
    return torch_fake_quant_fp8_linear(
        input, weight_quantized, bias, input_scale, weight_scale, input_zp, weight_zp
    )


@torch_quant_fp8_linear.register_fake
def _torch_quant_fp8_linear_fake(
    input: torch.Tensor,
    weight_quantized: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: list[torch.Tensor],
    weight_scale: list[torch.Tensor],
    input_zp: list[torch.Tensor],
    weight_zp: list[torch.Tensor],
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight_quantized.shape[0]))
