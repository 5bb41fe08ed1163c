"""``onboardlm debug accuracy``: planted bugs are found and named, a correct port passes.

The model is a 2-layer random Llama saved with a word-level tokenizer (milliseconds to build). Bug one:
an epsilon changed in one layer's norm (on the loaded lean model, and in an out-of-tree copy of the
lean file given with ``--custom-model-dir``); bug two: a transform that drops the attention scale.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule
from typer.testing import CliRunner

import onboardlm.models.custom
from onboardlm.cli import app
from onboardlm.debug.accuracy import compare_with_reference, input_ids_for, load_pair
from onboardlm.debug.stages import STAGES, _fusion
from onboardlm.debug.transform_bisect import ShardJob, bisect_transforms
from onboardlm.testing.checkpoints import save_tiny_llama, word_tokenizer

PROMPT = "hi there hi hi there there hi there"
LEAN_LLAMA = Path(onboardlm.models.custom.__file__).parent / "modeling_llama.py"
NORM_LINE = "self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = word_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4})
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


def test_a_correct_port_is_within_tolerance_everywhere(tiny: Path) -> None:
    pair = load_pair(str(tiny), torch.float32)
    ids, _ = input_ids_for(pair.factory, PROMPT)
    modules, lean_logits, ref_logits, only_lean, only_ref = compare_with_reference(
        pair.lean, pair.reference, ids, 1e-5
    )
    names = [m.name for m in modules]
    assert (
        names.index("model.layers.0") < names.index("model.layers.1.input_layernorm") < names.index("model")
    )
    assert "model.layers.1.self_attn" in names and "model.layers.1.mlp" in names
    assert not any(m.past_tolerance for m in modules)
    assert torch.equal(lean_logits.argmax(-1), ref_logits.argmax(-1))
    assert only_lean == [] and only_ref == []


def test_an_epsilon_changed_in_one_layer_norm_is_found(tiny: Path) -> None:
    pair = load_pair(str(tiny), torch.float32)
    pair.lean.model.layers[1].post_attention_layernorm.variance_epsilon = 1e-2  # the planted bug
    ids, _ = input_ids_for(pair.factory, PROMPT)
    modules, *_ = compare_with_reference(pair.lean, pair.reference, ids, 1e-5)
    past = [m.name for m in modules if m.past_tolerance]
    assert past[0] == "model.layers.1.post_attention_layernorm"
    assert "model.layers.1" in past and "model.layers.0" not in past


def _planted_model_dir(root: Path) -> Path:
    folder = root / "my_models"
    folder.mkdir()
    text = LEAN_LLAMA.read_text()
    assert NORM_LINE in text
    planted = NORM_LINE.replace("config.rms_norm_eps)", "config.rms_norm_eps if layer_idx != 1 else 1e-2)")
    (folder / "modeling_llama.py").write_text(text.replace(NORM_LINE, planted))
    return folder


def test_the_cli_names_the_planted_module_of_an_out_of_tree_model(tiny: Path, tmp_path: Path) -> None:
    folder = _planted_model_dir(tmp_path)
    result = runner.invoke(
        app, ["debug", "accuracy", str(tiny), "-p", PROMPT, "--custom-model-dir", str(folder)]
    )
    assert result.exit_code == 1, result.output
    assert "first module past tolerance: model.layers.1.post_attention_layernorm" in result.output
    assert "onboardlm_custom_my_models_modeling_llama.LlamaForCausalLM" in result.output


def test_the_cli_passes_a_correct_port(tiny: Path) -> None:
    result = runner.invoke(app, ["debug", "accuracy", str(tiny), "-p", PROMPT])
    assert result.exit_code == 0, result.output
    assert "every module within tolerance 1e-05" in result.output
    assert "greedy top-1 agreement 100.0% of 8 positions" in result.output


def _fusion_dropping_the_attention_scale(gm: GraphModule) -> None:
    """The fusion stage, plus a planted bug: every cached attention loses its 1/sqrt(d) scale."""
    _fusion(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function" and "cached_attention" in str(node.target) and "scale" in node.kwargs:
            node.kwargs = {**node.kwargs, "scale": 1.0}
    gm.recompile()


def test_a_transform_that_drops_a_scale_is_named(tiny: Path) -> None:
    pair = load_pair(str(tiny), torch.float32)
    ids, _ = input_ids_for(pair.factory, PROMPT)
    stages = [
        replace(s, apply=_fusion_dropping_the_attention_scale) if s.name == "fusion" else s for s in STAGES
    ]
    results = bisect_transforms(pair.lean, ids, 1e-5, stages=stages)
    past = [r.name for r in results if r.past_tolerance]
    assert past and past[0] == "fusion", results
    assert [r.name for r in results][:3] == ["export", "kv_cache", "fold_weights"]
    assert results[-1].name == "sharding" and results[-1].note == "skipped"


@pytest.mark.slow  # two worker processes over gloo: about 20 s of CPU
def test_every_transform_and_two_rank_sharding_keep_the_logits(tiny: Path) -> None:
    pair = load_pair(str(tiny), torch.float32)
    ids, _ = input_ids_for(pair.factory, PROMPT)
    results = bisect_transforms(pair.lean, ids, 1e-5, shard_job=ShardJob(str(tiny), None, "float32"))
    assert [r.name for r in results] == [
        "export", "kv_cache", "fold_weights", "fused_linears", "fusion", "kernels", "sharding"
    ]  # fmt: skip
    assert all(r.ratio is not None and not r.past_tolerance for r in results), results


def test_a_model_without_a_lean_class_is_refused() -> None:
    result = runner.invoke(app, ["debug", "accuracy", "dbrx"])
    assert result.exit_code == 2
    assert "no lean model is registered for DbrxConfig" in result.output


def test_a_model_that_two_ranks_cannot_split_skips_the_sharding_stage(tmp_path: Path) -> None:
    tokenizer = word_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4})
    model = save_tiny_llama(tmp_path, tokenizer, hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    pair = load_pair(str(model), torch.float32)
    ids, _ = input_ids_for(pair.factory, PROMPT)
    results = bisect_transforms(
        pair.lean, ids, 1e-5, stages=(), shard_job=ShardJob(str(model), None, "float32")
    )
    sharding = results[-1]
    assert sharding.name == "sharding" and sharding.ratio is None and not sharding.past_tolerance
    assert sharding.note.startswith("skipped: ") and "cannot be split over world size 2" in sharding.note
