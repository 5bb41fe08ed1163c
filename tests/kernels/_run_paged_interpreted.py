"""Runs :func:`onboardlm.transforms.fast_paged.fast_paged_attention` under Triton's CPU interpreter.

Usage: ``TRITON_INTERPRET=1 python _run_paged_interpreted.py CASES OUT``: every case of the safetensors
file (with its options in ``CASES.json``) through the paged kernel; writes the outputs and the caches.
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import load_file, save_file

from onboardlm.transforms.fast_paged import fast_paged_attention, kernel_runs

NAMES = (
    "query",
    "key",
    "value",
    "k_cache",
    "v_cache",
    "slot_mapping",
    "block_tables",
    "query_start",
    "cached_lens",
)


def main(cases_path: str, out_path: str) -> None:
    tensors = load_file(cases_path)
    with open(cases_path + ".json") as handle:
        cases = json.load(handle)
    outputs = {}
    for name, options in cases.items():
        args = [tensors[f"{name}.{arg}"].clone() for arg in NAMES]
        assert kernel_runs(args[0], True, None, None), "the kernel must run under TRITON_INTERPRET=1"
        outputs[name] = fast_paged_attention(*args, True, **options)
        outputs[f"{name}.k_cache"], outputs[f"{name}.v_cache"] = args[3], args[4]
    save_file(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
