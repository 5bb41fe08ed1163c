"""BA1 builds the model on a tiny config and loads a reference strictly; BA2/H1 see packed experts."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.review import ReviewInputError, Status, review_model_file
from onboardlm.testing import tiny_config

LAYERNORM = "post_attention_layernorm"
BAD_SPLIT = "gate, up = gate_up.chunk(2, dim=1)"


@pytest.fixture(scope="module")
def llama_keys() -> list[str]:
    """The keys of transformers' Llama with a full layer count (BA1 compares them as patterns)."""
    config = tiny_config(LlamaConfig())
    config.num_hidden_layers = 5
    return list(LlamaForCausalLM(config).state_dict())


def test_renamed_module_fails_ba1_at_its_assignment(files, edit, review_rule, lines_failed) -> None:
    edited = edit(files.llama, (LAYERNORM, "post_attn_norm"))
    report = review_rule("BA1", edited.path)
    assert lines_failed(report, "BA1") == [edited.line_of("self.post_attn_norm =")]
    reason = report.failures[0].reason
    assert "missing keys" in reason and "post_attn_norm" in reason and "unexpected keys" in reason


def test_reference_model_type_is_loaded_instead(files, review_rule) -> None:
    assert review_rule("BA1", files.llama, reference="mistral").passed
    report = review_rule("BA1", files.llama, reference="qwen3")
    assert report.result("BA1").status is Status.FAIL and "q_norm" in report.failures[0].reason


def test_checkpoint_keys_from_a_list_or_an_index(files, review_rule, tmp_path, llama_keys) -> None:
    as_list, as_index = tmp_path / "keys.json", tmp_path / "model.safetensors.index.json"
    as_list.write_text(json.dumps(llama_keys))
    as_index.write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(llama_keys, "model.safetensors")})
    )
    assert review_rule("BA1", files.llama, checkpoint_keys=as_list).passed
    assert review_rule("BA1", files.llama, checkpoint_keys=as_index).passed

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([*llama_keys, "model.layers.0.self_attn.q_norm.weight"]))
    report = review_rule("BA1", files.llama, checkpoint_keys=extra)
    assert (
        report.result("BA1").status is Status.FAIL
        and "model.layers.*.self_attn.q_norm.weight" in report.failures[0].reason
    )


def test_tied_lm_head_may_be_absent_from_the_checkpoint(files, review_rule, tmp_path, llama_keys) -> None:
    keys = tmp_path / "tied.json"
    keys.write_text(json.dumps([k for k in llama_keys if k != "lm_head.weight"]))
    assert review_rule("BA1", files.llama, checkpoint_keys=keys).passed


def test_bundled_config_needs_a_reference_for_ba1(files, edit, review_rule) -> None:
    bundled = (
        "from transformers import AutoConfig, LlamaConfig\n\n\n"
        "class TinyLlamaLikeConfig(LlamaConfig):\n    model_type = 'tiny_llama_like'\n\n\n"
        "AutoConfig.register('tiny_llama_like', TinyLlamaLikeConfig, exist_ok=True)\n"
    )
    edited = edit(
        files.llama,
        ("from transformers import LlamaConfig\n", bundled),
        ('register_custom_model_cls("LlamaConfig"', 'register_custom_model_cls("TinyLlamaLikeConfig"'),
        ("config_class = LlamaConfig", "config_class = TinyLlamaLikeConfig"),
    )
    report = review_rule({"B3", "BA1"}, edited.path)
    assert report.result("B3").status is Status.PASS
    assert "give --checkpoint-keys" in report.failures[0].reason
    assert review_rule("BA1", edited.path, reference="llama").passed
    assert "tiny_llama_like" not in CONFIG_MAPPING  # the file's AutoConfig.register was undone


def test_file_that_cannot_be_imported_fails_ba1(files, edit, review_rule) -> None:
    edited = edit(
        files.llama,
        (
            "import onboardlm.ops  #",
            "from .modeling_mistral import MistralMLP  # noqa: F401\nimport onboardlm.ops  #",
        ),
    )
    report = review_rule("BA1", edited.path)
    assert (
        report.result("BA1").status is Status.FAIL
        and "importing the model file failed" in report.failures[0].reason
    )


def test_reviewing_a_copy_keeps_the_registered_model(files, edit, review_rule) -> None:
    registered = AutoModelForCausalLMFactory.custom_model_cls(LlamaConfig())
    edited = edit(files.llama, (LAYERNORM, "post_attn_norm"))
    review_rule("BA1", edited.path)
    assert AutoModelForCausalLMFactory.custom_model_cls(LlamaConfig()) is registered


def test_packed_experts_load_through_the_hook(files, review_rule) -> None:
    report = review_rule({"BA1", "BA2", "H1"}, files.moe)
    assert report.passed, report.failures
    assert "reference packs" in report.result("BA2").findings[0].reason


def test_a_hook_that_unpacks_wrongly_fails_ba1_ba2_and_h1(files, edit, review_rule, lines_failed) -> None:
    edited = edit(files.moe, (BAD_SPLIT, "gate, up = gate_up.chunk(2, dim=2)"))
    report = review_rule({"BA1", "BA2", "H1"}, edited.path)
    assert {f.rule_id for f in report.failures} == {"BA1", "BA2", "H1"}
    assert lines_failed(report, "BA2") == [edited.line_of("def _unpack_experts")]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reference": "no_such_model"}, "not a model_type known to transformers"),
        ({"reference": "llama", "checkpoint_keys": "keys.json"}, "not both"),
        ({"checkpoint_keys": "missing.json"}, "does not exist"),
    ],
)
def test_bad_reference_options_are_refused(files, tmp_path, options, message) -> None:
    if "checkpoint_keys" in options:
        options = {**options, "checkpoint_keys": tmp_path / options["checkpoint_keys"]}
    with pytest.raises(ReviewInputError, match=message):
        review_model_file(files.llama, **options)


def test_malformed_checkpoint_keys_are_refused(files, tmp_path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"weights": 3}')
    with pytest.raises(ReviewInputError, match="weight_map"):
        review_model_file(files.llama, checkpoint_keys=keys)


def test_ba1_builds_the_config_being_onboarded(files, review_rule) -> None:
    """A tiny copy of the given config (biased projections here), not of the class defaults."""
    config = LlamaConfig(attention_bias=True, mlp_bias=True)
    expected = len(LlamaForCausalLM(tiny_config(config)).state_dict())
    default = review_rule("BA1", files.llama).result("BA1").findings[0].reason
    given = review_rule("BA1", files.llama, config=config).result("BA1")
    assert given.status is Status.PASS
    assert f"{expected} tensors" in given.findings[0].reason and f"{expected} tensors" not in default
