"""A tiny fp16 Llama served by the engine on the CPU, with and without the fast path (Triton paged kernels
under the interpreter, decode steps padded to decode batch sizes).

Usage: ``TRITON_INTERPRET=1 python _run_paged_engine_interpreted.py OUT``: writes each path's tokens per
request and how many times each kernel (decode, prefill) ran (JSON).
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.requests import GenerationRequest, RequestSampling
from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
from onboardlm.testing.checkpoints import word_tokenizer
from onboardlm.transforms import fast_paged

CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=60,
)  # fmt: skip


def main(out_path: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(CONFIG).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # peaked logits: no greedy ties
    model = model.to(torch.float16)
    vocab = {"<unk>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 60)}}
    calls: list[str] = []
    decode = fast_paged.kernels.paged_decode_attention
    fast_paged.kernels.paged_decode_attention = lambda *a: calls.append("decode") or decode(*a)
    prefill = fast_paged.paged_prefill.paged_prefill_attention
    fast_paged.paged_prefill.paged_prefill_attention = lambda *a: calls.append("prefill") or prefill(*a)
    settings = RunSettings(max_batch_size=4, max_seq_len=40, max_new_tokens=8, dtype="float16")
    answers = {}
    for fast in (False, True):
        options = ServeOptions(block_size=4, kv_cache_tokens=160, max_step_tokens=12, fast_path=fast)
        engine = engine_for_model(model, word_tokenizer(vocab), [], settings, options)
        out: dict[str, list[int]] = {}
        gen = torch.Generator().manual_seed(3)
        for i in range(6):  # requests join a running batch; prompts longer than a step are chunked
            prompt = torch.randint(2, 60, (3 + 3 * i,), generator=gen).tolist()
            request = GenerationRequest(f"r{i}", prompt, RequestSampling(max_tokens=6))
            engine.submit(request, lambda e, out=out: out.setdefault(e.request_id, []).extend(e.token_ids))
            engine.run_once()
        while engine.num_unfinished:
            engine.run_once()
        answers["fast" if fast else "reference"] = out
    answers["kernel_calls"] = {kind: calls.count(kind) for kind in ("decode", "prefill")}
    with open(out_path, "w") as handle:
        json.dump(answers, handle)


if __name__ == "__main__":
    main(sys.argv[1])
