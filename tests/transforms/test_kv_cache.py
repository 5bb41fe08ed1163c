"""KV-cache transform: every decode step with the cache gives the logits of a full recompute.

Tiny random models (fp32, CPU): the golden lean Llama, Gemma 2 (sliding window + attention and final
softcap) and GPT-OSS (sinks + sliding window), the last two from the AutoDeploy-style files in
``tests/compat``. A batch of prompts of different lengths (longer than the window) is prefilled
together, then decoded step by step; each sequence's logits must equal the eager model run on that
sequence alone, from scratch (RMSE ratio < 1e-4); shipped Laguna and MiMo-V2-Flash files on their
tiny configs too. Any lean causal-LM class can be added to ``CASES``;
DeepSeek-V3 joins once its lean file exists. Until then a toy two-layer MLA model checks the
``torch_mla`` branch of the transform.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from transformers import AutoConfig, Gemma2Config, GptOssConfig, LlamaConfig, PretrainedConfig

from onboardlm.errors import UnsupportedFeature
from onboardlm.export import torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.testing import assert_rmse_close, tiny_config
from onboardlm.testing.reference import installed_model_type
from onboardlm.transforms import insert_cached_attention

COMPAT = Path(__file__).resolve().parents[1] / "compat"
TOL = 1e-4
PROMPT_LENGTHS = (9, 3, 6)  # different lengths, longer than the sliding window (4)
DECODE_STEPS = 5

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def _load_shim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onboardlm_tests_kv_shim", COMPAT / "autodeploy_shim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _shipped() -> Iterator[None]:
    yield


@contextmanager
def _ad_style(stem: str) -> Iterator[None]:
    shim = _load_shim()
    with shim.autodeploy_imports(COMPAT):
        shim.load_model_file(stem)
        yield


@dataclass(frozen=True)
class Case:
    make_config: Callable[[], PretrainedConfig]
    context: Callable[[], object]


CASES = {
    "llama": Case(lambda: LlamaConfig(intermediate_size=96, **_COMMON), _shipped),
    "gemma2": Case(
        lambda: Gemma2Config(
            intermediate_size=96,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,  # small, so the cap really bends the scores
            final_logit_softcapping=3.0,
            **_COMMON,
        ),
        lambda: _ad_style("ad_style_gemma2"),
    ),
    "gpt_oss": Case(
        lambda: GptOssConfig(
            intermediate_size=32,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            **_COMMON,
        ),
        lambda: _ad_style("ad_style_gpt_oss"),
    ),
}
if importlib.util.find_spec("onboardlm.models.custom.modeling_deepseek_v3") is not None:
    from transformers import DeepseekV3Config

    CASES["deepseek_v3"] = Case(
        lambda: DeepseekV3Config(
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            **{**_COMMON, "num_key_value_heads": 4},  # MLA: one KV head per query head
        ),
        _shipped,
    )
if importlib.util.find_spec("onboardlm.models.custom.modeling_deepseek_v32") is not None:
    from transformers import DeepseekV32Config

    # DeepSeek sparse attention: a lightning indexer keeps 4 keys per query, fewer than the prompts
    # (9 and 6 tokens) and the decoded sequences hold, so the cached indexer's selection matters
    CASES["deepseek_v32"] = Case(
        lambda: DeepseekV32Config(
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            mlp_layer_types=["dense", "sparse"],
            kv_lora_rank=32,
            q_lora_rank=48,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            index_topk=4,
            index_head_dim=16,
            index_n_heads=4,
            **{**_COMMON, "num_key_value_heads": 4},
        ),
        _shipped,
    )


if importlib.util.find_spec("onboardlm.models.custom.modeling_llama4_text") is not None:
    from transformers import Llama4TextConfig

    CASES["llama4_text"] = Case(  # chunked local attention, NoPE layers with the attention temperature
        lambda: Llama4TextConfig(
            intermediate_size=32,
            intermediate_size_mlp=48,
            head_dim=16,
            num_local_experts=4,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,
            attention_chunk_size=4,
            floor_scale=3,
            **_COMMON,
        ),
        _shipped,
    )


def _tiny_shipped(model_type: str) -> PretrainedConfig:
    """The tiny config of a shipped type's default config, with a window shorter than the prompts."""
    config = tiny_config(AutoConfig.for_model(model_type))
    if getattr(config, "sliding_window", None):
        config.sliding_window = 4
    return config


#: shipped files with attention variants the cache must serve: an output gate of one value per head
#: (Laguna); value heads of their own width, sinks and twice the KV heads on sliding layers (MiMo-V2)
for _type in ("laguna", "mimo_v2_flash"):
    if installed_model_type(_type) and importlib.util.find_spec(f"onboardlm.models.custom.modeling_{_type}"):
        CASES[_type] = Case(lambda t=_type: _tiny_shipped(t), _shipped)


def _kv_sharing_config() -> PretrainedConfig:
    """Gemma 4's text config, six tiny layers, the last two reading the keys and values of the last
    earlier sliding and full-attention layers (cross-layer KV sharing, ``num_kv_shared_layers``)."""
    base = _tiny_shipped("gemma4_unified_text")
    fields = {**base.to_dict(), "num_kv_shared_layers": 2}
    fields.update(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
    (full,) = fields["per_layer_config"].values()  # the tiny full-attention layer's widths, on 1, 3, 5
    fields["per_layer_config"] = {i: full for i in (1, 3, 5)}
    return type(base)(**fields)


#: shipped Gemma 4 file: sharing layers attend with the caches of the layers they read
if installed_model_type("gemma4_unified_text") and importlib.util.find_spec(
    "onboardlm.models.custom.modeling_gemma4_unified_text"
):
    CASES["gemma4_unified_text_kv_sharing"] = Case(_kv_sharing_config, _shipped)


def _random_model(case: Case) -> nn.Module:
    """The registered lean class for the case's config, every parameter drawn at random.

    (Some files leave parameters uninitialised, e.g. sinks and packed experts, until a checkpoint loads.)
    """
    with case.context():
        model = AutoModelForCausalLMFactory(case.make_config()).build_model()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model


def _full_logits(model: nn.Module, sequence: list[int]) -> torch.Tensor:
    ids = torch.tensor([sequence])
    with torch.no_grad():
        return model(input_ids=ids, position_ids=torch.arange(len(sequence))[None]).logits[0, -1].float()


@pytest.mark.parametrize("name", list(CASES))
def test_every_decode_step_matches_a_full_recompute(name: str) -> None:
    model = _random_model(CASES[name])
    graph = build_cached_graph(model)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in PROMPT_LENGTHS]
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 4, 32, "cpu"))
    logits = cached.prefill(prompts, DECODE_STEPS)
    sequences = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        for row, sequence in enumerate(sequences):
            assert_rmse_close(
                logits[row], _full_logits(model, sequence), TOL, msg=f"{name} step {step} seq {row}"
            )
        tokens = torch.randint(0, vocab, (len(sequences),))  # any continuation: not only the likely one
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens)


class _ToyMlaLM(nn.Module):
    """Two MLA layers on ``torch_mla`` (no RoPE needed to exercise the cache), enough for the transform."""

    def __init__(
        self, vocab: int = 40, hidden: int = 32, heads: int = 4, nope: int = 8, rope: int = 4
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.shape = (heads, nope, rope)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q": nn.Linear(hidden, heads * (nope + rope), bias=False),
                    "kv_a": nn.Linear(hidden, 16 + rope, bias=False),
                    "kv_b": nn.Linear(16, heads * (nope + 8), bias=False),
                    "o": nn.Linear(heads * 8, hidden, bias=False),
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        heads, nope, rope = self.shape
        x = self.embed(input_ids)
        b, s, _ = x.shape
        for layer in self.layers:
            q = layer["q"](x).view(b, s, heads, nope + rope)
            compressed, kpe = layer["kv_a"](x).split([16, rope], dim=-1)
            attn = torch.ops.auto_deploy.torch_mla(
                q[..., :nope], q[..., nope:], compressed, kpe.view(b, s, 1, rope), layer["kv_b"].weight
            )
            x = x + layer["o"](attn.reshape(b, s, heads * 8))
        return self.head(x)


def test_mla_graph_decode_matches_a_full_recompute() -> None:
    model = _ToyMlaLM().eval()
    graph = build_cached_graph(model)
    assert [spec.features for spec in graph.caches] == [(16,), (1, 4)] * 2
    prompts = [torch.randint(0, 40, (n,)).tolist() for n in PROMPT_LENGTHS]
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 4, 32, "cpu"))
    logits = cached.prefill(prompts, DECODE_STEPS)
    sequences = [list(p) for p in prompts]
    for step in range(DECODE_STEPS):
        for row, sequence in enumerate(sequences):
            with torch.no_grad():
                full = model(torch.tensor([sequence]), torch.arange(len(sequence))[None])[0, -1]
            assert_rmse_close(logits[row], full, TOL, msg=f"MLA step {step} seq {row}")
        tokens = torch.randint(0, 40, (len(sequences),))
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens)


def test_caches_are_sized_per_layer_from_the_graph() -> None:
    config = LlamaConfig(intermediate_size=96, **{**_COMMON, "num_hidden_layers": 3})
    model = AutoModelForCausalLMFactory(config).build_model()
    graph = build_cached_graph(model)
    assert [spec.name for spec in graph.caches] == [f"{kv}_cache_{i}" for i in range(3) for kv in "kv"]
    head_dim = config.hidden_size // config.num_attention_heads
    assert {spec.features for spec in graph.caches} == {(config.num_key_value_heads, head_dim)}
    targets = {str(n.target) for n in graph.gm.graph.nodes if n.op == "call_function"}
    assert not any("torch_attention" in t for t in targets)


@pytest.mark.skipif(
    "gemma4_unified_text_kv_sharing" not in CASES, reason="no shipped Gemma 4 file with KV sharing"
)
def test_layers_sharing_keys_and_values_share_one_cache() -> None:
    """Layers 4 and 5 read layers 2's and 3's keys and values: four layers' caches, not six."""
    config = _kv_sharing_config()
    assert config.kv_sharing_modes[4:] == ["reuse", "reuse"]
    graph = build_cached_graph(_random_model(CASES["gemma4_unified_text_kv_sharing"]))
    assert [spec.name for spec in graph.caches] == [f"{kv}_cache_{i}" for i in range(4) for kv in "kv"]
    attention = [
        n for n in graph.gm.graph.nodes if n.op == "call_function" and "cached_attention" in str(n.target)
    ]
    assert len(attention) == 6 and attention[4].args[3] is attention[2].args[3]


class _MaskedAttention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(1, 1, x.shape[2], x.shape[2], dtype=torch.bool)
        return torch.ops.auto_deploy.torch_attention(x, x, x, attn_mask=mask)


class _NoAttention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.mark.parametrize(
    ("module", "feature"),
    [
        (_MaskedAttention(), "explicit attn_mask"),
        (_NoAttention(), "no attention, MLA, SSM, conv or delta-rule node"),
    ],
)
def test_graphs_the_cache_cannot_serve_are_refused(module: nn.Module, feature: str) -> None:
    gm = torch_export_to_gm(module, (torch.randn(1, 2, 4, 8),))
    with pytest.raises(UnsupportedFeature, match=feature):
        insert_cached_attention(gm)
