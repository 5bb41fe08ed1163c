"""CPU decode speed: onboardlm's cached graph vs transformers ``generate`` on SmolLM2-135M, same run.

Both sides get the same dequantised GGUF weights (fp32), the same chat-templated default prompts and
produce ``--new-tokens`` tokens per sequence without stopping at EOS, greedily. Decode throughput is
``batch * (new_tokens - 1) / (t(new_tokens) - t(1))``: the time of a full generation minus that of a
prefill-plus-one-token generation, so prompt processing is excluded. Each time is the median of
``--repeats`` interleaved runs (the machine may be shared), reported with its interquartile range.
Writes JSON (``--out``) and prints ratios.

    .venv/bin/python benchmarks/cpu_decode.py --out benchmarks/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from onboardlm.registry.atomic import atomic_write_text
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.chat import encode_chat_prompt
from onboardlm.runtime.engine import CachedModel
from onboardlm.runtime.prompts import default_prompts
from onboardlm.runtime.runner import DEFAULT_MODEL_ID, Runner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Timing, elapsed_ms  # noqa: E402  (benchmarks/timing.py)


def _transformers_model(runner: Runner) -> torch.nn.Module:
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(runner.config, dtype=torch.float32).eval()
    weights = {k: v for k, v in runner.graph.gm.state_dict().items() if "._ad_" not in k}
    model.load_state_dict(weights, strict=True)
    return model


def measure(runner: Runner, reference: torch.nn.Module, batch: int, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of both implementations for one batch size."""
    texts = (default_prompts() * batch)[:batch]
    prompts = [encode_chat_prompt(runner.tokenizer, text) for text in texts]
    width = max(len(p) for p in prompts)
    pad = runner.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cache = KVCache.allocate(runner.graph.caches, batch, width + new_tokens, "cpu")
    cached = CachedModel(runner.graph, cache, pad)

    def ours(n: int) -> Callable[[], object]:
        return lambda: cached.generate(prompts, max_new_tokens=n)

    def theirs(n: int) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return reference.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=pad,
                )  # fmt: skip

        return call

    ours(2)(), theirs(2)()  # warm-up
    runs: dict[str, dict[int, list[float]]] = {
        "onboardlm": {1: [], new_tokens: []},
        "transformers": {1: [], new_tokens: []},
    }
    for n in (1, new_tokens):
        for _ in range(repeats):  # interleave the two so a busy moment hits both alike
            for name, make in (("onboardlm", ours), ("transformers", theirs)):
                runs[name][n].append(elapsed_ms(make(n)))
    result = {"batch": batch, "prompt_tokens_max": width, "new_tokens": new_tokens}
    for name, by_length in runs.items():
        first, total = Timing.of(by_length[1]), Timing.of(by_length[new_tokens])
        result[name] = {
            "prefill_plus_1_s": round(first.median_ms / 1e3, 4),
            "prefill_plus_1_iqr_s": round(first.iqr_ms / 1e3, 4),
            "total_s": round(total.median_ms / 1e3, 4),
            "total_iqr_s": round(total.iqr_ms / 1e3, 4),
            "decode_tokens_per_s": round(
                batch * (new_tokens - 1) * 1e3 / (total.median_ms - first.median_ms), 2
            ),
        }
    result["ratio"] = round(
        result["onboardlm"]["decode_tokens_per_s"] / result["transformers"]["decode_tokens_per_s"], 3
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    settings = RunSettings(dtype="float32", device="cpu", max_batch_size=max(args.batches))
    runner = Runner.load(None, settings)
    reference = _transformers_model(runner)
    results = [measure(runner, reference, b, args.new_tokens, args.repeats) for b in args.batches]
    report = {
        "model": DEFAULT_MODEL_ID + " (shipped GGUF, dequantised to fp32)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "method": "decode tok/s = batch*(N-1)/(t(N)-t(1)), t the median of interleaved repeats (IQR beside it), "
        "greedy, no EOS stop",
        "results": results,
    }
    for r in results:
        print(
            f"batch {r['batch']}: onboardlm {r['onboardlm']['decode_tokens_per_s']} tok/s, "
            f"transformers {r['transformers']['decode_tokens_per_s']} tok/s, ratio {r['ratio']}x"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
