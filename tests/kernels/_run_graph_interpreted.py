"""A tiny fp16 Llama's cached graph on the CPU, decoding through the interpreted Triton kernel and through SDPA.

Usage: ``TRITON_INTERPRET=1 python _run_graph_interpreted.py OUT``; writes both paths' logits of a
prefill and three decode steps, and how many times the kernel ran.
"""

from __future__ import annotations

import copy
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.testing.cached import prefill_then_decode, zero_caches
from onboardlm.transforms import fast_attention
from onboardlm.transforms.fast_attention import use_fast_attention

BATCH, PROMPT, STEPS = 2, 5, 3
CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=96,
)  # fmt: skip


def run(gm, graph, ids: torch.Tensor) -> torch.Tensor:
    return prefill_then_decode(gm, zero_caches(graph, BATCH, PROMPT + STEPS), ids, PROMPT)


def main(out_path: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model(dtype=torch.float16)
    graph = build_cached_graph(model)
    sdpa = copy.deepcopy(graph.gm)
    use_fast_attention(graph.gm)
    use_fast_attention(sdpa, decode_kernel_allowed=False)
    calls = []
    kernel = fast_attention.decode_kernel.decode_attention
    fast_attention.decode_kernel.decode_attention = lambda *a: calls.append(1) or kernel(*a)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT + STEPS))
    with torch.inference_mode():
        logits = {"kernel": run(graph.gm, graph, ids), "sdpa": run(sdpa, graph, ids)}
    logits["kernel_calls"] = torch.tensor(len(calls))
    save_file(logits, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
