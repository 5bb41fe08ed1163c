"""Runs the MoE decode kernels under Triton's CPU interpreter on the cases in a safetensors file.

Usage: ``TRITON_INTERPRET=1 python _run_moe_interpreted.py CASES OUT``. The interpreter is chosen when the
kernels are defined (at import), so it runs in its own process; the test compares the outputs. Each case
holds ``hidden``, ``ids``, ``weights`` and a fused ``gate_up`` ``[E, 2I, H]`` (w1 and w3 are its halves, as
strided views) and ``w2``; the outputs are the kernel's and ``grouped_moe``'s (which must pick the kernel).
"""

from __future__ import annotations

import sys

from safetensors.torch import load_file, save_file

from onboardlm.kernels.moe_decode import is_available, moe_decode
from onboardlm.transforms.moe_backend import grouped_moe


def main(cases_path: str, out_path: str) -> None:
    tensors = load_file(cases_path)
    names = sorted({key.split(".")[0] for key in tensors})
    outputs = {}
    for name in names:
        case = {key.split(".", 1)[1]: value for key, value in tensors.items() if key.startswith(name + ".")}
        inter = case["gate_up"].shape[1] // 2
        w1, w3 = case["gate_up"][:, :inter], case["gate_up"][:, inter:]
        assert is_available(case["hidden"], w1, case["w2"], w3), (
            "the kernels must run under TRITON_INTERPRET=1"
        )
        outputs[name] = moe_decode(case["hidden"], case["ids"], case["weights"], w1, case["w2"], w3)
        outputs[f"{name}.grouped"] = grouped_moe(
            case["hidden"], case["ids"], case["weights"], w1, case["w2"], w3
        )
    save_file(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
