"""Multimodal checkpoints onboard their text decoder; the vision and audio towers stay out.

The reference is the multimodal model itself: transformers' ``AutoModelForImageTextToText`` saved
with its own ``save_pretrained`` (the hub layout: ``language_model.model.*`` beside
``vision_tower.*``), run on text-only input. The lean text model read out of that checkpoint must
give its logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig
from typer.testing import CliRunner

from onboardlm.cli import app
from onboardlm.errors import ModelSourceError, UnsupportedFeature, WeightsError
from onboardlm.models.factory import AutoModelForCausalLMFactory, LoadReport
from onboardlm.models.source import resolve_model_source
from onboardlm.models.text_weights import measure_prefixes
from onboardlm.onboard.e2e import lean_module_registered
from onboardlm.onboard.resolve import resolve
from onboardlm.testing.checkpoints import word_tokenizer
from onboardlm.testing.tiny_config import tiny_config

#: Vision-tower fields shrunk for a tiny multimodal checkpoint (whichever the vision config has).
_SMALL_TOWER = {
    "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
    "head_dim": 16, "num_key_value_heads": 2,
}  # fmt: skip
_WORDS = ["the", "capital", "of", "iceland", "is", "where", "what", "how", "a", "an", "and", "to", "in"]


def tiny_multimodal_config(model_type: str) -> PretrainedConfig:
    """``model_type``'s default config with a tiny text decoder and a one-layer vision tower."""
    config = AutoConfig.for_model(model_type)
    text = config.get_text_config()
    text_field = next(name for name in type(config).sub_configs if getattr(config, name) is text)
    setattr(config, text_field, tiny_config(text))
    for name in type(config).sub_configs:
        tower = getattr(config, name)
        if name != text_field and tower is not None:
            for field, value in _SMALL_TOWER.items():
                if hasattr(tower, field):
                    setattr(tower, field, value)
    return config


def save_tiny_multimodal(model_type: str, directory: Path, tokenizer: bool = True) -> torch.nn.Module:
    """Save a random tiny multimodal model of ``model_type`` (and a word tokenizer); return the model."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_multimodal_config(model_type)).eval()
    model.save_pretrained(directory)
    if tokenizer:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(_WORDS)}}
        word_tokenizer(vocab).save_pretrained(directory)
    return model


def assert_text_logits_equal(directory: Path, reference: torch.nn.Module) -> LoadReport:
    """The lean model loaded from the multimodal checkpoint in ``directory`` gives the multimodal
    model's logits on text-only input."""
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    lean, report = AutoModelForCausalLMFactory(str(directory)).build_and_load(dtype=torch.float32)
    assert report.is_custom, report
    with torch.no_grad():
        actual = lean(input_ids=ids, position_ids=torch.arange(9).expand(2, 9)).logits
    assert "vision/audio tower tensor(s) not loaded" in report.notes[0], report.notes
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    return report


# --------------------------------------------------------------------------------------------------
# Onboarding


@pytest.mark.parametrize(("model_type", "text_type"), [("gemma3", "gemma3_text"), ("mistral3", "mistral")])
def test_multimodal_checkpoint_onboards_its_text_decoder(
    tmp_path: Path, model_type: str, text_type: str
) -> None:
    directory, out = tmp_path / "checkpoint", tmp_path / "out"
    reference = save_tiny_multimodal(model_type, directory)
    result = CliRunner().invoke(app, ["onboard", str(directory), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scope = f"text decoder of {model_type}; vision/audio towers not onboarded"
    assert f"({text_type}, {scope})" in " ".join(result.output.split())
    report = json.loads((out / "report.json").read_text())
    assert (report["status"], report["model_type"], report["text_decoder_of"]) == (
        "pass",
        text_type,
        model_type,
    )
    phases = {phase["name"]: phase for phase in report["phases"]}
    assert scope in phases["resolve"]["summary"]
    assert phases["e2e"]["status"] == "pass"  # the runtime read the text decoder out of the checkpoint
    assert f"- scope: {scope}" in (out / "report.md").read_text()
    with lean_module_registered(out / f"modeling_{text_type}.py"):  # the generated file, not the shipped
        assert_text_logits_equal(directory, reference)


def test_bare_multimodal_model_type_onboards_its_text_decoder(tmp_path: Path) -> None:
    from onboardlm.onboard.pipeline import OnboardOptions, onboard

    result = onboard("gemma3", OnboardOptions(out_dir=tmp_path / "gemma3"))
    assert result.status == "pass", [(r.name, r.summary) for r in result.phases]
    assert (result.model, result.model_type, result.text_decoder_of) == ("gemma3", "gemma3_text", "gemma3")
    assert (tmp_path / "gemma3" / "modeling_gemma3_text.py").is_file()


# --------------------------------------------------------------------------------------------------
# Resolve: which text decoders, and which refusals


def test_resolve_swaps_in_the_text_config() -> None:
    resolved = resolve("llama4")
    assert (resolved.model_type, resolved.causal_lm_class) == ("llama4_text", "Llama4ForCausalLM")
    assert resolved.source.multimodal is not None and resolved.source.multimodal.model_type == "llama4"
    assert resolved.source.notes[-2:] == [
        "text decoder of llama4; vision/audio towers not onboarded",
        "text-only path equals llama4_text's (relative error 0, tiny config)",
    ]


def test_text_decoder_ties_embeddings_as_the_multimodal_model_does() -> None:
    config = AutoConfig.for_model("mistral3")  # ties at the top level, its text_config does not
    assert config.tie_word_embeddings and not config.text_config.tie_word_embeddings
    source = resolve_model_source(config)
    assert source.config.tie_word_embeddings and not config.text_config.tie_word_embeddings  # a copy


@pytest.mark.parametrize(
    ("model_type", "text_type"), [("mllama", "mllama_text_model"), ("qwen2_vl", "qwen2_vl_text")]
)
def test_text_decoder_without_a_causal_lm_class_is_refused(model_type: str, text_type: str) -> None:
    with pytest.raises(ModelSourceError) as caught:
        resolve(model_type)
    message = str(caught.value)
    assert message.startswith(f"{model_type}: {model_type} is multimodal and its text decoder {text_type} ")
    assert "has no causal-LM class in transformers" in message and "\n" not in message


def test_a_text_path_of_its_own_is_refused() -> None:
    """Cohere2-Vision's text path leaves out its decoder's logit scale: measured, then refused."""
    with pytest.raises(UnsupportedFeature) as caught:
        resolve("cohere2_vision")
    message = str(caught.value)
    assert "cohere2_vision runs text alone differently from its text decoder cohere2" in message
    assert "\n" not in message


def test_a_text_decoder_that_is_not_causal_is_refused() -> None:
    """PaliGemma's Gemma attends to the whole prompt (use_bidirectional_attention)."""
    with pytest.raises(UnsupportedFeature, match="the text decoder of paligemma, gemma, is not causal"):
        resolve("paligemma")


# --------------------------------------------------------------------------------------------------
# Weights: prefixes measured from names and shapes, the text part checked strictly


def test_prefixes_are_measured_in_either_layout() -> None:
    model = {"model.embed.weight": (10, 4), "model.layers.0.proj.weight": (4, 4), "lm_head.weight": (10, 4)}
    tower = {"vision_tower.layers.0.proj.weight": (8, 8)}
    hub = {"language_model.model.embed.weight": (10, 4), "language_model.model.layers.0.proj.weight": (4, 4)}
    hub["language_model.lm_head.weight"] = (10, 4)
    prefixes = measure_prefixes({**hub, **tower}, model, "ckpt")
    assert prefixes.pairs == (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model."))
    modules = {
        "model.language_model.embed.weight": (10, 4),
        "model.language_model.layers.0.proj.weight": (4, 4),
    }
    prefixes = measure_prefixes({**modules, "model.vision_tower.x": (1,)}, model, "ckpt")  # tied head
    assert prefixes.pairs == (("model.language_model.", "model."),)
    assert prefixes.rename("model.vision_tower.x") is None
    assert prefixes.rename("model.language_model.embed.weight") == "model.embed.weight"


def test_two_equally_good_prefixes_are_refused() -> None:
    model = {"model.layers.0.proj.weight": (4, 4)}
    checkpoint = {"text.layers.0.proj.weight": (4, 4), "audio.layers.0.proj.weight": (4, 4)}
    with pytest.raises(WeightsError, match="fit two checkpoint prefixes equally well"):
        measure_prefixes(checkpoint, model, "ckpt")


def test_text_part_is_loaded_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_multimodal_config("gemma3"))
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"unexpected keys \['model\.layers\.0\.extra\.weight'\]"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load(dtype=torch.float32)
    del tensors["language_model.model.layers.0.extra.weight"], tensors["language_model.model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"missing keys \['model\.norm\.weight'\]"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load(dtype=torch.float32)


def test_a_renamed_text_part_loads_through_transformers_conversion(tmp_path: Path) -> None:
    """Kimi-K2.5 saves its DeepSeek-V3 decoder's ``layers`` as ``blocks``: no prefix maps that, so the
    multimodal model is loaded by transformers (its conversion mapping applied) and the decoder cut out."""
    reference = save_tiny_multimodal("kimi_k25", tmp_path, tokenizer=False)
    report = assert_text_logits_equal(tmp_path, reference)
    assert report.model_class == "DeepseekV3ForCausalLM"
    assert "keys converted by transformers' checkpoint conversion mapping" in report.notes
