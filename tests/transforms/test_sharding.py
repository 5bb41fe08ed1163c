"""Hint-driven tensor parallelism: TP=2 over gloo gives the TP=1 logits; bad inputs fail clearly.

The TP=2 run spawns two worker processes (``_tp_worker.py``) once for all cases; each exports the lean
model, shards it with ``apply_sharding_hints`` and reads its weight slices from a safetensors file
saved from the transformers model. The reference is the unsharded lean model filled from the same
transformers model (fp32). The hybrid cases (bamba: Mamba2 SSM + attention, with two B/C groups and
with one kept whole on both ranks; mamba / falcon_mamba: Mamba1 cut per inner channel; lfm3: short
convolution; qwen3_next: gated delta rule + attention + MoE; ...) also compare greedy decoding with the
conv / SSM / delta state caches.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from onboardlm.errors import OnboardlmError, UnsupportedFeature, WeightsError
from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.runtime.distributed import RankInfo, load_rank_weights, process_group
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.runtime.tensor_parallel import tied_names
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights
from onboardlm.transforms import insert_cached_attention
from onboardlm.transforms.sharding import (
    ParamShard,
    ShardingError,
    apply_sharding_hints,
    check_devices,
    plan_sharding,
)

HERE = Path(__file__).resolve().parent
WORLD_SIZE = 2
BATCH, SEQ = 2, 10
TP_TOL = 1e-4
LLAMA = "onboardlm.models.custom.modeling_llama:LlamaForCausalLM"


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onboardlm_tests_tp_worker", HERE / "_tp_worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    attn_implementation="eager",
)


@dataclass(frozen=True)
class Case:
    model: str  # see _tp_worker.lean_class
    make_config: Callable[[], PretrainedConfig]
    changed: dict[str, int] | None  # nodes apply_sharding_hints must change per op kind (None: any > 0)
    from_transformers: bool = True  # weights from the transformers model of the config, else the lean one
    generate: bool = False  # also compare greedy KV-cache generation
    shard_layers: list[str] | None = None  # layer types to shard (None: all)

    def available(self) -> bool:
        """Generated lean files may not exist yet; the other models always do."""
        module = self.model.split(":")[0]
        return module in ("compat", "file") or importlib.util.find_spec(module) is not None


def _dense(layers: int) -> dict[str, int]:
    return {"linear": 7 * layers, "view": 4 * layers, "all_reduce": 2 * layers}


def _custom(model_type: str) -> str:
    return f"onboardlm.models.custom.modeling_{model_type}"


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(intermediate_size=128, head_dim=16, tie_word_embeddings=True, **_COMMON)


def _qwen3_moe() -> PretrainedConfig:
    return Qwen3MoeConfig(
        intermediate_size=96,
        moe_intermediate_size=32,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],  # layer 0 MoE (expert parallel), layer 1 dense
        **_COMMON,
    )


def _gemma2() -> PretrainedConfig:
    return Gemma2Config(
        intermediate_size=128, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, **_COMMON
    )


def _hybrid(model_type: str, **overrides: object) -> PretrainedConfig:
    return tiny_config(AutoConfig.for_model(model_type, **overrides), vocab_size=_COMMON["vocab_size"])


def _kv_sharing() -> PretrainedConfig:
    """Gemma 4's text config, six layers, the last two attending to layers 2's and 3's keys and
    values (cross-layer KV sharing): those heads are cut where their source layer's are."""
    base = _hybrid("gemma4_unified_text")
    fields = {**base.to_dict(), "num_kv_shared_layers": 2}
    fields.update(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3)
    (full,) = fields["per_layer_config"].values()  # the tiny full-attention layer's widths, on 1, 3, 5
    fields["per_layer_config"] = {i: full for i in (1, 3, 5)}
    return type(base)(**fields, attn_implementation="eager")


CASES = {
    "llama": Case(LLAMA, lambda: LlamaConfig(intermediate_size=128, **_COMMON), _dense(2), generate=True),
    # one KV head, two ranks: K/V replicated, each rank keeps the head its query heads use
    "llama_kv1": Case(
        LLAMA,
        lambda: LlamaConfig(
            intermediate_size=128,
            attention_bias=True,  # colwise biases cut like their weights, the rowwise one kept on rank 0
            **{**_COMMON, "num_key_value_heads": 1, "num_hidden_layers": 1},
        ),
        _dense(1),
    ),
    # selective sharding: attention only; the MLP stays replicated and its all_reduce a copy
    "llama_mha_only": Case(
        LLAMA,
        lambda: LlamaConfig(intermediate_size=128, **{**_COMMON, "num_hidden_layers": 1}),
        {"linear": 4, "view": 4, "all_reduce": 1},
        shard_layers=["mha"],
    ),
    "ad_qwen3": Case("compat:ad_style_qwen3:Qwen3ForCausalLM", _qwen3, _dense(2)),
    "ad_qwen3_moe": Case(
        "compat:ad_style_qwen3_moe:Qwen3MoeForCausalLM",
        _qwen3_moe,
        {"linear": 11, "view": 8, "all_reduce": 4, "moe": 1},
    ),
    "ad_gemma2": Case("compat:ad_style_gemma2:Gemma2ForCausalLM", _gemma2, _dense(2)),
    # attention sinks cut per head; o_proj bias on rank 0 only; the dense-MoE experts stay replicated
    "ad_gpt_oss": Case(
        "compat:ad_style_gpt_oss:GptOssForCausalLM",
        lambda: GptOssConfig(
            intermediate_size=32,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            **_COMMON,
        ),
        {"linear": 8, "view": 8, "attention": 2, "all_reduce": 2},
        generate=True,
    ),
    # MLA, fused QKV with one KV head (replicated inside its output_sizes group), fused gate/up
    "toy_mla_fused": Case(
        "file:_tp_models.py:ToyForCausalLM",
        lambda: DeepseekV3Config(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=1,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=12,
            vocab_size=_COMMON["vocab_size"],
        ),
        {"linear": 6, "view": 6, "split_with_sizes": 2, "mla": 1, "all_reduce": 3},
        from_transformers=False,
    ),
    # generated lean files, included once they exist in onboardlm.models.custom
    "qwen3": Case(f"{_custom('qwen3')}:Qwen3ForCausalLM", _qwen3, None),
    "qwen3_moe": Case(f"{_custom('qwen3_moe')}:Qwen3MoeForCausalLM", _qwen3_moe, None, generate=True),
    "gemma2": Case(f"{_custom('gemma2')}:Gemma2ForCausalLM", _gemma2, None),
    "mixtral": Case(
        f"{_custom('mixtral')}:MixtralForCausalLM",
        lambda: MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
        None,
    ),
    "deepseek_v3": Case(
        f"{_custom('deepseek_v3')}:DeepseekV3ForCausalLM",
        lambda: tiny_config(AutoConfig.for_model("deepseek_v3", vocab_size=_COMMON["vocab_size"])),
        None,
        generate=True,
    ),
    # hybrids: Mamba2 SSM layers (in_proj per segment, conv per channel, heads, gated norm per group)
    # next to attention, and gated-delta-rule layers next to attention and MoE; cached decode too
    "bamba": Case(
        f"{_custom('bamba')}:BambaForCausalLM",
        lambda: _hybrid("bamba", attn_layer_indices=[1], mamba_n_groups=2),
        {
            "linear": 12,
            "view": 8,
            "split_with_sizes": 2,
            "conv": 1,
            "ssm": 1,
            "gated_norm": 1,
            "all_reduce": 4,
        },
        generate=True,
    ),
    # one B/C group, two ranks: in_proj's B and C rows and their conv channels kept whole on both ranks,
    # x / z / dt and the heads split; the gated norm's one group spans the ranks (cross-rank variance)
    "bamba_one_group": Case(
        f"{_custom('bamba')}:BambaForCausalLM",
        lambda: _hybrid("bamba", attn_layer_indices=[1], mamba_n_groups=1),
        {
            "linear": 12,
            "view": 8,
            "split_with_sizes": 2,
            "conv": 1,
            "ssm": 1,
            "gated_norm": 1,
            "all_reduce": 4,
        },
        generate=True,
    ),
    # Mamba1: in_proj's x and z, the depthwise conv, dt_proj, A_log and D cut per inner channel, x_proj
    # rowwise (all-reduced to the whole dt | B | C), out_proj rowwise; Falcon-Mamba adds weightless
    # RMSNorms over dt, B and C (whole on every rank)
    "mamba": Case(
        f"{_custom('mamba')}:MambaForCausalLM",
        lambda: _hybrid("mamba"),
        {"linear": 8, "split_with_sizes": 2, "conv": 2, "view": 6, "ssm": 2, "all_reduce": 4},
        generate=True,
    ),
    # Mamba2 and attention in parallel from one norm, with µP multipliers: in_proj's output scaled by a
    # constant vector (one value per z / x / B / C / dt segment, cut like in_proj's rows), keys, MLP and
    # logits by constants
    "falcon_h1": Case(
        f"{_custom('falcon_h1')}:FalconH1ForCausalLM",
        lambda: _hybrid(
            "falcon_h1",
            mamba_rms_norm=True,
            mamba_n_groups=2,
            ssm_multipliers=[0.7, 1.3, 0.55, 1.45, 0.8],
            mlp_multipliers=[0.75, 1.25],
            key_multiplier=1.2,
        ),
        {
            "linear": 18,
            "view": 16,
            "split_with_sizes": 4,
            "conv": 2,
            "ssm": 2,
            "gated_norm": 2,
            "row_scale": 2,
            "all_reduce": 6,
        },
        generate=True,
    ),
    "falcon_mamba": Case(
        f"{_custom('falcon_mamba')}:FalconMambaForCausalLM",
        lambda: _hybrid("falcon_mamba"),
        {"linear": 8, "split_with_sizes": 2, "conv": 2, "view": 6, "ssm": 2, "all_reduce": 4},
        generate=True,
    ),
    # a doubled write strength runs on the per-channel delta rule: A_log / dt_bias cut per head; the
    # attention layers stay replicated (their q/k norm spans all heads of the projection)
    "olmo_hybrid": Case(
        f"{_custom('olmo_hybrid')}:OlmoHybridForCausalLM",
        lambda: _hybrid("olmo_hybrid"),
        {"linear": 13, "view": 5, "split_with_sizes": 1, "conv": 1, "delta": 1, "all_reduce": 3},
        generate=True,
        shard_layers=["delta", "mlp"],
    ),
    # Kimi Delta Attention (A_log [1, 1, H, 1] cut along its heads, dt_bias per head channel, low-rank
    # forget / output gates: the rank map replicated, the head map colwise) beside NoPE MLA and MoE
    "kimi_linear": Case(
        f"{_custom('kimi_linear')}:KimiLinearForCausalLM",
        lambda: _hybrid("kimi_linear"),
        {
            "linear": 15,
            "view": 8,
            "split_with_sizes": 1,
            "conv": 1,
            "delta": 1,
            "mla": 1,
            "moe": 1,
            "all_reduce": 5,
        },
        generate=True,
    ),
    # general residual steps: a MoE and a shared MLP in parallel on one normed input, every step
    # scaled by the residual multiplier (GraniteMoeHybrid); sandwich norms around short convolution
    # and head-gated attention (LFM3)
    "granitemoehybrid": Case(
        f"{_custom('granitemoehybrid')}:GraniteMoeHybridForCausalLM",
        lambda: _hybrid("granitemoehybrid", mamba_n_groups=2, residual_multiplier=1.3),
        {
            "linear": 8,
            "split_with_sizes": 6,
            "conv": 2,
            "view": 8,
            "ssm": 2,
            "gated_norm": 2,
            "all_reduce": 6,  # per layer: the mixer, the MoE and the shared MLP each reduce
            "moe": 2,
        },
        generate=True,
    ),
    "lfm3": Case(
        f"{_custom('lfm3')}:Lfm3ForCausalLM",
        lambda: _hybrid("lfm3"),
        {"linear": 21, "split_with_sizes": 1, "conv": 1, "all_reduce": 6, "view": 8},
        generate=True,
    ),
    "qwen3_next": Case(
        f"{_custom('qwen3_next')}:Qwen3NextForCausalLM",
        lambda: _hybrid("qwen3_next"),
        {"linear": 13, "view": 18, "split_with_sizes": 1, "conv": 1, "delta": 1, "moe": 2, "all_reduce": 6},
        generate=True,
    ),
    # Griffin's recurrent block: linear_x / linear_y colwise, the depthwise conv per channel, the RG-LRU's
    # block-diagonal gates per head and its recurrence parameter per channel; sliding-window attention
    "recurrent_gemma": Case(
        f"{_custom('recurrent_gemma')}:RecurrentGemmaForCausalLM",
        lambda: _hybrid("recurrent_gemma"),
        {"linear": 13, "conv": 1, "ssm": 1, "view": 4, "all_reduce": 4},
        generate=True,
    ),
    "gemma4_unified_text_kv_sharing": Case(
        f"{_custom('gemma4_unified_text')}:Gemma4UnifiedForCausalLM", _kv_sharing, None, generate=True
    ),
}
AVAILABLE = [name for name, case in CASES.items() if case.available()]


@dataclass
class Reference:
    """Unsharded results of one case: logits on the test input, greedy tokens when the case generates."""

    logits: torch.Tensor
    tokens: list[list[int]] | None


def _reference_and_checkpoint(
    name: str, case: Case, workdir: Path, input_ids: torch.Tensor
) -> tuple[dict[str, object], Reference]:
    """Save config + weights for the workers; return the job entry and the unsharded lean results."""
    config = case.make_config()
    lean = worker.build_lean(case.model, config)  # before the HF model: it writes into MoE configs
    reference = AutoModelForCausalLM.from_config(config).eval() if case.from_transformers else lean
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    if case.from_transformers:
        transfer_weights(reference, lean)
    checkpoint = workdir / f"{name}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in reference.state_dict().items()}, checkpoint)
    config.save_pretrained(workdir / name)
    with torch.no_grad():
        logits = lean(input_ids=input_ids, position_ids=torch.arange(SEQ).expand(BATCH, SEQ)).logits
    tokens = worker.greedy_tokens(build_cached_graph(lean)) if case.generate else None
    entry = {
        "name": name,
        "model": case.model,
        "config_dir": str(workdir / name),
        "checkpoint": str(checkpoint),
        "generate": case.generate,
        "shard_layers": case.shard_layers,
    }
    return entry, Reference(logits, tokens)


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Reference]]:
    """Run every case at TP=2 in one pair of worker processes; return their output dir and TP=1 results."""
    workdir = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    input_ids = torch.randint(0, _COMMON["vocab_size"], (BATCH, SEQ))
    torch.save(input_ids, workdir / "input_ids.pt")
    cases, expected = [], {}
    for name in AVAILABLE:
        entry, expected[name] = _reference_and_checkpoint(name, CASES[name], workdir, input_ids)
        cases.append(entry)
    job = {
        "world_size": WORLD_SIZE,
        "init_method": (workdir / "store").as_uri(),
        "input_ids": str(workdir / "input_ids.pt"),
        "out_dir": str(workdir),
        "cases": cases,
    }
    (workdir / "job.json").write_text(json.dumps(job))
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_tp_worker.py"), str(workdir / "job.json"), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return workdir, expected


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_tp1(name: str, tp_run: tuple[Path, dict[str, Reference]]) -> None:
    """Both ranks give the TP=1 logits (and greedy KV-cache tokens), with the expected nodes changed."""
    if name not in AVAILABLE:
        pytest.skip(f"{CASES[name].model} does not exist yet")
    workdir, expected = tp_run
    for rank in range(WORLD_SIZE):
        actual = torch.load(workdir / f"{name}.rank{rank}.pt", weights_only=True)
        assert actual.dtype == torch.float32
        assert_rmse_close(actual, expected[name].logits, TP_TOL, msg=f"{name} rank {rank}")
        result = json.loads((workdir / f"{name}.rank{rank}.json").read_text())
        if CASES[name].changed is None:
            assert sum(result["changed"].values()) > 0
        else:
            assert result["changed"] == CASES[name].changed
        assert result.get("tokens") == expected[name].tokens
        assert result.get("tokens_fast_path") == expected[name].tokens


def _llama_gm(**overrides: int) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    config = LlamaConfig(intermediate_size=128, **{**_COMMON, **overrides})
    lean = worker.build_lean(LLAMA, config)
    ids = torch.randint(0, config.vocab_size, (2, 4))
    gm = torch_export_to_gm(
        lean,
        kwargs={"input_ids": ids, "position_ids": torch.arange(4).expand(2, 4)},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )
    return lean, gm


def test_rank_weights_are_the_rank_slices(tmp_path: Path) -> None:
    """Rank 1 of 2 holds the second half of colwise rows / rowwise columns, read from the checkpoint."""
    lean, gm = _llama_gm()
    full = {k: v.detach().clone() for k, v in lean.state_dict().items()}
    checkpoint = tmp_path / "model.safetensors"
    save_file(full, checkpoint)
    report = apply_sharding_hints(gm, rank=1, world_size=2, group_name="unused")
    assert load_rank_weights(gm, [checkpoint], report.params) == []
    local = gm.state_dict()
    attn = "model.layers.0.self_attn."
    assert torch.equal(local[attn + "q_proj.weight"], full[attn + "q_proj.weight"][32:])
    assert torch.equal(local[attn + "k_proj.weight"], full[attn + "k_proj.weight"][16:])
    assert torch.equal(local[attn + "o_proj.weight"], full[attn + "o_proj.weight"][:, 32:])
    assert torch.equal(
        local["model.layers.1.mlp.down_proj.weight"], full["model.layers.1.mlp.down_proj.weight"][:, 64:]
    )
    assert torch.equal(local["model.norm.weight"], full["model.norm.weight"])
    views = [n for n in gm.graph.nodes if n.target == torch.ops.auto_deploy.view.default]
    assert [n.args[1][2] for n in views[:3]] == [2, 1, 1]  # q heads 4 -> 2, kv heads 2 -> 1
    # shape metadata is refreshed, so the KV cache pass allocates rank-local heads
    caches = insert_cached_attention(gm).caches
    assert [c.features for c in caches] == [(1, 16)] * 4


def test_world_size_one_changes_nothing() -> None:
    _, gm = _llama_gm()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    report = apply_sharding_hints(gm, rank=0, world_size=1)
    assert report.params == {} and gm.code == code
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_model_without_hints_is_refused() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    gm = torch_export_to_gm(Plain(), (torch.randn(2, 8),))
    with pytest.raises(ShardingError, match="no sharding hints"):
        apply_sharding_hints(gm, rank=0, world_size=2, group_name="unused")


@pytest.mark.parametrize(
    ("overrides", "world_size", "match"),
    [
        ({"num_attention_heads": 2, "num_key_value_heads": 2}, 4, "not divisible"),  # 2 query heads, 4 ranks
        ({"num_key_value_heads": 4}, 3, "cannot be split|not divisible"),  # 4 heads over 3 ranks
    ],
)
def test_indivisible_heads_are_refused(overrides: dict[str, int], world_size: int, match: str) -> None:
    _, gm = _llama_gm(**overrides)
    code = gm.code
    with pytest.raises(ShardingError, match=match):
        plan_sharding(gm, rank=0, world_size=world_size)
    assert gm.code == code  # nothing changed


def test_more_ranks_than_devices_is_refused() -> None:
    with pytest.raises(ShardingError, match="device"):
        check_devices(torch.cuda.device_count() + 1, torch.device("cuda"))
    with (
        pytest.raises(ShardingError, match="device"),
        process_group(RankInfo(0, 2, 0), "cuda", init_method="file:///nonexistent"),
    ):
        pass
    assert not torch.distributed.is_initialized()


def test_bad_rank_is_refused() -> None:
    _, gm = _llama_gm()
    with pytest.raises(OnboardlmError, match="rank 2"):
        plan_sharding(gm, rank=2, world_size=2)


def test_all_reduce_of_replicated_tensor_is_refused() -> None:
    class Replicated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.auto_deploy.torch_linear_simple(x, self.proj.weight, self.proj.bias, tp_mode="none")
            return torch.ops.auto_deploy.all_reduce(y)

    gm = torch_export_to_gm(Replicated(), (torch.randn(2, 8),))
    with pytest.raises(UnsupportedFeature, match="replicated"):
        plan_sharding(gm, rank=0, world_size=2)


def test_checkpoint_without_a_sharded_tensor_is_refused(tmp_path: Path) -> None:
    lean, gm = _llama_gm()
    full = {k: v.detach().clone() for k, v in lean.state_dict().items() if "q_proj" not in k}
    save_file(full, tmp_path / "model.safetensors")
    report = apply_sharding_hints(gm, rank=0, world_size=2, group_name="unused")
    with pytest.raises(WeightsError, match="q_proj"):
        load_rank_weights(gm, [tmp_path / "model.safetensors"], report.params)


def test_rank_environment_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert RankInfo.from_env() == RankInfo(rank=1, world_size=2, local_rank=1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ShardingError, match="not an integer"):
        RankInfo.from_env()


def _hybrid_gm(
    model_type: str, widths: dict[str, int] | None = None, **overrides: object
) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """The lean model of ``model_type``'s tiny config (``overrides``, then ``widths`` set on the tiny
    config, whose shrinking they would not survive) and its export."""
    config = _hybrid(model_type, **overrides)
    config.update(widths or {})
    name = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM"}
    name = name[model_type]
    lean = worker.build_lean(f"{_custom(model_type)}:{name}", config)
    ids = torch.randint(0, config.vocab_size, (2, 4))
    gm = torch_export_to_gm(
        lean,
        kwargs={"input_ids": ids, "position_ids": torch.arange(4).expand(2, 4)},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )
    return lean, gm


@pytest.mark.skipif(importlib.util.find_spec(_custom("mamba2")) is None, reason="no lean mamba2 file")
def test_mamba2_rank_weights_are_per_segment_slices(tmp_path: Path) -> None:
    """Rank 1 of 2: in_proj keeps the second half of each of z | x | B | C | dt, the depthwise conv
    the same channels of x | B | C, A_log / D / dt_bias the second half of the heads, the gated norm
    the second half of its channels (whole groups), out_proj the second half of its columns."""
    lean, gm = _hybrid_gm("mamba2")  # 8 heads of 16, 2 groups of state 16, inner 128
    full = {k: v.detach().clone() for k, v in lean.state_dict().items()}
    save_file(full, tmp_path / "model.safetensors")
    report = apply_sharding_hints(gm, rank=1, world_size=2, group_name="unused")
    assert load_rank_weights(gm, [tmp_path / "model.safetensors"], report.params) == []
    assert {k: report.changed[k] for k in ("conv", "ssm", "gated_norm")} == {
        "conv": 2,
        "ssm": 2,
        "gated_norm": 2,
    }
    local, mixer = gm.state_dict(), "backbone.layers.0.mixer."
    inner, heads = 128, 8
    rows = [(64, 128), (192, 256), (272, 288), (304, 320), (324, 328)]  # second halves of z, x, B, C, dt
    expected = torch.cat([full[mixer + "in_proj.weight"][a:b] for a, b in rows])
    assert torch.equal(local[mixer + "in_proj.weight"], expected)
    channels = [(64, 128), (144, 160), (176, 192)]  # x, B, C of the conv's 192 channels
    for name in ("conv1d.weight", "conv1d.bias"):
        assert torch.equal(local[mixer + name], torch.cat([full[mixer + name][a:b] for a, b in channels]))
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(local[mixer + name], full[mixer + name][heads // 2 :])
    assert torch.equal(local[mixer + "norm.weight"], full[mixer + "norm.weight"][inner // 2 :])
    assert torch.equal(local[mixer + "out_proj.weight"], full[mixer + "out_proj.weight"][:, inner // 2 :])
    # shape metadata is refreshed: the state caches hold this rank's channels and heads
    caches = {c.name: c.features for c in insert_cached_attention(gm).caches}
    assert caches["conv_state_0"] == (3, 96) and caches["ssm_state_0"] == (4, 16, 16)


@pytest.mark.skipif(importlib.util.find_spec(_custom("mamba2")) is None, reason="no lean mamba2 file")
def test_mamba2_one_group_is_kept_whole_on_every_rank(tmp_path: Path) -> None:
    """n_groups 1 over two ranks: rank 1 keeps the second half of z | x | dt and of the heads, but the
    whole B and C rows of in_proj and their conv channels; the gated norm's one group spans both ranks,
    so its sum of squares is all-reduced."""
    lean, gm = _hybrid_gm("mamba2", n_groups=1)  # 8 heads of 16, 1 group of state 16, inner 128
    full = {k: v.detach().clone() for k, v in lean.state_dict().items()}
    save_file(full, tmp_path / "model.safetensors")
    report = apply_sharding_hints(gm, rank=1, world_size=2, group_name="unused")
    assert load_rank_weights(gm, [tmp_path / "model.safetensors"], report.params) == []
    local, mixer = gm.state_dict(), "backbone.layers.0.mixer."
    rows = [(64, 128), (192, 256), (256, 272), (272, 288), (292, 296)]  # z, x halves; B, C whole; dt half
    expected = torch.cat([full[mixer + "in_proj.weight"][a:b] for a, b in rows])
    assert torch.equal(local[mixer + "in_proj.weight"], expected)
    channels = [(64, 128), (128, 144), (144, 160)]  # x half, B and C whole, of the conv's 160 channels
    for name in ("conv1d.weight", "conv1d.bias"):
        assert torch.equal(local[mixer + name], torch.cat([full[mixer + name][a:b] for a, b in channels]))
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(local[mixer + name], full[mixer + name][4:])
    assert torch.equal(local[mixer + "norm.weight"], full[mixer + "norm.weight"][64:])
    reduces = [n for n in gm.graph.nodes if n.target == torch.ops._c10d_functional.all_reduce.default]
    squares = [n for n in reduces if n.args[0].target == torch.ops.aten.sum.dim_IntList]
    assert len(reduces) == 4 and len(squares) == 2  # per layer: out_proj's output, the norm's squares
    caches = {c.name: c.features for c in insert_cached_attention(gm).caches}
    assert caches["conv_state_0"] == (3, 96) and caches["ssm_state_0"] == (4, 16, 16)


def test_groups_fewer_than_ranks_keep_the_group_their_heads_read() -> None:
    """n_groups 2 over four ranks: ranks 2 and 3 read group 1, so rank 2 keeps B's and C's second group
    whole (in in_proj and in the conv), a quarter of z | x | dt, and its norm group spans ranks 2-3."""
    _, gm = _hybrid_gm("mamba2", n_groups=2)  # in_proj rows: z 128 | x 128 | B 32 | C 32 | dt 8
    plan = plan_sharding(gm, rank=2, world_size=4)
    mixer = "backbone.layers.0.mixer."
    assert plan.report.params[mixer + "in_proj.weight"] == ParamShard(
        0, ((64, 96), (192, 224), (272, 288), (304, 320), (324, 326))
    )
    assert plan.report.params[mixer + "conv1d.weight"] == ParamShard(0, ((64, 96), (144, 160), (176, 192)))
    assert plan.report.params[mixer + "A_log"] == ParamShard(0, ((4, 6),))
    norms = [(node.name, slot, slots) for node, slot, slots in plan.spanning_norms]
    assert [(slot, slots) for _, slot, slots in norms] == [(1, 2), (1, 2)]


@pytest.mark.skipif(importlib.util.find_spec(_custom("mamba2")) is None, reason="no lean mamba2 file")
def test_mamba2_groups_neither_dividing_nor_divided_are_refused() -> None:
    """3 B/C groups over 2 ranks: neither splits the groups nor gives each rank's heads one group."""
    _, gm = _hybrid_gm("mamba2", {"hidden_size": 48, "num_heads": 12, "head_dim": 8, "n_groups": 3})
    code = gm.code
    with pytest.raises(ShardingError, match="12 heads in 3 B/C groups cannot be split over world size 2"):
        plan_sharding(gm, rank=0, world_size=2)
    assert gm.code == code


@pytest.mark.skipif(importlib.util.find_spec(_custom("mamba")) is None, reason="no lean mamba file")
def test_mamba1_rank_weights_are_channel_slices(tmp_path: Path) -> None:
    """Rank 1 of 2 (Mamba1, inner 128, state 16, dt rank 8): in_proj keeps the second half of x and of
    z, the conv, dt_proj (weight and bias), A_log and D the second half of the channels, x_proj and
    out_proj the second half of their columns."""
    lean, gm = _hybrid_gm("mamba")
    full = {k: v.detach().clone() for k, v in lean.state_dict().items()}
    # the tied LM head saved once, as the input embedding (as transformers saves it); the graph holds it
    # as lm_head.weight, found through the lean model's other name for it
    save_file({k: v for k, v in full.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
    report = apply_sharding_hints(gm, rank=1, world_size=2, group_name="unused")
    aliases = tied_names(lean)
    assert load_rank_weights(gm, [tmp_path / "model.safetensors"], report.params, aliases) == []
    local, mixer = gm.state_dict(), "backbone.layers.0.mixer."
    expected = torch.cat([full[mixer + "in_proj.weight"][64:128], full[mixer + "in_proj.weight"][192:]])
    assert torch.equal(local[mixer + "in_proj.weight"], expected)
    for name in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
        assert torch.equal(local[mixer + name], full[mixer + name][64:]), name
    for name in ("x_proj.weight", "out_proj.weight"):
        assert torch.equal(local[mixer + name], full[mixer + name][:, 64:]), name
    assert torch.equal(local["lm_head.weight"], full["backbone.embeddings.weight"])
    # the state caches hold this rank's channels: 64 conv channels, 16 x 64 scan heads of one entry
    caches = {c.name: c.features for c in insert_cached_attention(gm).caches}
    assert caches["conv_state_0"] == (3, 64) and caches["ssm_state_0"] == (1024, 1, 1)


@pytest.mark.skipif(importlib.util.find_spec(_custom("qwen3_5_text")) is None, reason="no lean qwen3_5_text")
def test_gated_delta_rank_weights_and_indivisible_heads() -> None:
    """Qwen3.5's separate in_proj_qkv / z / b / a are cut per head; 2 key heads do not split over 4 ranks."""
    _, gm = _hybrid_gm("qwen3_5_text")
    report = plan_sharding(gm, rank=1, world_size=2).report
    assert report.changed["delta"] == 1 and report.changed["conv"] == 1
    layer = "model.layers.0.linear_attn."
    assert report.params[layer + "A_log"] == ParamShard(0, ((2, 4),))
    assert report.params[layer + "conv1d.weight"] == ParamShard(0, ((16, 32), (48, 64), (96, 128)))
    with pytest.raises(ShardingError, match="2 key heads cannot be split over world size 4"):
        plan_sharding(gm, rank=0, world_size=4)
