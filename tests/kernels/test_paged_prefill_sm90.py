"""The paged prefill kernel compiled for an H200 (sm_90) without a GPU: what the interpreter cannot show.

Triton compiles ahead of time for a target given by hand (``ptxas`` comes with its wheel), with the
divisibility hints the JIT gives contiguous caches. Each default launch configuration must use the
Hopper tensor-core instructions (``wgmma``), stream K/V tiles into shared memory with ``cp.async``
(pipelined), load nothing element by element (a mask that varies along the head dim makes 2-byte scalar
loads) and, where ``cuobjdump`` can read the binary, spill no registers.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from onboardlm.kernels import paged_prefill  # noqa: E402

ARGS = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
    "tables_ptr": "*i64", "starts_ptr": "*i64", "cached_ptr": "*i64",
    "stride_qt": "i32", "stride_qh": "i32", "stride_table": "i32", "stride_kslot": "i32", "stride_kh": "i32",
    "stride_vslot": "i32", "stride_vh": "i32", "stride_ot": "i32", "stride_oh": "i32",
    "n_seqs": "i32", "qk_scale": "fp32", "window": "i32",
}  # fmt: skip
#: Arguments the JIT marks divisible by 16 for contiguous bf16 tensors: all but the float and the
#: arguments the kernel leaves unspecialised.
UNSPECIALISED = {p.name for p in paged_prefill._prefill_kernel.params if p.do_not_specialize}
DIVISIBLE = set(ARGS) - UNSPECIALISED - {"qk_scale"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compile(head: int, group: int):  # noqa: ANN202
    config = paged_prefill.launch_config(head)
    heads = group if config.group_heads and group <= config.block_m else 1
    block = triton.next_power_of_2(head)
    constants = {
        "BLOCK_SIZE": 16, "GROUP": group, "HEADS": heads, "ROWS": config.block_m // heads,
        "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
        "HEAD_K": head, "BLOCK_K": block, "HEAD_V": head, "BLOCK_V": block,
    }  # fmt: skip
    signature = ARGS | dict.fromkeys(constants, "constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(ARGS) if name in DIVISIBLE}
    source = ASTSource(paged_prefill._prefill_kernel, signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)


@pytest.mark.parametrize(("head", "group"), [(64, 4), (96, 4), (128, 4), (128, 1), (256, 8)])
def test_sm90_build_uses_tensor_cores_and_vector_loads(head: int, group: int, tmp_path: Path) -> None:
    try:
        kernel = _compile(head, group)
    except RuntimeError as error:  # no ptxas for this platform in the wheel
        pytest.skip(f"cannot compile for sm_90 here: {error}")
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.cg.shared.global" in ptx
    assert not re.search(r"ld\.global(\.[a-z]+)*\.b16\b", ptx), "element-by-element loads"
    tool = TOOLS / "cuobjdump"
    if not os.access(tool, os.X_OK):
        return
    (tmp_path / "k.cubin").write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([tool, "-res-usage", tmp_path / "k.cubin"], capture_output=True, text=True).stdout
    assert re.search(r"STACK:0\b", usage), f"register spills: {usage.strip()}"
