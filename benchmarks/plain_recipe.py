"""The GPU benchmark's "plain PyTorch recipe" baseline: one readable Llama, static KV cache, compiled decode.

The well-known recipe users reach for when transformers is too slow: a model written in plain PyTorch with
a KV cache allocated once (``[max_batch, n_kv, max_seq, head_dim]``), SDPA over the whole static cache with
a boolean causal mask built from the token positions, and the one-token decode step wrapped in
``torch.compile(mode="reduce-overhead", fullgraph=True)`` so inductor fuses it and CUDA graphs replay it.
``measure_decode`` times it the way ``gpu.py`` times onboardlm. Imports torch, transformers and
``benchmarks/timing.py`` only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import run_timing  # noqa: E402  (benchmarks/timing.py)


def rope_theta(config: LlamaConfig) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5), else the older ``rope_theta``."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise NotImplementedError(f"plain recipe: only default RoPE, not {params['rope_type']!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """GQA attention that writes k/v into the static cache and attends over all of it under a mask."""

    k_cache: torch.Tensor  # [max_batch, n_kv, max_seq, head_dim], from ``setup_cache``
    v_cache: torch.Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim(config),
        )
        bias, dim = getattr(config, "attention_bias", False), config.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (max_batch, self.n_kv, max_seq, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k_cache, v_cache = self.k_cache[:b], self.v_cache[:b]
        if input_pos.dim() == 1:  # the same positions for every row
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:  # per-row positions [b, s]
            rows = torch.arange(b, device=x.device)[:, None]
            k_cache[rows, :, input_pos] = k.transpose(1, 2)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        dim, inter, bias = config.hidden_size, config.intermediate_size, getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(dim, inter, bias=bias)
        self.up_proj = nn.Linear(dim, inter, bias=bias)
        self.down_proj = nn.Linear(inter, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, *attn_args: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class RecipeLlama(nn.Module):
    """Plain-PyTorch Llama with a static KV cache; parameter names are transformers' without ``model.``."""

    rope_cos: torch.Tensor  # [max_seq, head_dim] tables and the cache's positions, from ``setup_caches``
    rope_sin: torch.Tensor
    cache_pos: torch.Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise NotImplementedError(f"plain recipe: only a SiLU MLP, not {config.hidden_act!r}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, config: LlamaConfig) -> RecipeLlama:
        """The recipe model on ``hf_model``'s own weight tensors (no copy); call ``setup_caches`` next."""
        with torch.device("meta"):
            model = cls(config)
        state = {name.removeprefix("model."): t for name, t in hf_model.state_dict().items()}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def setup_caches(self, max_batch: int, max_seq: int) -> RecipeLlama:
        """Allocate the KV caches and the RoPE cos/sin tables once, on the weights' device and dtype."""
        weight = self.embed_tokens.weight
        dtype, device = weight.dtype, weight.device
        for layer in self.layers:
            layer.self_attn.setup_cache(max_batch, max_seq, dtype, device)
        dim = head_dim(self.config)
        inv_freq = 1.0 / (rope_theta(self.config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        freqs = torch.arange(max_seq, dtype=torch.float)[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1).to(device)
        self.register_buffer("rope_cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(dtype), persistent=False)
        self.register_buffer("cache_pos", torch.arange(max_seq, device=device), persistent=False)
        return self

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Logits (fp32) of the last position, ``[b, vocab]``; ``input_pos`` is ``[s]`` or ``[b, s]``."""
        b, s = input_ids.shape
        pos = input_pos if input_pos.dim() == 2 else input_pos[None, :]
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # [b or 1, 1, s, head_dim]
        mask = (self.cache_pos <= pos[..., None])[:, None]  # [b or 1, 1, s, max_seq]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.lm_head(self.norm(x[:, -1])).float()


def measure_decode(
    hf_model: nn.Module,
    config: LlamaConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    device: str,
    compile: bool = True,
    repeats: int = 3,
) -> dict[str, Any]:
    """Greedy decode with the recipe on ``hf_model``'s weights; times ``new_tokens - 1`` decode steps
    ``repeats`` times after one prefill (``decode_ms``: the median, ``decode_iqr_ms``: the spread).

    The prompt (``gpu.py``'s: random ids from a generator seeded 1) is prefilled eagerly, untimed. With
    ``compile`` the one-token step (forward + argmax) is ``torch.compile``d, fullgraph, with CUDA graphs
    (``reduce-overhead`` on CUDA, default mode elsewhere) and, as the recipe does, inductor's
    coordinate-descent tuning (scoped to this call). A first 4-token run absorbs compilation and graph
    recording: ``compile_s`` is its wall time (shorter where inductor's on-disk cache holds the kernels).
    Compile errors propagate. Returns ``tok_s``, ``decode_ms``, ``decode_iqr_ms``, ``compile_s``,
    ``tokens`` (the first 64 greedy tokens of row 0, the prefill's token first) and ``peak_gib`` (None
    off CUDA).
    """
    cuda = torch.device(device).type == "cuda"
    model = RecipeLlama.from_hf(hf_model, config).setup_caches(batch, prompt_len + new_tokens)
    gen = torch.Generator(device).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device, generator=gen)
    prompt_pos = torch.arange(prompt_len, device=device)

    def decode_step(token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return model(token, input_pos).argmax(-1, keepdim=True)

    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = decode_step
    if compile:
        mode = "reduce-overhead" if cuda else "default"
        step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    def prefill() -> torch.Tensor:
        return model(ids, prompt_pos).argmax(-1, keepdim=True)

    def decode(first: torch.Tensor, steps: int) -> list[torch.Tensor]:
        tokens = [first]
        input_pos = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        for _ in range(steps - 1):
            if compile and cuda:
                torch.compiler.cudagraph_mark_step_begin()
            tokens.append(step(tokens[-1], input_pos).clone())  # the graph's output buffer is reused
            input_pos += 1
        return tokens

    last: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode(), inductor_config.patch(coordinate_descent_tuning=compile):
        start = time.perf_counter()  # one-off: compilation and graph recording happen once
        decode(prefill(), 4)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        compile_s = time.perf_counter() - start
        first = prefill()
        timing = run_timing(lambda: last.update(tokens=decode(first, new_tokens)), repeats)
    return {
        "tok_s": batch * (new_tokens - 1) / timing.median_ms * 1e3,
        "decode_ms": timing.median_ms,
        "decode_iqr_ms": timing.iqr_ms,
        "compile_s": compile_s,
        "tokens": torch.cat(last["tokens"][:64], dim=1)[0].tolist(),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
