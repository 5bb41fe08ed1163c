"""GPU benchmark: onboardlm's cached graph against transformers, same GPU, same random bf16 weights.

Run on a CUDA machine from the repository root: ``PYTHONPATH=src python benchmarks/gpu.py``. Writes
``gpu_<name>.json`` and ``.md`` under ``$OUT`` (else ``benchmarks/results``) and prints the table last.
Every section records its error and the run goes on. Shapes: Llama-3-8B, SmolLM2-135M and a
Qwen3-MoE with 128 experts (8 active) and fewer layers, and a Nemotron-H-8B-like hybrid (Mamba2, MLP and 4
attention layers; transformers runs its Mamba2 in PyTorch, as without the ``mamba_ssm`` package). Figures: prefill latency (1x2048, 8x512),
decode tokens/s at batch 1/8/64 (prompt 512, 128 new tokens), peak GPU memory, and the measured
roofline (bf16 matmul ceiling, copy bandwidth) to express each figure as a fraction of its limit.
Beside transformers: onboardlm with one part of its fast path off at a time (ablations), the plain
PyTorch static-cache + ``torch.compile`` + CUDA-graph model of ``plain_recipe.py``, and a profile of
the default path; on the 8B shape, the same path with its linears in FP8 (``--quantize fp8``: weights per
channel, activations per token, fused FP8 kernels) against bf16. ``--prefill-only`` measures prefill alone; ``--smoke`` runs tiny shapes on the CPU.
Timing (``benchmarks/timing.py``): roofline kernels and prefills through ``triton.testing.do_bench`` (on
the CPU ``torch.utils.benchmark.Timer``), stored as ``<figure>_ms`` (median) and ``<figure>_iqr_ms``;
decode figures from the median of ``--repeats`` timed whole runs (``total_iqr_ms``/``decode_iqr_ms``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig, NemotronHConfig, Qwen3MoeConfig
from transformers.initialization import no_init_weights

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.atomic import atomic_write_text
from onboardlm.runtime.cache import KVCache
from onboardlm.transforms import INPUT_POS, KV_LEN, LOGIT_INDEX, insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import FastGraph, SpeedOptions, accelerate
from onboardlm.transforms.quantize_fp8 import quantize_fp8_linears
from onboardlm.transforms.state_cache import SEQ_LENS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plain_recipe  # noqa: E402  (benchmarks/plain_recipe.py: the static-cache + compile baseline)
from timing import Timing, kernel_timing, run_timing  # noqa: E402  (benchmarks/timing.py)

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW_TOKENS, BATCHES = 512, 128, (1, 8, 64)
PREFILLS = ((1, 2048), (8, 512))
RECIPE_BATCHES = (1,)
REPEATS = 3  # whole generate calls / decode loops timed per figure (--repeats)
START = time.perf_counter()


class Device:
    """The device the benchmark runs on: CUDA, or the CPU for a smoke run of tiny shapes (``--smoke``)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def name(self) -> str:
        return torch.cuda.get_device_name() if self.cuda else "cpu-smoke"


DEV = Device("cuda")


def llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, **extra: Any) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096, **extra,
    )  # fmt: skip


def shapes(moe_layers: int, smoke: bool = False) -> dict[str, Any]:
    if smoke:  # tiny stand-ins of the same families, for a CPU run of every code path
        return {
            "small": llama(64, 2, 4, 2, 128, 256, tie_word_embeddings=True),
            "8b": llama(64, 2, 4, 2, 128, 256),
            "moe": Qwen3MoeConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                moe_intermediate_size=32,
                num_experts=8,
                num_experts_per_tok=2,
                vocab_size=256,
            ),  # fmt: skip
            "hybrid": nemotron_h(64, "M-M*-", 4, 16, 128, 256),
        }
    return {
        "small": llama(576, 30, 9, 3, 1536, 49152, tie_word_embeddings=True, rope_theta=100000.0),
        "8b": llama(4096, 32, 32, 8, 14336, 128256, rope_theta=500000.0),
        "moe": Qwen3MoeConfig(
            hidden_size=2048,
            num_hidden_layers=moe_layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
            max_position_embeddings=4096,
        ),  # fmt: skip
        "hybrid": nemotron_h(4096, "M-M-M-M*-" * 4 + "M-" * 8, 128, 64, 21504, 131072),
    }


def nemotron_h(hidden: int, pattern: str, mamba_heads: int, mamba_head_dim: int, inter: int, vocab: int):
    """A Nemotron-H layout: one block per layer (``M`` Mamba2, ``*`` attention, ``-`` MLP)."""
    heads = max(hidden // 128, 4)
    return NemotronHConfig(
        hidden_size=hidden, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern),
        num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=hidden // heads,
        mamba_num_heads=mamba_heads, mamba_head_dim=mamba_head_dim, ssm_state_size=128 if hidden > 64 else 16,
        n_groups=8 if hidden > 64 else 2, intermediate_size=inter, vocab_size=vocab, use_mamba_kernels=False,
        max_position_embeddings=4096,
    )  # fmt: skip


def elapsed() -> float:
    return time.perf_counter() - START


def log(message: str) -> None:
    print(f"[{elapsed():6.1f}s] {message}", flush=True)


def guarded(record: dict[str, Any], key: str, work: Callable[[], Any]) -> Any:
    """Run ``work``; store its result (or its error) under ``record[key]``."""
    try:
        record[key] = work()
    except Exception as error:  # noqa: BLE001  (the benchmark reports and goes on)
        record[key] = {"error": f"{type(error).__name__}: {error}"[:600]}
        log(f"{key} failed: {record[key]['error']}")
        traceback.print_exc()
        DEV.sync()
    return record[key]


def timed(record: dict[str, Any], key: str, work: Callable[[], Timing]) -> Any:
    """:func:`guarded` for a timing: its median under ``key`` (``<figure>_ms``), its interquartile range
    under ``<figure>_iqr_ms``; returns the median (or the error record)."""
    timing = guarded(record, key, work)
    if isinstance(timing, Timing):
        record[key], record[key.removesuffix("_ms") + "_iqr_ms"] = timing.median_ms, timing.iqr_ms
    return record[key]


def roofline() -> dict[str, float]:
    n = 8192 if DEV.cuda else 256
    a, b = (torch.randn(n, n, device=DEV.device, dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(1 << (30 if DEV.cuda else 20), device=DEV.device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    result: dict[str, float] = {}
    mm = timed(result, "matmul_ms", lambda: kernel_timing(lambda: a @ b, DEV.device))
    copy_ms = timed(result, "copy_ms", lambda: kernel_timing(lambda: dst.copy_(src), DEV.device))
    return {"matmul_tflops": 2 * n**3 / mm / 1e9, "copy_gb_s": 2 * src.numel() * 2 / copy_ms / 1e6, **result}


def randomize(model: torch.nn.Module) -> None:
    gen = torch.Generator(device=DEV.device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def weight_bytes(config: Any, model: torch.nn.Module) -> tuple[int, int]:
    """Bytes a batch-1 decode step must read (active weights, no embedding table) and non-embedding params."""
    total = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if getattr(config, "tie_word_embeddings", False):
        total += config.vocab_size * config.hidden_size
    active = total
    if hasattr(config, "num_experts"):
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        active -= config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    return active * 2, total


def prefill_flops(config: Any, params: int, batch: int, seq: int) -> float:
    head = config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dense = params - head
    if hasattr(config, "num_experts"):  # only top-k experts run per token
        per_expert = 3 * config.hidden_size * config.moe_intermediate_size
        dense -= config.num_hidden_layers * (config.num_experts - config.num_experts_per_tok) * per_expert
    kinds = getattr(config, "layer_types", None)  # a hybrid's attention layers only
    layers = (
        config.num_hidden_layers
        if kinds is None
        else sum(k in ("attention", "full_attention") for k in kinds)
    )
    attention = 2 * layers * config.num_attention_heads * head_dim * seq * seq  # causal
    return 2.0 * dense * batch * seq + 2.0 * head * batch + attention * batch


# ---------------------------------------------------------------- transformers
def hf_prefill(model: torch.nn.Module, batch: int, seq: int, vocab: int) -> Timing:
    ids = torch.randint(0, vocab, (batch, seq), device=DEV.device)
    with torch.inference_mode():
        return kernel_timing(lambda: model(ids, logits_to_keep=1, use_cache=True), DEV.device, min_run_s=1.0)


def hf_decode(model: torch.nn.Module, batch: int, vocab: int, prefill_ms: float, **kwargs: Any) -> dict:
    """Whole ``generate`` calls, timed :data:`REPEATS` times; decode time = median total - prefill."""
    ids = torch.randint(0, vocab, (batch, PROMPT), device=DEV.device, generator=torch_gen())
    args = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    last: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        model.generate(ids, **{**args, "max_new_tokens": 4, "min_new_tokens": 4})
        DEV.reset_peak()
        total = run_timing(lambda: last.update(out=model.generate(ids, **args)), REPEATS)
    decode_ms = max(total.median_ms - prefill_ms, 1e-3)
    return {
        "total_ms": total.median_ms,
        "total_iqr_ms": total.iqr_ms,
        "tok_s": batch * (NEW_TOKENS - 1) / decode_ms * 1e3,
        "peak_gib": DEV.peak_gib(),
        "tokens": last["out"][0, PROMPT : PROMPT + 64].tolist(),
    }


def torch_gen() -> torch.Generator:
    return torch.Generator(device=DEV.device).manual_seed(1)


# ---------------------------------------------------------------- onboardlm
def allocate_cache(specs: Any, max_batch: int, max_seq: int, device: str) -> dict[str, torch.Tensor]:
    """Zeroed KV caches and (hybrids) per-row state caches, as ``onboardlm run`` allocates them."""
    return KVCache.allocate(specs, max_batch, max_seq, device).tensors


def cached_graph(model: torch.nn.Module, shard: Callable[[GraphModule], object] | None = None) -> Any:
    """The ``onboardlm run`` graph: export, (``shard`` for tensor parallelism), KV cache, logit gather,
    direct kernels."""
    ids = torch.zeros(2, 8, dtype=torch.long, device=DEV.device)
    positions = torch.arange(8, device=DEV.device).expand(2, 8)
    gm = torch_export_to_gm(
        model, kwargs={"input_ids": ids, "position_ids": positions}, dynamic_shapes=causal_lm_dynamic_shapes()
    )
    if shard is not None:
        shard(gm)
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    return cached


def run_graph(fast: FastGraph, ids: torch.Tensor, start: torch.Tensor, last: torch.Tensor, kv_len: int):
    positions = start[:, None] + torch.arange(ids.shape[1], device=DEV.device)
    inputs = {INPUT_POS: start, KV_LEN: kv_len, LOGIT_INDEX: last}
    if fast.has_state:  # every row's tokens are real (no padding)
        inputs[SEQ_LENS] = torch.full_like(start, ids.shape[1])
    return fast(input_ids=ids, position_ids=positions, **inputs, **fast.cache)[:, -1]


def ours_prefill(fast: FastGraph, batch: int, seq: int, vocab: int) -> Timing:
    ids = torch.randint(0, vocab, (batch, seq), device=DEV.device)
    zero = torch.zeros(batch, dtype=torch.long, device=DEV.device)
    with torch.inference_mode():
        return kernel_timing(
            lambda: run_graph(fast, ids, zero, zero + seq - 1, seq), DEV.device, min_run_s=1.0
        )


def ours_decode(fast: FastGraph, batch: int, vocab: int) -> dict:
    """The ``NEW_TOKENS - 1`` greedy decode steps after one prefill, timed :data:`REPEATS` times (each
    repeat recomputes the same steps over the same cache positions)."""
    ids = torch.randint(0, vocab, (batch, PROMPT), device=DEV.device, generator=torch_gen())
    zero = torch.zeros(batch, dtype=torch.long, device=DEV.device)

    def prefill() -> torch.Tensor:
        return run_graph(fast, ids, zero, zero + PROMPT - 1, PROMPT).argmax(-1)

    def decode(first: torch.Tensor, steps: int) -> list[torch.Tensor]:
        tokens = [first]
        for i in range(steps - 1):
            tokens.append(
                run_graph(fast, tokens[-1][:, None], zero + PROMPT + i, zero, PROMPT + i + 1).argmax(-1)
            )
        return tokens

    last: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        decode(prefill(), 4)
        DEV.reset_peak()
        first = prefill()
        timing = run_timing(lambda: last.update(tokens=decode(first, NEW_TOKENS)), REPEATS)
    return {
        "decode_ms": timing.median_ms,
        "decode_iqr_ms": timing.iqr_ms,
        "tok_s": batch * (NEW_TOKENS - 1) / timing.median_ms * 1e3,
        "peak_gib": DEV.peak_gib(),
        "tokens": [int(t[0]) for t in last["tokens"][:64]],
    }


def lean_model(name: str, config: Any, hf: torch.nn.Module) -> torch.nn.Module:
    """The lean model sharing ``hf``'s weight tensors (``assign``; fused experts are unpacked as views)."""
    config = copy.deepcopy(config)
    if name == "moe":
        sys.path.insert(0, str(ROOT / "tests" / "compat"))
        import autodeploy_shim as shim  # noqa: PLC0415  (test-only AD-style model file)

        with shim.autodeploy_imports(ROOT / "tests" / "compat"):
            module = shim.load_model_file("ad_style_qwen3_moe")
            with torch.device(DEV.device), no_init_weights():
                model = module.Qwen3MoeForCausalLM(config)
    else:
        model = AutoModelForCausalLMFactory(config).build_model(
            DEV.device, torch.bfloat16, init_weights=False
        )
    model.load_state_dict(hf.state_dict(), strict=True, assign=True)
    return model.eval()


def bench_shape(
    name: str, config: Any, rec: dict[str, Any], save: Callable[[], None]
) -> list[Callable[[], None]]:
    """Measure transformers and onboardlm on one shape into ``rec``; returns the optional (compile) runs."""
    rec.update({"hf": {}, "ours_compiled": {}, "plain_recipe": {}, "hf_static_compile": {}})
    rec["hf_attention"] = "sdpa"
    with torch.device(DEV.device), no_init_weights():
        try:
            hf = AutoModelForCausalLM.from_config(
                copy.deepcopy(config), dtype=torch.bfloat16, attn_implementation="sdpa"
            ).eval()
        except ValueError:  # no SDPA path for this architecture (Nemotron-H): its own attention
            rec["hf_attention"] = "eager"
            hf = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16).eval()
    randomize(hf)
    active_bytes, params = weight_bytes(config, hf)
    rec["active_weight_gb"], rec["params"] = active_bytes / 1e9, params
    rec["prefill_gflop"] = {f"{b}x{s}": prefill_flops(config, params, b, s) / 1e9 for b, s in PREFILLS}
    vocab = config.vocab_size
    log(f"{name}: transformers built ({params / 1e9:.2f} B non-embedding params)")
    for b, s in PREFILLS:
        timed(rec["hf"], f"prefill_{b}x{s}_ms", lambda b=b, s=s: hf_prefill(hf, b, s, vocab))
    for b in BATCHES:
        pre = rec["hf"].get(f"prefill_{b}x{PROMPT}_ms")
        if not isinstance(pre, float):
            pre = timed(rec["hf"], f"prefill_{b}x{PROMPT}_ms", lambda b=b: hf_prefill(hf, b, PROMPT, vocab))
        guarded(rec["hf"], f"decode_bs{b}", lambda b=b, pre=pre: hf_decode(hf, b, vocab, pre))
        log(f"{name}: transformers bs{b} {short(rec['hf'][f'decode_bs{b}'])}")
    save()
    lean = lean_model(name, config, hf)
    cached = cached_graph(lean)
    log(f"{name}: exported")
    cache = allocate_cache(cached.caches, max(BATCHES, default=1), PROMPT + NEW_TOKENS, DEV.device)
    longest = max(b for b, _ in PREFILLS), max(s for _, s in PREFILLS)  # its own cache: decode reads less
    prefill_cache = allocate_cache(cached.caches, *longest, DEV.device)
    for key, options in variants(name).items():
        batches = options.batch_sizes
        rec[key] = {"options": vars(options)}
        t0 = time.perf_counter()
        gm = copy_graph(cached.gm)  # the passes rewrite a graph in place; each variant gets its own
        prefill = accelerate(gm, prefill_cache, replace(options, cuda_graphs=False))
        for b, s in PREFILLS:
            timed(rec[key], f"prefill_{b}x{s}_ms", lambda b=b, s=s, p=prefill: ours_prefill(p, b, s, vocab))
        rec[key]["prefill_capture"] = {
            "captured": prefill.report.prefill_captured,
            "skipped": prefill.report.prefill_skipped,
        }
        fast = accelerate(gm, cache, options)
        rec[key]["capture"] = vars(fast.report)
        for b in batches:
            guarded(rec[key], f"decode_bs{b}", lambda b=b, f=fast: ours_decode(f, b, vocab))
            log(f"{name}: {key} bs{b} {short(rec[key][f'decode_bs{b}'])}")
        rec[key]["wall_s"] = time.perf_counter() - t0
        del gm, prefill, fast
        DEV.empty_cache()
        save()
    if name == "8b":
        guarded(rec, "ours_fp8", lambda p=prefill_cache: bench_fp8(lean, cache, p, vocab))
        log(f"{name}: fp8 {short(rec['ours_fp8'])}")
        DEV.empty_cache()
        save()
    del prefill_cache
    tokens = rec["ours"].get("decode_bs1", {}).get("tokens")

    def ours_compiled() -> None:
        t0 = time.perf_counter()
        compiled = accelerate(copy_graph(cached.gm), cache, SpeedOptions(compile=True, batch_sizes=(1,)))
        rec["ours_compiled"]["capture"] = vars(compiled.report)
        rec["ours_compiled"]["compile_s"] = time.perf_counter() - t0
        done = guarded(rec["ours_compiled"], "decode_bs1", lambda: ours_decode(compiled, 1, vocab))
        rec["ours_compiled"]["same_tokens_as_fused"] = done.get("tokens") == tokens
        log(f"{name}: onboardlm whole-graph compiled bs1 {short(done)}")

    def recipe() -> None:
        measure = plain_recipe.measure_decode
        for b in RECIPE_BATCHES:
            run = lambda b=b: measure(hf, config, b, PROMPT, NEW_TOKENS, DEV.device, repeats=REPEATS)  # noqa: E731
            guarded(rec["plain_recipe"], f"decode_bs{b}", run)
            log(f"{name}: plain PyTorch recipe bs{b} {short(rec['plain_recipe'][f'decode_bs{b}'])}")

    def hf_compiled() -> None:
        guarded(rec, "hf_static_compile", lambda: hf_static_compile(hf, vocab, rec["hf"]))
        log(f"{name}: transformers static cache + compile bs1 {short(rec['hf_static_compile'])}")

    def profiled() -> None:
        guarded(rec, "profile", lambda: profile(name, cached.gm, vocab, cached.caches))

    if name == "8b":
        return [recipe, profiled, ours_compiled, hf_compiled]
    return [profiled] if name == "moe" else []


def bench_fp8(
    lean: torch.nn.Module, cache: dict[str, torch.Tensor], prefill_cache: dict[str, torch.Tensor], vocab: int
) -> dict[str, Any]:
    """The default path with the decoder linears in FP8, as ``--quantize fp8`` runs them (weights per
    channel, activations per token; ``fuse_fp8`` swaps in the FP8 kernels): prefill shapes, decode bs1.
    Its own export of the lean model: quantisation replaces the graph's weight tensors, not the model's."""
    part: dict[str, Any] = {}
    t0 = time.perf_counter()
    fp8 = cached_graph(lean, quantize_fp8_linears)
    options = SpeedOptions(batch_sizes=(1,))
    prefill = accelerate(fp8.gm, prefill_cache, replace(options, cuda_graphs=False))
    for b, s in PREFILLS:
        timed(part, f"prefill_{b}x{s}_ms", lambda b=b, s=s: ours_prefill(prefill, b, s, vocab))
    fast = accelerate(fp8.gm, cache, options)
    part["capture"] = vars(fast.report)
    guarded(part, "decode_bs1", lambda: ours_decode(fast, 1, vocab))
    part["weight_gb"] = sum(t.numel() * t.element_size() for t in fp8.gm.state_dict().values()) / 1e9
    part["wall_s"] = time.perf_counter() - t0
    return part


def variants(name: str) -> dict[str, SpeedOptions]:
    """onboardlm's default fast path and, at batch 1, the same with one part turned off (the MoE kernel
    only on the MoE shape; the hybrid shape measures the default path alone)."""
    if not BATCHES:  # --prefill-only
        return {"ours": SpeedOptions(batch_sizes=())}
    if name == "hybrid":
        return {"ours": SpeedOptions(batch_sizes=BATCHES)}
    kernel_batches = tuple(b for b in (1, 8) if b in BATCHES)  # the batches the kernel serves, as measured
    moe = (
        {"ours_no_moe_kernel": SpeedOptions(moe_kernel=False, batch_sizes=kernel_batches)}
        if name == "moe"
        else {}
    )
    return {
        **moe,
        "ours": SpeedOptions(batch_sizes=BATCHES),
        "ours_no_prefill_graphs": SpeedOptions(prefill_graphs=False, batch_sizes=(1,)),
        "ours_no_decode_kernel": SpeedOptions(decode_kernel=False, batch_sizes=(1,)),
        "ours_no_linear_fusion": SpeedOptions(fuse_linears=False, batch_sizes=(1,)),
        "ours_unfused": SpeedOptions(fuse=False, fuse_linears=False, batch_sizes=(1,)),
    }


def copy_graph(gm: GraphModule) -> GraphModule:
    """A graph of its own over the same weight tensors."""
    return GraphModule(gm, copy.deepcopy(gm.graph))


def short(entry: Any) -> Any:
    return {k: v for k, v in entry.items() if k != "tokens"} if isinstance(entry, dict) else entry


def hf_static_compile(hf: torch.nn.Module, vocab: int, eager: dict) -> dict:
    """transformers' static cache; ``generate`` then compiles its decode step itself (CUDA graphs included).

    (Wrapping ``forward`` in ``torch.compile(mode="reduce-overhead")`` by hand fails inside ``generate``
    on torch 2.11 / transformers 5.17: "accessing tensor output of CUDAGraphs that has been overwritten".)
    """
    t0 = time.perf_counter()
    pre = eager.get(f"prefill_1x{PROMPT}_ms", 0.0)
    result = hf_decode(hf, 1, vocab, pre, cache_implementation="static")
    result["wall_s_with_compile"] = time.perf_counter() - t0
    result["compiled_by_generate"] = hasattr(hf, "_compiled_call") and hf._compiled_call is not None
    return result


def profile(name: str, gm: Any, vocab: int, specs: Any) -> dict:
    """torch.profiler top CUDA ops of a 1x2048 prefill and of an uncaptured bs1 decode step (default path),
    written to ``profile_<name>.txt``; returns each case's total GPU kernel time."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile  # noqa: PLC0415

    tables, gpu_ms = {}, {}
    fast = accelerate(
        copy_graph(gm), allocate_cache(specs, 1, 2048, DEV.device), SpeedOptions(cuda_graphs=False)
    )
    ids = torch.randint(0, vocab, (1, 2048), device=DEV.device)
    zero = torch.zeros(1, dtype=torch.long, device=DEV.device)
    cases = {
        "prefill_1x2048": lambda: run_graph(fast, ids, zero, zero + 2047, 2048),
        "decode_bs1_uncaptured_kv640": lambda: run_graph(fast, ids[:, :1], zero + 600, zero, 640),
    }
    with torch.inference_mode():
        for case, fn in cases.items():
            fn()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                DEV.sync()
            events = prof.key_averages()
            tables[case] = events.table(sort_by="self_cuda_time_total", row_limit=30)
            gpu_ms[case] = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"profile_{name}.txt", "\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))
    return {"written": f"profile_{name}.txt", "gpu_kernel_ms": gpu_ms}


# ---------------------------------------------------------------- report
def ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def tok_s(section: dict, b: int) -> float | None:
    entry = section.get(f"decode_bs{b}")
    return entry.get("tok_s") if isinstance(entry, dict) else None


def summarize(result: dict) -> dict:
    roof = result.get("roofline", {})
    big = result["shapes"].get("8b", {})
    hf, ours = big.get("hf", {}), big.get("ours", {})
    summary: dict[str, Any] = {"gpu": result["gpu"]}
    summary["decode_bs1_8b_tok_s"] = tok_s(ours, 1)
    summary["decode_bs1_8b_ratio_vs_hf"] = ratio(tok_s(ours, 1), tok_s(hf, 1))
    summary["decode_bs1_8b_compiled_tok_s"] = tok_s(big.get("ours_compiled", {}), 1)
    recipe = tok_s(big.get("plain_recipe", {}), 1)
    summary["decode_bs1_8b_plain_recipe_tok_s"] = recipe
    summary["decode_bs1_8b_ratio_vs_plain_recipe"] = ratio(tok_s(ours, 1), recipe)
    summary["decode_bs1_8b_hf_static_compile_tok_s"] = (big.get("hf_static_compile") or {}).get("tok_s")
    hf_pre, ours_pre = hf.get("prefill_1x2048_ms"), ours.get("prefill_1x2048_ms")
    summary["prefill_1x2048_8b_ms"] = ours_pre
    summary["prefill_1x2048_8b_ratio_vs_hf"] = ratio(hf_pre, ours_pre)
    gflop = big.get("prefill_gflop", {}).get("1x2048")
    if isinstance(ours_pre, float) and "matmul_tflops" in roof and gflop:
        tflops = gflop / ours_pre
        summary["prefill_1x2048_8b_tflops"] = tflops
        summary["prefill_1x2048_8b_fraction_of_ceiling"] = tflops / roof["matmul_tflops"]
    summary["decode_bs64_8b_ratio_vs_hf"] = ratio(tok_s(ours, 64), tok_s(hf, 64))
    fp8 = big.get("ours_fp8") or {}
    summary["decode_bs1_8b_fp8_tok_s"] = tok_s(fp8, 1)
    summary["decode_bs1_8b_fp8_ratio_vs_bf16"] = ratio(tok_s(fp8, 1), tok_s(ours, 1))
    summary["prefill_1x2048_8b_fp8_ms"] = fp8.get("prefill_1x2048_ms")
    summary["prefill_1x2048_8b_fp8_ratio_vs_bf16"] = ratio(ours_pre, fp8.get("prefill_1x2048_ms"))
    if "copy_gb_s" in roof and "active_weight_gb" in big:
        bound = roof["copy_gb_s"] / big["active_weight_gb"]
        summary["decode_bs1_8b_bound_tok_s"] = bound
        summary["decode_bs1_8b_fraction_of_bound"] = ratio(summary["decode_bs1_8b_tok_s"], bound)
        summary["decode_bs1_8b_plain_recipe_fraction_of_bound"] = ratio(recipe, bound)
    small = result["shapes"].get("small", {})
    for b, s in ((1, 2048), (8, 512)):
        key = f"prefill_{b}x{s}_ms"
        theirs, mine = small.get("hf", {}).get(key), small.get("ours", {}).get(key)
        summary[f"prefill_{b}x{s}_small_ratio_vs_hf"] = ratio(theirs, mine)
        summary[f"prefill_{b}x{s}_small_iqr_ms"] = small.get("ours", {}).get(f"prefill_{b}x{s}_iqr_ms")
        unfused = small.get("ours_no_prefill_graphs", {}).get(key)
        summary[f"prefill_{b}x{s}_small_ratio_vs_uncaptured"] = ratio(unfused, mine)
    moe = result["shapes"].get("moe", {})
    if "copy_gb_s" in roof and "active_weight_gb" in moe:
        bound = roof["copy_gb_s"] / moe["active_weight_gb"]
        summary["decode_bs1_moe_bound_tok_s"] = bound
        summary["decode_bs1_moe_fraction_of_bound"] = ratio(tok_s(moe.get("ours", {}), 1), bound)
    for b in BATCHES:
        summary[f"decode_bs{b}_moe_ratio_vs_hf"] = ratio(
            tok_s(moe.get("ours", {}), b), tok_s(moe.get("hf", {}), b)
        )
    hybrid = result["shapes"].get("hybrid", {})
    for b in BATCHES:
        theirs, mine = tok_s(hybrid.get("hf", {}), b), tok_s(hybrid.get("ours", {}), b)
        summary[f"decode_bs{b}_hybrid_tok_s"] = mine
        summary[f"decode_bs{b}_hybrid_ratio_vs_hf"] = ratio(mine, theirs)
    return summary


#: Variants with one part of the fast path off, as the table names them.
ABLATIONS = {
    "ours_no_moe_kernel": "without the Triton MoE decode kernels",
    "ours_no_prefill_graphs": "without CUDA-graph prefill",
    "ours_no_decode_kernel": "without the Triton decode kernel (SDPA)",
    "ours_no_linear_fusion": "without q/k/v and gate/up GEMM fusion",
    "ours_unfused": "without any fusion (elementwise or GEMM)",
}


def fmt(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else "-" if x is None else "err"


def markdown(result: dict) -> str:
    roof = result.get("roofline", {})
    lines = [
        f"# GPU benchmark: {result['gpu']} (torch {result['torch']}, transformers {result['transformers']})",
        "",
        f"Measured ceilings: bf16 matmul {fmt(roof.get('matmul_tflops'))} TFLOP/s, "
        f"copy {fmt(roof.get('copy_gb_s'), 0)} GB/s (read + write).",
        "",
        "| shape | metric | onboardlm | transformers (sdpa) | ratio | of limit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, rec in result["shapes"].items():
        hf, ours = rec.get("hf", {}), rec.get("ours", {})
        if "error" in rec:
            lines.append(f"| {name} | error | {rec['error'][:80]} | | | |")
            continue
        for b, s in PREFILLS:
            key = f"prefill_{b}x{s}_ms"
            o, h = ours.get(key), hf.get(key)
            frac = None
            gflop = rec.get("prefill_gflop", {}).get(f"{b}x{s}")
            if isinstance(o, float) and gflop and "matmul_tflops" in roof:
                frac = gflop / o / roof["matmul_tflops"]
            lines.append(
                f"| {name} | prefill {b}x{s} ms | {fmt(o, 2)} | {fmt(h, 2)} | {fmt(ratio(h, o), 2)}x "
                f"| {fmt(frac and 100 * frac)}% |"
            )
        for b in BATCHES:
            o, h = tok_s(ours, b), tok_s(hf, b)
            bound = roof.get("copy_gb_s", 0) / rec["active_weight_gb"] if "active_weight_gb" in rec else 0
            frac = 100 * o / bound if b == 1 and isinstance(o, float) and bound else None
            lines.append(
                f"| {name} | decode bs{b} tok/s | {fmt(o)} | {fmt(h)} | {fmt(ratio(o, h), 2)}x | "
                f"{fmt(frac)}{'%' if frac else ''} |"
            )
        b, s = PREFILLS[0]
        for key, label in ABLATIONS.items():
            if key not in rec:
                continue
            part = rec[key]
            lines.append(
                f"| {name} | {label}: prefill {b}x{s} ms / decode bs1 tok/s "
                f"| {fmt(part.get(f'prefill_{b}x{s}_ms'), 2)} / {fmt(tok_s(part, 1))} | | | |"
            )
        fp8 = rec.get("ours_fp8")
        if isinstance(fp8, dict):
            for b, s in PREFILLS:
                key = f"prefill_{b}x{s}_ms"
                o, bf = fp8.get(key), ours.get(key)
                lines.append(
                    f"| {name} | FP8 prefill {b}x{s} ms | {fmt(o, 2)} | {fmt(bf, 2)} (onboardlm bf16) "
                    f"| {fmt(ratio(bf, o), 2)}x vs bf16 | |"
                )
            o, bf = tok_s(fp8, 1), tok_s(ours, 1)
            lines.append(
                f"| {name} | FP8 decode bs1 tok/s | {fmt(o)} | {fmt(bf)} (onboardlm bf16) "
                f"| {fmt(ratio(o, bf), 2)}x vs bf16 | |"
            )
        recipe = rec.get("plain_recipe", {})
        for b in RECIPE_BATCHES:
            o, r = tok_s(ours, b), tok_s(recipe, b)
            if r is not None:
                lines.append(
                    f"| {name} | decode bs{b} tok/s vs plain PyTorch recipe | {fmt(o)} | {fmt(r)} (recipe) "
                    f"| {fmt(ratio(o, r), 2)}x | |"
                )
        comp, stat = tok_s(rec.get("ours_compiled", {}), 1), (rec.get("hf_static_compile") or {}).get("tok_s")
        lines.append(
            f"| {name} | decode bs1 tok/s, compiled | {fmt(comp)} | {fmt(stat)} (static+compile) | | |"
        )
        peaks = [
            (side, rec.get(side, {}).get(f"decode_bs{max(BATCHES, default=1)}", {}))
            for side in ("ours", "hf")
        ]
        peak_text = [fmt(p.get("peak_gib"), 2) if isinstance(p, dict) else "-" for _, p in peaks]
        lines.append(f"| {name} | peak GiB (decode bs64) | {peak_text[0]} | {peak_text[1]} | | |")
    lines += ["", "Summary: `" + json.dumps(result["summary"]) + "`", ""]
    return "\n".join(lines)


def greedy_divergence(rec: dict[str, Any]) -> None:
    """First step where onboardlm's bs1 greedy tokens differ from transformers' (None: all 64 agree)."""
    ours, hf = rec.get("ours", {}).get("decode_bs1", {}), rec.get("hf", {}).get("decode_bs1", {})
    if isinstance(ours, dict) and isinstance(hf, dict) and "tokens" in ours and "tokens" in hf:
        same = [a == b for a, b in zip(ours["tokens"], hf["tokens"], strict=False)]
        rec["greedy_bs1_first_divergence"] = same.index(False) if False in same else None


def main() -> None:
    global DEV, PROMPT, NEW_TOKENS, BATCHES, PREFILLS, REPEATS  # noqa: PLW0603
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8b,small,moe,hybrid")
    parser.add_argument("--tag", default="", help="suffix of the result files' names (a partial run)")
    parser.add_argument("--moe-layers", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=240.0, help="no compile run starts after this")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code paths")
    parser.add_argument("--prefill-only", action="store_true", help="prefill of the default path only")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per decode figure")
    args = parser.parse_args()
    REPEATS = args.repeats
    if args.smoke:
        DEV, PROMPT, NEW_TOKENS, BATCHES, PREFILLS = Device("cpu"), 16, 8, (1, 2), ((1, 32), (2, 16))
    if args.prefill_only:
        BATCHES, args.no_compile = (), True
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    result: dict[str, Any] = {
        "gpu": DEV.name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "shapes": {},
    }
    guarded(result, "roofline", roofline)
    log(f"roofline {result['roofline']}")
    configs = shapes(args.moe_layers, args.smoke)
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + result["gpu"].replace(" ", "_").lower() + (f"_{args.tag}" if args.tag else "")

    def save() -> None:
        result["summary"] = summarize(result)
        result["wall_s"] = elapsed()
        atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1, default=str))
        atomic_write_text(out / f"{stem}.md", markdown(result))

    later: list[Callable[[], None]] = []
    for name in args.shapes.split(","):
        rec = result["shapes"][name] = {}
        try:
            later += bench_shape(name, configs[name], rec, save)
        except Exception as error:  # noqa: BLE001  (the benchmark reports and goes on)
            rec["error"] = f"{type(error).__name__}: {error}"[:600]
            traceback.print_exc()
        greedy_divergence(rec)
        DEV.empty_cache()
        save()
    for run in later:  # compile runs last: they take minutes
        if args.no_compile or elapsed() > args.budget_s:
            log(f"skipped {run.__name__}: time budget ({args.budget_s} s) or --no-compile")
            continue
        try:
            run()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        save()
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
