"""Short causal convolutions inside the attention (Inkling's k/v short convs, ZAYA's compressed
convolutional attention): measured from one forward of the transformers model, and refused with a
reason that says what is convolved and how."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.analyze import analyze
from onboardlm.onboard.analyze_attn_conv import attention_conv_refusal, measure_attention_conv
from onboardlm.testing import tiny_config


def _tiny_model(model_type: str, **fields) -> tuple[nn.Module, object]:
    tiny = tiny_config(AutoConfig.for_model(model_type, **fields))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny, attn_implementation="eager", dtype=torch.float32)
    return model.float().eval(), tiny


@pytest.mark.parametrize("kernel", [4, 3])
def test_inkling_k_and_v_short_convs_are_measured(kernel: int) -> None:
    model, _ = _tiny_model("inkling_text", sconv_kernel_size=kernel)
    attn = "model.layers.0.self_attn"
    k = measure_attention_conv(model, attn, "k_sconv")
    v = measure_attention_conv(model, attn, "v_sconv")
    assert k is not None and v is not None
    assert (k.inputs, v.inputs) == (("k_proj",), ("v_proj",))
    (step,) = k.steps
    width = model.get_submodule(attn).k_proj.out_features  # layer 0 may use the sliding widths
    assert (step.kernel_size, step.channels, step.depthwise, step.bias) == (kernel, width, True, False)
    assert (k.residual, k.activation, k.causal) == (True, None, True)


def test_inkling_fit_is_not_a_constant() -> None:
    """With the conv weights zeroed the child is the identity: the fit must still say residual, and
    with random weights and no residual it must not match (the transformers module is the judge)."""
    model, _ = _tiny_model("inkling_text")
    child = model.get_submodule("model.layers.0.self_attn.k_sconv")
    x = torch.randn(1, 7, child.conv1d.in_channels)
    with torch.no_grad():
        reference = child(x)
        convolved = nn.functional.conv1d(
            nn.functional.pad(x.transpose(1, 2), (child.conv1d.kernel_size[0] - 1, 0)),
            child.conv1d.weight,
            groups=child.conv1d.groups,
        ).transpose(1, 2)
    torch.testing.assert_close(reference, convolved + x)  # what the measurement claims, independently
    assert not torch.allclose(reference, convolved, atol=1e-4)


def test_zaya_stacked_convs_are_measured() -> None:
    model, tiny = _tiny_model("zaya")
    conv = measure_attention_conv(model, "model.layers.0.self_attn", "qkv_proj")
    assert conv is not None and conv.inputs == ("qkv_proj.q_proj", "qkv_proj.k_proj")
    first, second = conv.steps
    channels = (tiny.num_attention_heads + tiny.num_key_value_heads) * tiny.head_dim
    assert (first.channels, first.kernel_size, first.depthwise) == (channels, tiny.cca_time0, True)
    assert (second.kernel_size, second.groups) == (
        tiny.cca_time1,
        tiny.num_attention_heads + tiny.num_key_value_heads,
    )
    assert not second.depthwise and conv.causal


class _ConvAttention(nn.Module):
    """An attention whose value projection is convolved (SiLU, bias, no residual) before attending."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o_proj = nn.Linear(hidden, hidden)
        self.v_conv = nn.Conv1d(hidden, hidden, 3, groups=hidden, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.q_proj(x), self.k_proj(x)
        v = nn.functional.silu(self.v_conv(self.v_proj(x).transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
        return self.o_proj(torch.softmax(q @ k.transpose(1, 2) + mask, -1) @ v)


class _Layer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.self_attn = _ConvAttention(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.self_attn(x)


class _Model(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, hidden)
        self.layers = nn.ModuleList([_Layer(hidden)])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_called_conv_reads_its_inputs_and_padding() -> None:
    torch.manual_seed(0)
    model = _Model().eval()
    conv = measure_attention_conv(model, "layers.0.self_attn", "v_conv")
    assert conv is not None and conv.inputs == ("v_proj",)
    (step,) = conv.steps
    assert (step.name, step.kernel_size, step.depthwise, step.bias) == ("v_conv", 3, True, True)
    # the module pads both sides (padding=2) and the caller trims: no left zero padding is seen
    assert not conv.causal
    refusal = attention_conv_refusal(model, "layers.0.self_attn", ["v_conv"])
    assert refusal is not None and refusal.module_path == "layers.0.self_attn.v_conv"
    assert "v_conv convolves v_proj" in refusal.feature and "outside the attention" not in refusal.feature
    assert "other attention parts" not in refusal.feature


def test_refusals_name_what_is_convolved() -> None:
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("inkling_text"))
    feature = raised.value.feature
    assert raised.value.module_path == "model.layers.0.self_attn.k_sconv"
    assert "k_sconv convolves k_proj" in feature and "v_sconv likewise on v_proj" in feature
    assert "plus its input as a residual" in feature and "(attn_sconv, mlp_sconv)" in feature
    assert "other attention parts no template covers: rel_logits_proj (InklingRelativeLogits" in feature
    with pytest.raises(UnsupportedFeature) as raised:
        analyze(AutoConfig.for_model("zaya"))
    assert raised.value.module_path == "model.layers.0.self_attn.qkv_proj"
    assert "depthwise only (qkv_proj.conv_qk_grouped is not)" in raised.value.feature
