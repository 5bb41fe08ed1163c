"""``quantize_fp8_linears`` without a checkpoint layout (``--quantize fp8``): per-channel FP8 weights.

On a tiny exported Llama: every decoder linear calls the fake-quant op with its FP8 weight (under the
checkpoint name) and an ``[N, 1]`` fp32 ``weight_scale`` such that ``fp8 * scale`` is the weight to FP8
rounding, with the row maximum mapped to 448; the LM head (untied) and a tied LM head stay float.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops._library import op_targets
from onboardlm.runtime.engine import build_cached_graph
from onboardlm.transforms.quantize_fp8 import quantize_fp8_linears

CONFIG = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64,
)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_linears_become_per_channel_fp8_and_the_lm_head_stays_float(tied: bool) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(LlamaConfig(**CONFIG, tie_word_embeddings=tied)).build_model(
        "cpu", torch.float32
    )
    original = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build_cached_graph(model, quantize_fp8_linears)
    gm = graph.gm
    calls = [n for n in gm.graph.nodes if n.target in set(op_targets("torch_fake_quant_fp8_linear"))]
    assert len(calls) == 7 * CONFIG["num_hidden_layers"]
    state = gm.state_dict()
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        weight, scale = state[f"{name}.weight"], state[f"{name}.weight_scale"]
        assert weight.dtype == torch.float8_e4m3fn and scale.shape == (weight.shape[0], 1)
        w = original[f"{name}.weight"]
        torch.testing.assert_close(scale, w.abs().amax(1, keepdim=True) / 448)
        assert torch.equal(weight.float().abs().amax(1), torch.full((weight.shape[0],), 448.0))
        torch.testing.assert_close(weight.float() * scale, w, rtol=0.07, atol=0)  # FP8: 3 mantissa bits
    assert state["lm_head.weight"].dtype == torch.float32
    assert state["model.embed_tokens.weight"].dtype == torch.float32
