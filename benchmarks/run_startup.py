"""The user's path on a GPU: ``onboardlm run`` on a Llama-3-8B-shaped safetensors directory, timed from launch.

Run on a CUDA machine: ``PYTHONPATH=src python benchmarks/run_startup.py [--dir DIR]``. Writes a random
bf16 checkpoint of the 8B shape (with a word-level tokenizer of the same vocabulary size) into ``DIR``
unless one is there, then launches ``python -m onboardlm.cli run`` in fresh processes:

- twice with one new token: the wall time from launch to exit is the time to the first token (the first
  launch may fill the on-disk compile cache, the second finds it warm);
- once with 512 new tokens: the decode tokens/s that ``run`` prints, to compare with ``gpu.py``'s.

Each launch's ``timings`` line (load, export, warm-up, first token, decode) is kept. Writes
``run_startup_<gpu>.json`` under ``$OUT`` (else the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from onboardlm.testing.checkpoints import word_tokenizer

CONFIG = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192,
}  # fmt: skip
PROMPT = " ".join(f"w{i}" for i in range(7, 7 + 64))


def write_checkpoint(directory: Path) -> float:
    """A random bf16 8B-shaped checkpoint and tokenizer in ``directory``; returns the seconds it took."""
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if name.endswith("norm.weight") else param.normal_(0.0, 0.02)
    model.save_pretrained(directory, max_shard_size="5GB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CONFIG["vocab_size"])}}
    word_tokenizer(vocab).save_pretrained(directory)
    return time.perf_counter() - start


def launch(directory: Path, new_tokens: int) -> dict:
    command = [sys.executable, "-m", "onboardlm.cli", "run", "-m", str(directory), "--device", "cuda",
               "--dtype", "bfloat16", "--max-new-tokens", str(new_tokens), "-p", PROMPT]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if "timings" in ln), "")
    decode = re.search(r"decode ([\d.]+) tok/s", line)
    return {
        "new_tokens": new_tokens,
        "wall_s": wall,
        "returncode": done.returncode,
        "timings": line.strip(),
        "decode_tok_s": float(decode.group(1)) if decode else None,
        "stderr_tail": done.stderr[-1500:] if done.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/onboardlm-llama-8b"))
    args = parser.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    if not (args.dir / "config.json").exists():
        result["checkpoint_write_s"] = write_checkpoint(args.dir)
        torch.cuda.empty_cache()
    for new_tokens in (1, 1, 512):
        result["runs"].append(launch(args.dir, new_tokens))
        print(json.dumps(result["runs"][-1]), flush=True)
    result["first_token_from_launch_s"] = [r["wall_s"] for r in result["runs"][:2]]
    result["decode_tok_s"] = result["runs"][2]["decode_tok_s"]
    gpu = result["gpu"].replace(" ", "_").lower()
    out = Path(os.environ.get("OUT", "."))
    (out / f"run_startup_{gpu}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
