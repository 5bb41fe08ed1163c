"""Runs the paged prefill kernel under Triton's CPU interpreter on the cases in a safetensors file.

Usage: ``TRITON_INTERPRET=1 python _run_prefill_interpreted.py CASES OUT``. For every case (options in
``CASES.json``): the step's keys/values written into the caches, then
:func:`onboardlm.kernels.paged_prefill.paged_prefill_attention` under each launch configuration
(``{case}.{config}``, ``[T, n_heads, d_v]``), and :func:`onboardlm.transforms.fast_paged.fast_paged_attention`
(``{case}.fast``, the op's layout) with the number of prefill and decode kernel calls it made
(``{case}.calls``: ``[prefill, decode]``).
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file

from onboardlm.kernels.paged_prefill import PrefillConfig, paged_prefill_attention
from onboardlm.ops.attention import to_bnsd
from onboardlm.transforms import fast_paged, paged_ops

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


def _counted(calls: list[int], index: int, kernel):  # noqa: ANN001, ANN202
    def run(*args: object) -> torch.Tensor:
        calls[index] += 1
        return kernel(*args)

    return run


def main(cases_path: str, out_path: str) -> None:
    tensors = load_file(cases_path)
    with open(cases_path + ".json") as handle:
        cases = json.load(handle)
    calls = [0, 0]
    fast_paged.paged_prefill.paged_prefill_attention = _counted(calls, 0, paged_prefill_attention)
    fast_paged.kernels.paged_decode_attention = _counted(calls, 1, fast_paged.kernels.paged_decode_attention)
    outputs = {}
    for name, case in cases.items():
        args = [tensors[f"{name}.{arg}"].clone() for arg in NAMES]
        query, key, value, k_cache, v_cache, slots, tables, starts, cached = args
        layout, scale, window = case["layout"], case["scale"], case["sliding_window"] or 0
        paged_ops.write_slots(k_cache, to_bnsd(key, layout)[0].transpose(0, 1), slots)
        paged_ops.write_slots(v_cache, to_bnsd(value, layout)[0].transpose(0, 1), slots)
        q = to_bnsd(query, layout)[0].transpose(0, 1).contiguous()  # [T, n, d]
        for label, config in case["configs"].items():
            outputs[f"{name}.{label}"] = paged_prefill_attention(
                q, k_cache, v_cache, tables, starts, cached, scale, window, PrefillConfig(**config)
            )
        calls[:] = [0, 0]
        fresh = [tensors[f"{name}.{arg}"].clone() for arg in NAMES]
        options = {k: case[k] for k in ("scale", "sliding_window", "layout")}
        outputs[f"{name}.fast"] = fast_paged.fast_paged_attention(*fresh, True, **options)
        outputs[f"{name}.calls"] = torch.tensor(calls)
    save_file(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
