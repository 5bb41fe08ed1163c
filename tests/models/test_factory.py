"""AutoModelForCausalLMFactory: registration, config overrides, devices, dtypes and weight loading."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from onboardlm.errors import ModelSourceError, WeightsError
from onboardlm.models.custom.modeling_llama import LlamaForCausalLM as LeanLlama
from onboardlm.models.factory import AutoModelForCausalLMFactory, load_checkpoint_into
from onboardlm.testing import tiny_config


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


@pytest.fixture(scope="module")
def hf_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids).logits


INPUT_IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


class ToyConfig(PretrainedConfig):
    model_type = "onboardlm_toy"


class ToyModel(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(4, 4)


def test_registered_custom_class_is_built() -> None:
    AutoModelForCausalLMFactory.register_custom_model_cls("ToyConfig", ToyModel)
    try:
        factory = AutoModelForCausalLMFactory(ToyConfig())
        assert factory.model_class() == (ToyModel, True)
        assert isinstance(factory.build_model(), ToyModel)
    finally:
        del AutoModelForCausalLMFactory._custom_model_mapping["ToyConfig"]


def test_user_registration_before_first_use_outlives_the_shipped_models() -> None:
    """Registering before onboardlm.models.custom was ever imported must not be undone by that import."""
    script = (
        "import torch\n"
        "from onboardlm.models.factory import AutoModelForCausalLMFactory as F\n"
        "class Mine(torch.nn.Module): pass\n"
        "F.register_custom_model_cls('LlamaConfig', Mine)\n"
        "from transformers import LlamaConfig\n"
        "print(F.custom_model_cls(LlamaConfig()).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "Mine"


def test_llama_config_maps_to_the_lean_llama() -> None:
    assert AutoModelForCausalLMFactory(tiny_llama_config()).model_class() == (LeanLlama, True)


def test_unregistered_config_falls_back_to_transformers_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # JetMoE has no lean model (onboard refuses its mixture-of-attention experts).
    factory = AutoModelForCausalLMFactory(tiny_config(AutoConfig.for_model("jetmoe")))
    with caplog.at_level(logging.INFO, logger="onboardlm.models.factory"):
        model, report = factory.build_and_load()
    assert type(model).__name__ == "JetMoeForCausalLM"
    assert not report.is_custom and report.weights_source == "random"
    assert "no custom model registered for JetMoeConfig" in caplog.text


def test_model_kwargs_override_a_copy_of_the_config() -> None:
    config = tiny_llama_config(num_hidden_layers=3)
    factory = AutoModelForCausalLMFactory(
        config, {"num_hidden_layers": 1, "rope_parameters": {"rope_theta": 500.0}}
    )
    model = factory.build_model()
    assert len(model.model.layers) == 1
    assert factory.config.rope_parameters["rope_theta"] == 500.0
    assert factory.config.rope_parameters["rope_type"] == "default"  # dict fields merge
    assert config.num_hidden_layers == 3


def test_unknown_model_kwarg_is_refused_by_name() -> None:
    with pytest.raises(ModelSourceError, match="num_hiden_layers"):
        _ = AutoModelForCausalLMFactory(tiny_llama_config(), {"num_hiden_layers": 1}).config


def test_meta_build_has_the_reference_parameter_count(hf_llama: LlamaForCausalLM) -> None:
    model = AutoModelForCausalLMFactory(tiny_llama_config()).build_model(device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf_llama.parameters())


def test_dtype_applies_to_parameters_but_rope_frequencies_stay_fp32() -> None:
    model = AutoModelForCausalLMFactory(tiny_llama_config()).build_model(dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb._ad_inv_freq.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("shard_size", [None, "60KB"], ids=["single", "sharded"])
def test_safetensors_checkpoint_loads_and_matches_transformers(
    tmp_path: Path, hf_llama: LlamaForCausalLM, shard_size: str | None
) -> None:
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    hf_llama.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard_size)
    model, report = AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()
    assert report.is_custom and report.num_tensors == len(hf_llama.state_dict())
    torch.testing.assert_close(
        logits_of(model, INPUT_IDS), logits_of(hf_llama, INPUT_IDS), rtol=1e-4, atol=1e-4
    )


def test_tied_embeddings_load_without_lm_head_key(tmp_path: Path) -> None:
    hf = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model, report = AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()
    assert report.tied_keys == ["lm_head.weight"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits_of(model, INPUT_IDS), logits_of(hf, INPUT_IDS), rtol=1e-4, atol=1e-4)


def test_key_mismatch_names_every_missing_and_unexpected_key(
    tmp_path: Path, hf_llama: LlamaForCausalLM
) -> None:
    hf_llama.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as info:
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()
    message = str(info.value)
    assert str(file) in message
    assert "missing keys ['model.layers.1.mlp.up_proj.weight']" in message
    assert "unexpected keys ['model.layers.1.mlp.extra.weight']" in message


def test_shape_mismatch_is_a_weights_error(tmp_path: Path) -> None:
    LlamaForCausalLM(tiny_llama_config(intermediate_size=96)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="(?s)does not fit the model.*size mismatch"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()


def test_corrupt_safetensors_names_the_file(tmp_path: Path) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt or unreadable"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()


def test_missing_shard_names_the_file(tmp_path: Path, hf_llama: LlamaForCausalLM) -> None:
    hf_llama.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: checkpoint shard is missing"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()


def test_pytorch_bin_loads_weights_only_and_refuses_code(tmp_path: Path, hf_llama: LlamaForCausalLM) -> None:
    tiny_llama_config().save_pretrained(tmp_path)
    torch.save(hf_llama.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()
    torch.testing.assert_close(
        logits_of(model, INPUT_IDS), logits_of(hf_llama, INPUT_IDS), rtol=1e-4, atol=1e-4
    )

    torch.save({"weights": ToyConfig()}, tmp_path / "pytorch_model.bin")  # an arbitrary object in the pickle
    with pytest.raises(WeightsError, match="refused: the pickle calls .*ToyConfig"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_and_load()


def test_load_state_dict_pre_hooks_run_before_the_strict_check() -> None:
    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self._register_load_state_dict_pre_hook(self._rename)

        @staticmethod
        def _rename(state_dict: dict, prefix: str, *args: object) -> None:
            for suffix in ("weight", "bias"):
                state_dict[f"{prefix}proj.{suffix}"] = state_dict.pop(f"{prefix}old_proj.{suffix}")

    source = nn.Linear(2, 2)
    module = Renamed()
    load_checkpoint_into(
        module, {"old_proj.weight": source.weight, "old_proj.bias": source.bias}, subject="x"
    )
    assert torch.equal(module.proj.weight, source.weight)


def test_random_init_for_a_bare_model_type() -> None:
    factory = AutoModelForCausalLMFactory(
        "llama", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    )
    with pytest.raises(WeightsError, match="has no weights"):
        factory.build_and_load(device="meta", weights="checkpoint")
    assert factory.source.kind == "model_type"


def test_directory_without_config_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="has no config.json"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_model()
    with pytest.raises(ModelSourceError, match="no such file"):
        AutoModelForCausalLMFactory(str(tmp_path / "nope")).build_model()


def test_hub_id_not_in_cache_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelSourceError, match="some-org/some-model: not in the local HuggingFace cache"):
        AutoModelForCausalLMFactory("some-org/some-model").build_model()


def test_remote_code_needs_explicit_permission(tmp_path: Path) -> None:
    config = {"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="--allow-remote-code"):
        AutoModelForCausalLMFactory(str(tmp_path)).build_model()


def test_a_run_with_fewer_layers_leaves_the_deeper_layers_out(tmp_path: Path) -> None:
    """num_hidden_layers below the checkpoint's (the e2e reduced run): the deeper layers' tensors are
    left out, with a note; the first layers load as they are."""
    torch.manual_seed(0)
    deep = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3)).eval()
    deep.save_pretrained(tmp_path)
    model, report = AutoModelForCausalLMFactory(str(tmp_path), {"num_hidden_layers": 2}).build_and_load()
    assert report.notes == ["9 checkpoint tensors of layers beyond num_hidden_layers left out"]
    shallow = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)).eval()
    shallow.load_state_dict({k: v for k, v in deep.state_dict().items() if ".layers.2." not in k})
    torch.testing.assert_close(
        logits_of(model, INPUT_IDS), logits_of(shallow, INPUT_IDS), rtol=1e-4, atol=1e-4
    )
