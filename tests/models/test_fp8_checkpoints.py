"""FP8 checkpoints in the two common layouts load through ``onboardlm run``'s path and compute the
numbers of a float64 reference built from the same dequantised weights (CPU).

Each test writes a tiny random Llama (transformers' ``LlamaConfig``) whose linear weights it quantises
with plain torch into one layout, with the matching ``quantization_config``:

- transformers ``quant_method: fp8``: per-tensor ``weight_scale_inv`` (dynamic, and static with an
  ``activation_scale``), and 128 x 128 block ``weight_scale_inv`` with partial edge blocks (as
  DeepSeek-V3 / Qwen3 FP8 checkpoints ship it; activations per token and 128-channel group);
- compressed-tensors: per-channel ``weight_scale`` ``[N, 1]`` in bf16, dynamic per-token activations.

The reference is transformers' Llama in float64 holding ``fp8 weight * scale``, with a forward
pre-hook on every quantised linear that quantises its input to FP8 and back (in float64) per the
scheme. ``Runner.load`` must detect the layout, keep the weights in FP8 in the graph (under the
checkpoint's names) and give the reference's last-token logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from onboardlm.errors import WeightsError
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel
from onboardlm.runtime.runner import Runner
from onboardlm.testing import assert_rmse_close
from onboardlm.testing.checkpoints import word_tokenizer

E4M3 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(253)}}
CONFIG = dict(
    hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
PROMPT = [1, 17, 91, 200, 5, 44, 12, 7, 130, 250]


def _per_token(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """FP8 fake quantisation of ``x`` (float64): per token, or per token and ``group`` channels."""
    parts = [x] if group is None else list(x.split(group, dim=-1))
    out = []
    for part in parts:
        scale = (part.abs().amax(-1, keepdim=True) / 448).clamp_min(1e-12)
        out.append((part / scale).clamp(-448, 448).to(E4M3).double() * scale)
    return torch.cat(out, dim=-1)


def _quantize(w: torch.Tensor, layout: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint tensors of one linear (suffix -> tensor) and its dequantised float64 weight."""
    n, k = w.shape
    if layout in ("fp8_tensor", "fp8_static"):
        scale = (w.abs().amax() / 448).reshape(())
        q = (w / scale).to(E4M3)
        tensors = {"weight": q, "weight_scale_inv": scale}
        if layout == "fp8_static":
            tensors["activation_scale"] = torch.tensor(0.05)
        return tensors, q.double() * scale.double()
    if layout == "fp8_block":
        rows, cols = -(-n // 128), -(-k // 128)
        scale = torch.empty(rows, cols)
        q = torch.empty(n, k, dtype=E4M3)
        deq = torch.empty(n, k, dtype=torch.float64)
        for i in range(rows):
            for j in range(cols):
                block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
                scale[i, j] = block.abs().amax() / 448
                q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / scale[i, j]).to(E4M3)
                deq[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (
                    q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].double() * scale[i, j].double()
                )
        return {"weight": q, "weight_scale_inv": scale}, deq
    scale = (w.abs().amax(1, keepdim=True) / 448).to(torch.bfloat16)  # compressed-tensors, bf16 scales
    q = (w / scale.float()).clamp(-448, 448).to(E4M3)
    return {"weight": q, "weight_scale": scale}, q.double() * scale.double()


def _quantization_config(layout: str) -> dict:
    if layout == "compressed_tensors":
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True},
                }
            },
            "ignore": ["lm_head"],
        }  # fmt: skip
    config = {"quant_method": "fp8", "activation_scheme": "static" if layout == "fp8_static" else "dynamic"}
    if layout == "fp8_block":
        config["weight_block_size"] = [128, 128]
    return config


def _write(directory: Path, layout: str) -> LlamaForCausalLM:
    """Save the FP8 checkpoint; returns the float64 reference model (with its activation hooks)."""
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    source = LlamaForCausalLM(config).eval()
    reference = LlamaForCausalLM(config).double().eval()
    tensors: dict[str, torch.Tensor] = {}
    dequantised: dict[str, torch.Tensor] = {}
    for name, value in source.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in LINEARS:
            parts, deq = _quantize(value * 0.5, layout)
            tensors.update({f"{module}.{suffix}": t.contiguous() for suffix, t in parts.items()})
            dequantised[name] = deq
        else:  # fp32, not bf16: bf16 embeddings put many activations exactly on FP8 rounding ties,
            # which fp32 (the op) and fp64 (the reference) then break differently
            tensors[name] = value
            dequantised[name] = value.double()
    reference.load_state_dict(dequantised, strict=True)
    group = 128 if layout == "fp8_block" else None
    for name, module in reference.named_modules():
        if name.rpartition(".")[2] in LINEARS:
            if layout == "fp8_static":
                scale = torch.tensor(0.05).double()
                hook = lambda m, args, s=scale: ((args[0] / s).clamp(-448, 448).to(E4M3).double() * s,)  # noqa: E731
            else:
                hook = lambda m, args: (_per_token(args[0], group),)  # noqa: E731
            module.register_forward_pre_hook(hook)
    save_file(tensors, str(directory / "model.safetensors"))
    data = config.to_dict()
    data["quantization_config"] = _quantization_config(layout)
    data["dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(data))
    word_tokenizer(VOCAB).save_pretrained(directory)
    return reference


@pytest.mark.parametrize("layout", ["fp8_tensor", "fp8_static", "fp8_block", "compressed_tensors"])
def test_fp8_checkpoint_loads_in_fp8_and_matches_the_float64_reference(tmp_path: Path, layout: str) -> None:
    reference = _write(tmp_path, layout)
    runner = Runner.load(str(tmp_path), RunSettings(device="cpu", dtype="float32", max_new_tokens=4))
    state = runner.graph.gm.state_dict()
    scale_name = "weight_scale" if layout == "compressed_tensors" else "weight_scale_inv"
    assert state["model.layers.1.mlp.down_proj.weight"].dtype == E4M3
    assert f"model.layers.1.mlp.down_proj.{scale_name}" in state
    assert state["lm_head.weight"].dtype == torch.float32  # what the checkpoint keeps in float stays float
    assert any("FP8" in note for note in runner.report.notes)

    model = CachedModel(runner.graph, KVCache.allocate(runner.graph.caches, 1, 32, torch.device("cpu")))
    got = model.prefill([PROMPT], 2)
    with torch.no_grad():
        want = reference(torch.tensor([PROMPT])).logits[:, -1]
    assert_rmse_close(got.double(), want, 2e-3, msg=layout)


def test_an_unsupported_quantization_method_is_refused_by_name(tmp_path: Path) -> None:
    _write(tmp_path, "fp8_tensor")
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="quantization method 'gptq' is not supported"):
        Runner.load(str(tmp_path), RunSettings(device="cpu", dtype="float32"))
