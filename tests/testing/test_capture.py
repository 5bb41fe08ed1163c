"""record_calls against a tiny transformers Llama: the recorded inputs and outputs are HF's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as hf
from transformers.utils import ModelOutput

from onboardlm.errors import OnboardlmError
from onboardlm.testing.capture import Call, first_tensor, record_calls


@pytest.fixture(scope="module")
def reference() -> hf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        attn_implementation="eager",
    )
    return hf.LlamaForCausalLM(config).eval()


def run(reference: hf.LlamaForCausalLM, paths: list[str]) -> dict[str, list[Call]]:
    input_ids = torch.arange(12).reshape(2, 6)
    positions = torch.arange(6)[None].expand(2, 6)
    return record_calls(reference, paths, input_ids=input_ids, position_ids=positions, use_cache=False)


def test_layer_output_feeds_the_next_layer_and_norm_output_is_the_last_hidden_state(
    reference: hf.LlamaForCausalLM,
) -> None:
    calls = run(reference, ["model.layers.0", "model.layers.1", "model.norm"])
    (first,), (second,), (norm,) = calls["model.layers.0"], calls["model.layers.1"], calls["model.norm"]
    torch.testing.assert_close(second.hidden_states, first.result, rtol=0, atol=0)
    with torch.no_grad():
        hidden = reference.model(input_ids=torch.arange(12).reshape(2, 6)).last_hidden_state
    torch.testing.assert_close(norm.result, hidden, rtol=1e-6, atol=1e-6)


def test_attention_gets_hf_rotary_tables_and_its_output_is_unwrapped(reference: hf.LlamaForCausalLM) -> None:
    (call,) = run(reference, ["model.layers.1.self_attn"])["model.layers.1.self_attn"]
    assert isinstance(call.output, tuple)  # (attn_output, attn_weights)
    positions = torch.arange(6)[None].expand(2, 6)
    cos, sin = hf.LlamaRotaryEmbedding(reference.config)(call.hidden_states, positions)
    torch.testing.assert_close(call.position_embeddings[0], cos, rtol=0, atol=0)
    torch.testing.assert_close(call.position_embeddings[1], sin, rtol=0, atol=0)
    attention = reference.model.layers[1].self_attn
    with torch.no_grad():
        again, _ = attention(*call.args, **call.kwargs)
    torch.testing.assert_close(call.result, again, rtol=0, atol=0)
    assert call.result is call.output[0]


def test_recorded_tensors_are_copies_that_later_in_place_updates_do_not_touch() -> None:
    model = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))  # ReLU overwrites Identity's output
    x = torch.tensor([-1.0, 2.0])
    (call,) = record_calls(model, ["0"], input=x.clone())["0"]
    torch.testing.assert_close(call.hidden_states, x, rtol=0, atol=0)
    torch.testing.assert_close(call.result, x, rtol=0, atol=0)


def test_every_call_is_kept_and_hooks_are_removed(reference: hf.LlamaForCausalLM) -> None:
    norm = reference.model.layers[0].input_layernorm
    model = nn.Sequential(norm, norm)
    calls = record_calls(model, ["0"], input=torch.ones(1, 32))
    assert len(calls["0"]) == 2
    torch.testing.assert_close(calls["0"][1].hidden_states, calls["0"][0].result, rtol=0, atol=0)
    assert not norm._forward_hooks and not norm._forward_pre_hooks


def test_hooks_are_removed_when_the_forward_fails(reference: hf.LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        record_calls(reference, ["model.norm"])
    assert not reference.model.norm._forward_hooks and not reference.model.norm._forward_pre_hooks


def test_unknown_path_raises_and_an_uncalled_path_has_no_calls(reference: hf.LlamaForCausalLM) -> None:
    with pytest.raises(OnboardlmError, match="model.layers.7: no such submodule"):
        run(reference, ["model.layers.7"])
    embeds = torch.randn(1, 5, 32)
    calls = record_calls(
        reference,
        ["model.embed_tokens", "model.norm"],
        inputs_embeds=embeds,
        position_ids=torch.arange(5)[None],
    )
    assert calls["model.embed_tokens"] == []
    assert len(calls["model.norm"]) == 1


def test_first_tensor_of_tuples_and_model_outputs() -> None:
    x = torch.ones(2)
    assert first_tensor(x) is x
    assert first_tensor((x, None)) is x
    assert first_tensor(ModelOutput(logits=x)) is x
    with pytest.raises(TypeError, match="NoneType"):
        first_tensor(None)
