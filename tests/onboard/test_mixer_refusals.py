"""Token mixers recognised from their parts, refused with the feature named where no template covers them.

MiniMax's lightning attention (fixed per-head decay buffers, a fused qkv projection) and
RecurrentGemma's RG-LRU block (a depthwise conv beside block-diagonal gate weights) were taken for
attention layers without k_proj / v_proj ("cross-layer KV sharing"); the lightning refusal names the
mixer, and it comes before any other layer feature (MiniMax's scaled residuals). The RG-LRU block is
now measured (``analyze_rg_lru``); its recognition beside the attention layers is still checked here.
"""

from __future__ import annotations

import pytest
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_hybrid import block_kind
from onboardlm.testing.reference import reference_params
from onboardlm.testing.tiny_config import tiny_config

REASONS = {
    "minimax": r"model\.layers\.1\.self_attn: .*lightning attention \(linear attention with fixed per-head",
}


@pytest.mark.parametrize("model_type", reference_params(list(REASONS)))
def test_mixer_is_refused_by_name(model_type: str) -> None:
    with pytest.raises(UnsupportedFeature, match=REASONS[model_type]) as refused:
        analyze(CONFIG_MAPPING[model_type]())
    assert "cross-layer KV sharing" not in str(refused.value)


@pytest.mark.parametrize("model_type", reference_params(["minimax", "recurrent_gemma"]))
def test_the_attention_layers_beside_them_stay_attention(model_type: str) -> None:
    """Only the mixer is recognised: the same models' softmax-attention blocks are not."""
    model = AutoModelForCausalLM.from_config(tiny_config(CONFIG_MAPPING[model_type]()))
    kinds = [block_kind(child) for layer in model.model.layers for child in layer.children()]
    assert "attention" in kinds and ({"lightning", "rg_lru"} & set(kinds))
    llama = AutoModelForCausalLM.from_config(tiny_config(CONFIG_MAPPING["llama"]()))
    assert block_kind(llama.model.layers[0].self_attn) == "attention"


WITHOUT_ATTENTION = {
    "rwkv": r"rwkv\.blocks\.0: .*no attention block .* among .*attention \(RwkvSelfAttention\)",
    "xlstm": r"backbone\.blocks\.0: .*no attention block .* among .*mlstm_layer \(xLSTMLayer\)",
    "longcat_flash": r"model\.layers\.0: .*no attention block .*self_attn \(ModuleList of 2 LongcatFlashMLA\)",
}


@pytest.mark.parametrize("model_type", reference_params(list(WITHOUT_ATTENTION)))
def test_a_layer_without_an_attention_block_names_its_parts(model_type: str) -> None:
    """No child takes the attention inputs: the refusal lists what the layer holds instead."""
    with pytest.raises(UnsupportedFeature, match=WITHOUT_ATTENTION[model_type]):
        analyze(CONFIG_MAPPING[model_type]())
