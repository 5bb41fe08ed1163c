"""Runs ``onboardlm::decode_attention`` under Triton's CPU interpreter on the cases in a safetensors file.

Usage: ``TRITON_INTERPRET=1 python _run_interpreted.py CASES OUT``. The interpreter is chosen when the
kernels are defined (at import), so it runs in its own process; the test compares the outputs.
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import load_file, save_file

from onboardlm.kernels.decode_attention import decode_attention, is_available


def main(cases_path: str, out_path: str) -> None:
    tensors = load_file(cases_path)
    with open(cases_path + ".json") as handle:
        cases = json.load(handle)
    outputs = {}
    for name, case in cases.items():
        query = tensors[f"{name}.query"]
        assert is_available(query), "the kernel must run under TRITON_INTERPRET=1"
        caches = tensors[f"{name}.k_cache"].clone(), tensors[f"{name}.v_cache"].clone()
        outputs[name] = decode_attention(
            query, tensors[f"{name}.key"], tensors[f"{name}.value"], *caches, tensors[f"{name}.input_pos"],
            case["kv_len"], case["scale"], case["window"],
        )  # fmt: skip
        outputs[f"{name}.k_cache"], outputs[f"{name}.v_cache"] = caches
    save_file(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
