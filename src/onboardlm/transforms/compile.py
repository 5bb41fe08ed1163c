"""The GPU path of a cached graph: CUDA-graph capture of its decode steps, optional torch.compile.

:class:`FastGraph` is called like the cached ``GraphModule`` (keyword inputs, see
:mod:`onboardlm.transforms.kv_cache`) and returns the same logits. It is bound to one static KV cache
(``[max_batch, max_seq, ...]`` tensors that never move). A decode step (one token per sequence) of
``b`` sequences is padded to the smallest captured batch size ``B >= b`` and replayed from a CUDA graph
captured with ``kv_len = max_seq``: the masks follow ``input_pos``, so reading the whole cache gives
the same result as reading the valid prefix. Padded rows use cache rows ``b .. B-1`` at the last
position, which no live sequence reads before writing it itself.

A prefill from position 0 of ``b`` prompts right-padded to width ``w`` (``kv_len == w``, as
:class:`onboardlm.runtime.engine.CachedModel` calls it) is padded further to a captured bucket
``(B, L)`` (``B >= b`` and ``L >= w`` from the options' prefill buckets) and replayed from a
CUDA graph captured on first use: without it, each layer's ~26 kernel launches run from Python and a
small model's prefill waits on the host. Padding is causal-safe: a real token attends only to
positions up to its own, and padded positions (and rows ``b .. B-1``) write cache slots that a
sequence overwrites before it reads them. Any other multi-token step runs the graph directly.
:func:`accelerate` builds the whole fast path; :class:`SpeedOptions` turns each part (fusion,
whole-graph ``torch.compile`` of the decode step, decode and prefill CUDA graphs) on or off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from onboardlm.transforms.fast_attention import use_fast_attention
from onboardlm.transforms.fast_mla import use_fast_mla
from onboardlm.transforms.fold_weights import fold_weight_computations
from onboardlm.transforms.fuse_fp8 import fuse_fp8_linears
from onboardlm.transforms.fuse_linears import fuse_shared_input_linears
from onboardlm.transforms.fusion import fuse_elementwise
from onboardlm.transforms.gather_logits import LOGIT_INDEX
from onboardlm.transforms.kv_cache import INPUT_POS, KV_LEN
from onboardlm.transforms.moe_backend import use_grouped_moe
from onboardlm.transforms.state_cache import SEQ_LENS

#: Ops that synchronise with the host (data-dependent shapes): a graph holding one is not captured.
UNCAPTURABLE_OPS = ("torch_moe",)


@dataclass(frozen=True)
class SpeedOptions:
    """The GPU path's switches.

    ``fuse``: compiled elementwise kernels (:mod:`onboardlm.transforms.fusion`); ``compile``: also
    ``torch.compile`` the whole decode graph (slow to compile: a minute or more for a large model);
    ``cuda_graphs``: capture decode steps for ``batch_sizes``; ``fuse_linears``: one GEMM per group of
    linears sharing an input (q/k/v, gate/up; :mod:`onboardlm.transforms.fuse_linears`);
    ``decode_kernel``: the Triton split-K kernel for one-token attention where it can run (else SDPA);
    ``moe_kernel``: the Triton kernels for routed experts at decode (:mod:`onboardlm.kernels.moe_decode`);
    ``prefill_graphs``: capture prefills per (``prefill_batch_sizes``, ``prefill_lengths``) bucket on
    first use.
    """

    fuse: bool = True
    compile: bool = False
    cuda_graphs: bool = True
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    fuse_linears: bool = True
    decode_kernel: bool = True
    moe_kernel: bool = True
    prefill_graphs: bool = True
    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    prefill_lengths: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor


@dataclass
class CaptureReport:
    """Captured batch sizes and, for each batch size that could not be captured, why."""

    captured: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    prefill_captured: list[str] = field(default_factory=list)  # "<batch>x<length>" buckets
    prefill_skipped: dict[str, str] = field(default_factory=dict)


def uncapturable_reason(gm: GraphModule) -> str | None:
    """Why ``gm`` cannot be captured in a CUDA graph (an op from :data:`UNCAPTURABLE_OPS`), or None."""
    for node in gm.graph.nodes:
        name = getattr(node.target, "__name__", "")
        if node.op == "call_function" and any(
            op in str(node.target) or op == name for op in UNCAPTURABLE_OPS
        ):
            return f"{node.name} calls {name or node.target}, which synchronises with the host"
    return None


class FastGraph:
    """A cached graph bound to its static KV cache, with compiled and CUDA-graph decode steps."""

    def __init__(
        self,
        gm: GraphModule,
        cache: dict[str, torch.Tensor],
        options: SpeedOptions,
        max_seq: int | None = None,
    ) -> None:
        self.gm = gm
        self.cache = cache
        first = next(iter(cache.values()))
        self.device = cache_device(cache)
        self.max_batch = int(first.shape[0])
        # ``max_seq``: the KV cache's length (a state cache's second dim is not a sequence)
        self.max_seq = int(first.shape[1] if max_seq is None else max_seq)
        self.has_state = any(n.op == "placeholder" and n.name == SEQ_LENS for n in gm.graph.nodes)
        self.options = options
        use_compile = options.compile and self.device.type == "cuda"
        self.step = torch.compile(gm, dynamic=False) if use_compile else gm
        self.report = CaptureReport()
        self._captured: dict[int, _Captured] = {}
        self._prefills: dict[tuple[int, int], _Captured | None] = {}  # None: capture failed, run directly
        self._pool: Any = None
        self._uncapturable = uncapturable_reason(gm)

    def capture(self) -> CaptureReport:
        """Capture one decode step for every batch size of the options that fits the cache."""
        if not self.options.cuda_graphs or self.device.type != "cuda":
            return self.report
        reason = self._uncapturable
        for size in sorted(set(self.options.batch_sizes)):
            if size > self.max_batch:
                continue
            if reason is not None:
                self.report.skipped[size] = reason
                continue
            try:
                self._captured[size] = self._capture(size)
                self.report.captured.append(size)
            except RuntimeError as error:  # recorded; the step then runs uncaptured
                self.report.skipped[size] = str(error).splitlines()[0]
        return self.report

    def _static_inputs(self, size: int, prefill_length: int | None = None) -> dict[str, torch.Tensor]:
        """Static inputs of a captured step: one decode token per row at the cache's last position, or
        (``prefill_length``) a fresh prefill of that many tokens from position 0."""

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=self.device)

        if prefill_length is not None:
            positions = torch.arange(prefill_length, device=self.device).expand(size, prefill_length)
            return {
                "input_ids": zeros(size, prefill_length),
                "position_ids": positions.contiguous(),
                INPUT_POS: zeros(size),
                LOGIT_INDEX: zeros(size),
            }
        inputs = {"input_ids": zeros(size, 1), "position_ids": zeros(size, 1), LOGIT_INDEX: zeros(size)}
        inputs[INPUT_POS] = torch.full((size,), self.max_seq - 1, dtype=torch.long, device=self.device)
        if self.has_state:  # padded rows step their own state rows (b .. B-1), which no live sequence uses
            inputs[SEQ_LENS] = torch.ones(size, dtype=torch.long, device=self.device)
        return inputs

    def _capture(self, size: int) -> _Captured:
        return self._capture_call(self.step, self._static_inputs(size), self.max_seq)

    def _capture_call(self, step: Any, inputs: dict[str, torch.Tensor], kv_len: int) -> _Captured:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # compile and warm up outside the capture
                step(**inputs, **{KV_LEN: kv_len}, **self.cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            logits = step(**inputs, **{KV_LEN: kv_len}, **self.cache)
        self._pool = graph.pool()
        return _Captured(graph, inputs, logits)

    def _prefill_bucket(self, batch: int, width: int) -> tuple[int, int] | None:
        """The captured prefill shape for ``batch`` prompts of width ``width``, or None (run directly)."""
        options = self.options
        if not options.prefill_graphs or self.device.type != "cuda" or self._uncapturable is not None:
            return None
        if self.has_state:  # a hybrid's prefill runs directly (its conv/SSM states read seq_lens)
            return None
        size = min((b for b in options.prefill_batch_sizes if batch <= b <= self.max_batch), default=None)
        length = min((n for n in options.prefill_lengths if width <= n <= self.max_seq), default=None)
        return None if size is None or length is None else (size, length)

    def _captured_prefill(self, key: tuple[int, int]) -> _Captured | None:
        if key not in self._prefills:
            size, length = key
            inputs = self._static_inputs(size, prefill_length=length)
            try:
                self._prefills[key] = self._capture_call(self.gm, inputs, length)
                self.report.prefill_captured.append(f"{size}x{length}")
            except RuntimeError as error:  # recorded; prefills of this shape then run directly
                self._prefills[key] = None
                self.report.prefill_skipped[f"{size}x{length}"] = str(error).splitlines()[0]
        return self._prefills[key]

    def _prefill(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """A fresh prefill replayed from its bucket's CUDA graph, or None where none applies."""
        input_ids = inputs["input_ids"]
        batch, width = input_ids.shape
        if inputs[KV_LEN] != width:  # not a prefill from position 0 of every sequence
            return None
        key = self._prefill_bucket(batch, width)
        captured = self._captured_prefill(key) if key is not None else None
        if captured is None:
            return None
        static = captured.inputs
        static["input_ids"].zero_()
        static["input_ids"][:batch, :width].copy_(input_ids)
        static[LOGIT_INDEX].zero_()
        static[LOGIT_INDEX][:batch].copy_(inputs[LOGIT_INDEX])
        captured.graph.replay()
        return captured.logits[:batch].clone()

    def _bucket(self, batch: int) -> int | None:
        return min((size for size in self._captured if size >= batch), default=None)

    def __call__(self, **inputs: Any) -> torch.Tensor:
        """Run the graph on ``inputs`` (the cached graph's keyword inputs, caches included)."""
        for name, tensor in self.cache.items():
            if inputs[name] is not tensor:
                raise ValueError(f"FastGraph is bound to its own KV cache; {name} is another tensor")
        input_ids = inputs["input_ids"]
        batch = input_ids.shape[0]
        if input_ids.shape[1] != 1:
            replayed = self._prefill(inputs)
            return replayed if replayed is not None else self.gm(**inputs)
        size = self._bucket(batch)
        if size is None:  # one static shape per batch size: the compiled step never sees a new kv_len
            return self.step(**{**inputs, KV_LEN: self.max_seq})
        captured = self._captured[size]
        static = captured.inputs
        for name in ("input_ids", "position_ids", INPUT_POS, LOGIT_INDEX, SEQ_LENS):
            if name in static:
                static[name][:batch].copy_(inputs[name])
        if size > batch:
            static["input_ids"][batch:] = 0
            static["position_ids"][batch:] = 0
            static[INPUT_POS][batch:] = self.max_seq - 1
        captured.graph.replay()
        return captured.logits[:batch].clone()  # the static buffer is overwritten by the next replay


def accelerate(
    gm: GraphModule, cache: dict[str, torch.Tensor], options: SpeedOptions, max_seq: int | None = None
) -> FastGraph:
    """The fast path for a cached graph (rewritten in place) and its runner.

    SDPA attention (the Triton kernel for decode), MLA decode on the latent cache
    (:mod:`onboardlm.transforms.fast_mla`), grouped MoE, fused FP8 kernels for FP8 linears
    (:mod:`onboardlm.transforms.fuse_fp8`), fused shared-input linears, weight-only
    computations done once (:mod:`onboardlm.transforms.fold_weights`), fused elementwise ops (compiled
    on CUDA, eager elsewhere), then a :class:`FastGraph` on ``cache`` with its decode steps captured.
    The rewrites are idempotent, so several caches may share one graph.
    """
    use_fast_attention(gm, decode_kernel_allowed=options.decode_kernel)
    use_fast_mla(gm)
    use_grouped_moe(gm, kernel=options.moe_kernel)
    fuse_fp8_linears(gm, fuse_shared_input=options.fuse_linears)
    if options.fuse_linears:
        fuse_shared_input_linears(gm)
    fold_weight_computations(gm)
    if options.fuse and not options.compile:  # a whole-graph compile fuses these itself
        fuse_elementwise(gm, compile=cache_device(cache).type == "cuda")
    fast = FastGraph(gm, cache, options, max_seq)
    fast.capture()
    return fast


def cache_device(cache: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(cache.values())).device
