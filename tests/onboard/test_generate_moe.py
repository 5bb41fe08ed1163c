"""Generated MoE / MLA model files against transformers: full-model logits and the model-file review rules.

For each architecture the transformers default config is analyzed and the model file generated,
written to a temporary folder and imported; the lean and the HF model (eager attention) are built on
one tiny config (dense and MoE layers, MLA ranks, sliding layers kept), the HF state dict goes into
the lean model through the real loading path (packed experts through the load hook, strict), and the
fp32 logits must match (RMSE ratio <= 0.05). The generated MLA and GPT-OSS files also run with the
runtime's KV cache (prefill + decode) exactly like a full forward.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.generate import generate_model_file, ruff_command
from onboardlm.review import review_model_file
from onboardlm.review.catalog import RULES
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights

MOE_ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss"]
MODEL_FILE_GROUPS = ("B", "BA", "C", "CA", "D", "A")
MODEL_FILE_RULES = [rule.id for rule in RULES if rule.group in MODEL_FILE_GROUPS]
LOGITS_TOL = 0.05

Generated = tuple[Path, ModuleType, PretrainedConfig]


def _import_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Generated]:
    """``generated(model_type)``: the file generated from the default config, imported (once per type)."""
    folder = tmp_path_factory.mktemp("generated_moe")

    @functools.cache
    def generate(model_type: str) -> Generated:
        config = AutoConfig.for_model(model_type)
        path = folder / f"modeling_{model_type}.py"
        path.write_text(generate_model_file(analyze(config)))
        return path, _import_file(path), config

    return generate


def _compare_logits(lean_module: ModuleType, tiny: PretrainedConfig, msg: str) -> None:
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager").eval()
    with torch.no_grad():  # large enough weights that routing decisions and experts matter
        for name, param in reference.named_parameters():
            if "norm" not in name and "embed" not in name:
                param.normal_(0.0, 0.1)
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.2)
    lean = getattr(lean_module, type(reference).__name__)(tiny).eval()
    transfer_weights(reference, lean)
    batch, seq = 2, 20  # longer than the tiny sliding window (8)
    input_ids = torch.randint(0, tiny.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids).logits
        actual = lean(input_ids=input_ids, position_ids=position_ids).logits
    assert actual.dtype == torch.float32
    assert_rmse_close(actual, expected, LOGITS_TOL, msg=msg)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_generated_moe_model_matches_transformers_and_passes_review(
    model_type: str, generated: Callable[[str], Generated]
) -> None:
    path, lean_module, config = generated(model_type)
    _compare_logits(lean_module, tiny_config(config), f"{model_type} logits")
    report = review_model_file(path, None, rule_ids=MODEL_FILE_RULES)
    assert report.passed, [f"{f.rule_id} {f.location}: {f.reason}" for f in report.failures]


def test_generated_qwen3_moe_builds_dense_layers_of_other_configs(
    generated: Callable[[str], Generated],
) -> None:
    """The default Qwen3-MoE config has no dense layer; a checkpoint with ``mlp_only_layers`` still works."""
    _, lean_module, config = generated("qwen3_moe")
    tiny = tiny_config(config)
    tiny.mlp_only_layers = [0]
    _compare_logits(lean_module, tiny, "qwen3_moe with a dense layer 0")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss"])  # latent cache; sinks + sliding window
def test_generated_model_decodes_with_the_kv_cache_like_a_full_forward(
    model_type: str, generated: Callable[[str], Generated]
) -> None:
    """Exported with the runtime's KV cache: prefill, then one-token decode steps, give the full-forward logits."""
    _, lean_module, config = generated(model_type)
    tiny = tiny_config(config)
    torch.manual_seed(0)
    model = getattr(lean_module, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(tiny).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.1)
    batch, prompt, total = 2, 9, 13  # decode past the tiny sliding window (8)
    input_ids = torch.randint(0, tiny.vocab_size, (batch, total), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids, torch.arange(total)[None].expand(batch, total)).logits
    graph = build_cached_graph(model)
    cached = CachedModel(graph, KVCache.allocate(graph.caches, batch, 32, "cpu"))
    assert_rmse_close(
        cached.prefill(input_ids[:, :prompt].tolist(), total - prompt), full[:, prompt - 1], 1e-3
    )
    for step in range(prompt, total):
        assert_rmse_close(cached.decode(input_ids[:, step]), full[:, step], 1e-3, msg=f"decode step {step}")


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_generated_moe_source_is_ruff_clean(model_type: str, generated: Callable[[str], Generated]) -> None:
    path, _, _ = generated(model_type)
    ruff = ruff_command()
    assert ruff is not None, "ruff is a dependency of onboardlm (the generator formats with it)"
    for args in (
        ["check", "--isolated", "--select", "E,F,W,I,B,UP,SIM", "--ignore", "E501"],
        ["format", "--check"],
    ):
        done = subprocess.run(
            [*ruff, *args, "--line-length", "110", str(path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
