"""Serving benchmark: one fixed synthetic workload through three systems, same model, weights and requests.

Workload (fixed seed): Poisson arrivals at ``--rate`` requests/s, prompt lengths and output lengths drawn
uniformly from ``--prompt-len`` and ``--output-len``, prompts as random token ids; every request produces
exactly its output length (EOS ignored), greedily. At each concurrency level (``--concurrency``, at most
that many requests in flight; ``--requests`` requests, default max(8, concurrency)):

- ``onboardlm serve``: the app and engine in this process (the model loaded once, shared with the other
  two), the client in a separate process sending streaming ``/v1/completions`` over HTTP on 127.0.0.1;
- ``transformers CB``: transformers' continuous batching (``init_continuous_batching``, paged attention)
  on the same weights, fed the same arrivals;
- ``onboardlm run (static)``: the dense cached graph of ``onboardlm run`` in static batches of
  ``concurrency`` requests, a batch starting when its requests have arrived and the previous one ended.

Figures per system and level: output tokens/s (all output tokens over first arrival to last token),
TTFT (request issued to its first token) and TPOT (mean gap between its tokens) p50/p99.

    .venv/bin/python benchmarks/serve.py --out benchmarks/results/serve_cpu.json            # SmolLM2, CPU
    .venv/bin/python benchmarks/serve.py --model llama --llama3-8b --device cuda --dtype bfloat16 \\
        --out benchmarks/results/serve_gpu.json                                              # random 8B shape
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

#: The Llama-3-8B shape (random weights) of the GPU run.
LLAMA3_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
}  # fmt: skip


SYSTEMS = {"serve": "onboardlm serve", "transformers": "transformers CB", "static": "onboardlm run (static)"}


@dataclass(frozen=True)
class Request:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Sample:
    issued: float  # seconds after the start; times below are too
    token_times: list[float]

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.issued

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def workload(
    n: int, rate: float, seed: int, vocab: int, prompt_len: tuple[int, int], output_len: tuple[int, int]
):
    gen = torch.Generator().manual_seed(seed)
    gaps = torch.empty(n).exponential_(rate, generator=gen) if rate > 0 else torch.zeros(n)
    arrivals = (gaps.cumsum(0) - gaps[0]).tolist()
    requests = []
    for arrival in arrivals:
        length = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=gen))
        out = int(torch.randint(output_len[0], output_len[1] + 1, (1,), generator=gen))
        prompt = torch.randint(10, vocab - 10, (length,), generator=gen).tolist()
        requests.append(Request(arrival, prompt, out))
    return requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(samples: list[Sample], requests: list[Request]) -> dict:
    tokens = sum(len(s.token_times) for s in samples)
    assert tokens == sum(r.max_tokens for r in requests), "a system produced the wrong number of tokens"
    span = max(s.token_times[-1] for s in samples) - min(r.arrival for r in requests)
    ttft = [s.ttft * 1e3 for s in samples]
    tpot = [s.tpot * 1e3 for s in samples if s.tpot is not None]
    return {
        "output_tok_s": tokens / span, "seconds": span, "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p99": percentile(ttft, 99), "tpot_ms_p50": percentile(tpot, 50) if tpot else None,
        "tpot_ms_p99": percentile(tpot, 99) if tpot else None,
    }  # fmt: skip


# -- onboardlm serve: the HTTP client runs in its own process ----------------------------------------------


async def _client(url: str, model: str, requests: list[Request], concurrency: int) -> list[Sample]:
    try:
        import httpx2 as httpx
    except ImportError:  # the older name of the same client
        import httpx

    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def one(client: httpx.AsyncClient, request: Request) -> Sample:
        await asyncio.sleep(max(0.0, request.arrival - (time.perf_counter() - start)))
        async with gate:
            issued = time.perf_counter() - start
            body = {
                "model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "return_token_ids": True,
            }  # fmt: skip
            times: list[float] = []
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        now = time.perf_counter() - start
                        times += [now] * len(json.loads(line[6:])["choices"][0]["token_ids"])
            return Sample(issued, times)

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        return await asyncio.gather(*(one(client, r) for r in requests))


def run_client_process(args: argparse.Namespace) -> None:
    requests = [Request(**r) for r in json.loads(Path(args.client_workload).read_text())]
    samples = asyncio.run(_client(args.client, args.client_model, requests, args.client_concurrency))
    print(json.dumps([asdict(s) for s in samples]))


def run_serve(url: str, model: str, requests: list[Request], concurrency: int, scratch: Path) -> list[Sample]:
    path = scratch / "workload.json"
    path.write_text(json.dumps([asdict(r) for r in requests]))
    command = [
        sys.executable, __file__, "--client", url, "--client-model", model,
        "--client-workload", str(path), "--client-concurrency", str(concurrency),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return [Sample(**s) for s in json.loads(result.stdout.strip().splitlines()[-1])]


# -- transformers continuous batching ----------------------------------------------------------------------


def run_transformers(manager, requests: list[Request], concurrency: int) -> list[Sample]:
    pending = list(enumerate(requests))
    issued: dict[str, tuple[int, float]] = {}
    samples: dict[int, Sample] = {}
    start = time.perf_counter()
    while len(samples) < len(requests):
        now = time.perf_counter() - start
        while pending and len(issued) < concurrency and pending[0][1].arrival <= now:
            index, request = pending.pop(0)
            rid = manager.add_request(
                request.prompt, request_id=f"r{index}", max_new_tokens=request.max_tokens,
                record_timestamps=True, eos_token_id=-1,
            )  # fmt: skip
            issued[rid] = (index, time.perf_counter() - start)
        result = manager.get_result(timeout=0.002)
        if result is not None and result.is_finished():
            if result.error:
                raise RuntimeError(f"transformers CB failed: {result.error}")
            index, at = issued.pop(result.request_id)
            samples[index] = Sample(at, [t - start for t in result.timestamps])
    return [samples[i] for i in range(len(requests))]


# -- onboardlm run in static batches -----------------------------------------------------------------------


def run_static(
    graph, pad_id: int, requests: list[Request], concurrency: int, device: torch.device
) -> list[Sample]:
    from onboardlm.runtime.cache import KVCache
    from onboardlm.runtime.engine import CachedModel

    longest = max(len(r.prompt) for r in requests) + max(r.max_tokens for r in requests)
    model = CachedModel(
        graph, KVCache.allocate(graph.caches, min(concurrency, len(requests)), longest, device), pad_id
    )
    samples: list[Sample] = []
    start = time.perf_counter()
    for first in range(0, len(requests), concurrency):
        batch = requests[first : first + concurrency]
        time.sleep(max(0.0, batch[-1].arrival - (time.perf_counter() - start)))
        issued = [max(r.arrival, time.perf_counter() - start) for r in batch]
        steps = max(r.max_tokens for r in batch)
        times = []
        logits = model.prefill([r.prompt for r in batch], steps)
        for step in range(steps):
            token = logits.argmax(dim=-1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if step < steps - 1:
                logits = model.decode(token)
        samples += [Sample(at, times[: r.max_tokens]) for at, r in zip(issued, batch, strict=True)]
    return samples


# -- main ---------------------------------------------------------------------------------------------------


def _table(results: list[dict]) -> str:
    lines = [
        "| concurrency | system | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        tpot50, tpot99 = (
            f"{row[k]:.1f}" if row[k] is not None else "-" for k in ("tpot_ms_p50", "tpot_ms_p99")
        )
        lines.append(
            f"| {row['concurrency']} | {row['system']} | {row['output_tok_s']:.1f} | {row['ttft_ms_p50']:.0f} | "
            f"{row['ttft_ms_p99']:.0f} | {tpot50} | {tpot99} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="what onboardlm run takes [default: the shipped SmolLM2]"
    )
    parser.add_argument("--llama3-8b", action="store_true", help="the Llama-3-8B shape (with --model llama)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--requests", type=int, default=None, help="per level [default: max(8, concurrency)]")
    parser.add_argument(
        "--rate", type=float, default=8.0, help="Poisson arrivals per second (0: all at once)"
    )
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--output-len", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", nargs="+", default=["serve", "transformers", "static"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--cpu-results", type=Path, default=Path(__file__).with_name("results") / "serve_cpu.json",
        help="the CPU run whose figures a GPU run's summary quotes",
    )  # fmt: skip
    for name in ("client", "client-model", "client-workload"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--client-concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return run_client_process(args)
    run_benchmark(args)


def _load(model: str | None, settings):
    """The model as ``onboardlm serve`` loads it; a model without a tokenizer (a bare model_type with
    random weights, prompts as token ids) gets a word-level stand-in that names each id."""
    from onboardlm.errors import ModelSourceError
    from onboardlm.runtime.serve_setup import LoadedModel, load_model

    try:
        return load_model(model, settings)
    except ModelSourceError as error:
        if "no tokenizer" not in str(error):
            raise
    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.runtime.runner import resolve_device, resolve_dtype
    from onboardlm.testing.checkpoints import word_tokenizer

    factory = AutoModelForCausalLMFactory(model, settings.model_kwargs)
    lean, report = factory.build_and_load(
        device=resolve_device(settings.device), dtype=resolve_dtype(settings.dtype)
    )
    vocab = factory.config.vocab_size
    tokenizer = word_tokenizer({"<unk>": 0, "<s>": 1, **{f"t{i}": i for i in range(2, vocab)}}, eos=None)
    return LoadedModel(lean, tokenizer, frozenset(), factory.config, report)


def run_benchmark(args: argparse.Namespace) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
    from transformers.initialization import no_init_weights

    from onboardlm.registry.settings import RunSettings
    from onboardlm.runtime.engine import build_cached_graph
    from onboardlm.runtime.serve_setup import ServeOptions, engine_for_model
    from onboardlm.serve.app import ServedModel, create_app
    from onboardlm.serve.server import BackgroundServer

    levels = sorted(args.concurrency)
    most = max(args.requests or max(8, c) for c in levels)
    longest = args.prompt_len[1] + args.output_len[1]
    settings = RunSettings(
        device=args.device, dtype=args.dtype, max_batch_size=max(levels), max_seq_len=longest + 1,
        max_new_tokens=args.output_len[1], model_kwargs=LLAMA3_8B if args.llama3_8b else {},
    )  # fmt: skip
    torch.manual_seed(args.seed)
    loaded = _load(args.model, settings)
    lean, device = loaded.model, next(loaded.model.parameters()).device
    vocab = int(lean.get_input_embeddings().weight.shape[0])
    graph = build_cached_graph(lean)
    pad = loaded.tokenizer.pad_token_id or 0
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(loaded.config, dtype=lean.dtype, attn_implementation="sdpa")
    hf.load_state_dict({k: v for k, v in lean.state_dict().items() if "._ad_" not in k}, strict=True)
    hf = hf.to(device).eval()
    options = ServeOptions(block_size=16, kv_cache_tokens=most * longest, max_step_tokens=max(512, max(levels)), max_waiting=4096)  # fmt: skip
    engine = engine_for_model(lean, loaded.tokenizer, loaded.stop_ids, settings, options)
    name = "bench"
    results = []
    generation = GenerationConfig(
        do_sample=False, max_new_tokens=args.output_len[1], eos_token_id=-1, pad_token_id=pad
    )
    # sdpa as DESIGN.md measured it (no flash kernel fetched); a share of the GPU memory the others also need
    cb_config = ContinuousBatchingConfig(auto_switch_to_flash=False, max_memory_percent=0.3)
    manager = hf.init_continuous_batching(generation_config=generation, continuous_batching_config=cb_config)
    manager.start()
    with BackgroundServer(create_app(ServedModel.from_settings(name, engine, settings)), engine) as server, tempfile.TemporaryDirectory() as scratch:  # fmt: skip

        def run_system(key: str, requests: list[Request], concurrency: int) -> list[Sample]:
            if key == "serve":
                return run_serve(server.url, name, requests, concurrency, Path(scratch))
            if key == "transformers":
                return run_transformers(manager, requests, concurrency)
            return run_static(graph, pad, requests, concurrency, device)

        warm = workload(4, 0, args.seed + 1, vocab, tuple(args.prompt_len), tuple(args.output_len))
        for key in args.systems:
            run_system(key, warm, 4)
        for concurrency in levels:
            n = args.requests or max(8, concurrency)
            requests = workload(
                n, args.rate, args.seed, vocab, tuple(args.prompt_len), tuple(args.output_len)
            )
            for key in args.systems:
                system, samples = SYSTEMS[key], run_system(key, requests, concurrency)
                row = {
                    "concurrency": concurrency,
                    "system": system,
                    "requests": n,
                    **summarize(samples, requests),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    _write(args, device, results)
    manager.stop(block=True)
    print(_table(results))


def _row(results: list[dict], concurrency: int, system: str) -> dict | None:
    return next((r for r in results if r["concurrency"] == concurrency and r["system"] == system), None)


def figures(results: list[dict]) -> dict:
    """The headline figures of one run's rows (None where a level or system was not run)."""
    serve, hf, static = (_row(results, 64, SYSTEMS[k]) for k in ("serve", "transformers", "static"))
    serve1, static1 = _row(results, 1, SYSTEMS["serve"]), _row(results, 1, SYSTEMS["static"])

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    tok_s = serve["output_tok_s"] if serve else None
    tpot1 = serve1["tpot_ms_p50"] if serve1 else None
    static_tpot1 = static1["tpot_ms_p50"] if static1 else None
    return {
        "throughput_c64_tok_s": tok_s,
        "throughput_c64_ratio_vs_hf_cb": ratio(tok_s, hf["output_tok_s"] if hf else None),
        "throughput_c64_ratio_vs_static": ratio(tok_s, static["output_tok_s"] if static else None),
        "tpot_p50_c1_ms": tpot1,
        "tpot_p50_c1_static_ms": static_tpot1,
        "tpot_c1_ratio_vs_static": ratio(tpot1, static_tpot1),
        "ttft_p99_c64_ms": serve["ttft_ms_p99"] if serve else None,
    }


def summary(gpu: str | None, results: list[dict], cpu_results: list[dict] | None) -> dict:
    """The ``summary`` object: the GPU run's (8B shape) figures under ``*_8b_*`` keys with ``gpu`` (None
    for a CPU run) and the CPU run's figures under ``cpu``; ``results`` are this run's rows,
    ``cpu_results`` the CPU run's (this run's own when it ran on the CPU)."""
    own = figures(results) if gpu else {}
    out: dict = {"gpu": gpu}
    for key in figures([]):
        out[key.replace("_c64_", "_c64_8b_").replace("_c1_", "_c1_8b_")] = own.get(key)
    out["cpu"] = figures(cpu_results) if cpu_results else None
    return out


def _write(args: argparse.Namespace, device: torch.device, results: list[dict]) -> None:
    """Write the results so far (JSON with the run's metadata and summary, and the markdown table)."""
    import transformers

    from onboardlm.registry.atomic import atomic_write_text

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "model": args.model or "SmolLM2-135M-Instruct (shipped GGUF)", "llama3_8b_shape": args.llama3_8b,
        "dtype": args.dtype, "rate": args.rate, "prompt_len": args.prompt_len, "output_len": args.output_len,
        "seed": args.seed,
    }  # fmt: skip
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    cpu_results = results if gpu is None else None
    if gpu is not None and args.cpu_results.exists():
        cpu_results = json.loads(args.cpu_results.read_text())["results"]
    body = {"meta": meta, "summary": summary(gpu, results, cpu_results), "results": results}
    atomic_write_text(args.out, json.dumps(body, indent=1) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), _table(results) + "\n")


if __name__ == "__main__":
    main()
