"""Real weights under ``--quantize fp8``: SmolLM2-135M (the shipped GGUF) on the CPU through the reference
FP8 fake-quant op still answers "What is the capital of France?" with Paris, and every decoder linear
(not the tied LM head) holds FP8 weights with per-channel scales."""

from __future__ import annotations

import pytest
import torch

from onboardlm.ops._library import op_targets
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.runner import Runner


@pytest.mark.slow
def test_smollm2_quantized_to_fp8_answers_paris_on_the_cpu() -> None:
    runner = Runner.load(None, RunSettings(device="cpu", dtype="float32", quantize="fp8", max_new_tokens=12))
    gm = runner.graph.gm
    fake_quant = set(op_targets("torch_fake_quant_fp8_linear"))
    layers = runner.config.num_hidden_layers
    assert sum(1 for n in gm.graph.nodes if n.target in fake_quant) == 7 * layers
    state = gm.state_dict()
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert state["model.layers.0.mlp.down_proj.weight_scale"].shape == (runner.config.hidden_size, 1)
    assert state["model.embed_tokens.weight"].dtype == torch.float32  # tied with the LM head: stays float
    [result] = runner.run(["What is the capital of France?"])
    assert "Paris" in result.output, result.output
