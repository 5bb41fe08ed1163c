"""MLA building block: measured from transformers' DeepSeek-V3 attention, emitted, loaded and compared.

The reference is the HF attention module of a tiny DeepSeek-V3 (eager, with an explicit causal mask
and the HF rotary module's cos/sin); the lean attention gets the same cos/sin and must match with an
RMSE ratio <= 0.10, for low-rank and plain queries, interleaved and NeoX RoPE, and YaRN mscale.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.export import Dim
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from onboardlm.export import torch_export_to_gm
from onboardlm.onboard.analyze_moe import _class_reads_attribute, analyze_mla
from onboardlm.onboard.emit_moe import block_imports, emit_mla
from onboardlm.onboard.spec_moe import MLASpec
from onboardlm.testing import assert_rmse_close, tiny_config, transfer_weights

ATTENTION_TOL = 0.10

# The file's RMSNorm comes from the norm template; this stand-in has the same contract.
_NORM = """
class {name}(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)
"""


def _yarn(config: PretrainedConfig) -> None:
    config.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 64,
    }


VARIANTS: dict[str, Callable[[PretrainedConfig], None]] = {
    "default": lambda config: None,
    "neox_rope": lambda config: setattr(config, "rope_interleave", False),
    "no_q_lora": lambda config: setattr(config, "q_lora_rank", None),
    "yarn_mscale": _yarn,
}


def _hf_model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    config = tiny_config(AutoConfig.for_model("deepseek_v3"))
    VARIANTS[variant](config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model


def _lean_attention(spec: MLASpec, config: PretrainedConfig) -> nn.Module:
    source = "\n".join(
        [
            "import torch",
            "from torch import nn",
            f"from transformers import {spec.config_class}",
            "import onboardlm.ops",
            *block_imports(spec),
            _NORM.format(name=spec.norm_class),
            emit_mla(spec),
        ]
    )
    namespace: dict[str, object] = {}
    exec(compile(source, f"<emitted {spec.class_name}>", "exec"), namespace)
    return namespace[spec.class_name](config, 0).eval()


def _causal_mask(batch: int, seq_len: int) -> torch.Tensor:
    blocked = torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1)
    return torch.zeros(batch, 1, seq_len, seq_len).masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_mla_attention_matches_hf(variant: str) -> None:
    model = _hf_model(variant)
    spec = analyze_mla(model.config, model)
    lean = _lean_attention(spec, model.config)
    hf_attn = model.model.layers[0].self_attn
    transfer_weights(hf_attn, lean)

    batch, seq_len = 2, 9
    x = torch.randn(batch, seq_len, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(3, 3 + seq_len).expand(batch, seq_len)
    position_embeddings = model.model.rotary_emb(x, position_ids)
    expected, _ = hf_attn(x, position_embeddings, _causal_mask(batch, seq_len))
    assert_rmse_close(lean(x, position_embeddings), expected, ATTENTION_TOL, msg=variant)
    assert lean.scaling == pytest.approx(hf_attn.scaling)


def test_yarn_case_changes_the_softmax_scale() -> None:
    model = _hf_model("yarn_mscale")
    spec = analyze_mla(model.config, model)
    assert spec.yarn_mscale
    assert spec.scaling > (spec.qk_nope_head_dim + spec.qk_rope_head_dim) ** -0.5


def test_spec_reads_ranks_and_layout_from_the_hf_attention() -> None:
    model = _hf_model("default")
    config = model.config
    spec = analyze_mla(config, model)
    assert (spec.kv_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim) == (
        config.kv_lora_rank,
        config.qk_nope_head_dim,
        config.qk_rope_head_dim,
        config.v_head_dim,
    )
    assert spec.q_lora and spec.rope_interleave
    assert spec.num_heads == config.num_attention_heads
    assert spec.norm_class == "DeepseekV3RMSNorm"
    assert spec.norm_eps == "1e-06"  # HF builds the latent norms with their class default, not rms_norm_eps


def test_dense_attention_is_not_mla() -> None:
    config = tiny_config(AutoConfig.for_model("qwen3"))
    model = AutoModelForCausalLM.from_config(config)
    assert analyze_mla(config, model) is None


@torch.no_grad()
def test_exported_mla_attention_runs_a_second_shape() -> None:
    model = _hf_model("default")
    hf_attn = model.model.layers[0].self_attn
    lean = _lean_attention(analyze_mla(model.config, model), model.config)
    transfer_weights(hf_attn, lean)
    hidden, rotary = model.config.hidden_size, model.model.rotary_emb

    def inputs(batch: int, seq_len: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randn(batch, seq_len, hidden, generator=torch.Generator().manual_seed(seq_len))
        return x, rotary(x, torch.arange(seq_len).expand(batch, seq_len))

    batch, seq = Dim("batch", max=8), Dim("seq", max=64)
    gm = torch_export_to_gm(
        lean,
        inputs(2, 5),
        dynamic_shapes=({0: batch, 1: seq}, ({0: batch, 1: seq}, {0: batch, 1: seq})),
    )
    x, tables = inputs(3, 11)
    expected, _ = hf_attn(x, tables, _causal_mask(3, 11))
    assert_rmse_close(gm(x, tables), expected, ATTENTION_TOL)


class _ReadsSwitch(nn.Module):
    def forward(self, config: PretrainedConfig) -> bool:
        return getattr(config, "rope_interleave", False)


class _MentionsSwitch(nn.Module):
    """Unlike DeepSeek-V3 this module has no rope_interleave switch."""

    def forward(self, config: PretrainedConfig) -> bool:
        # rope_interleave is not read here
        return config.rope_theta > 0


def test_rope_interleave_switch_is_found_in_code_not_in_text() -> None:
    assert _class_reads_attribute(_ReadsSwitch, "rope_interleave")
    assert _class_reads_attribute(type(_hf_model("default").model.layers[0].self_attn), "rope_interleave")
    assert not _class_reads_attribute(_MentionsSwitch, "rope_interleave")
