"""On a CUDA GPU: hybrids (Mamba2 + attention, Gated DeltaNet + attention + MoE) decode with cached state.

The shipped generated files of nemotron_h and qwen3_next, on a tiny config of each and transformers'
random weights, run the fast path on the GPU (fused kernels, CUDA-graph decode steps over the conv,
SSM and delta-rule state caches). Every prefill and decode step's logits are checked against
transformers' fp32 model on the CPU recomputing the whole sequence; ``onboardlm run``'s runner, from a
checkpoint directory, decodes the same greedy tokens on the GPU as transformers' ``generate`` on the CPU.
Skipped without CUDA.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.registry.settings import RunSettings
from onboardlm.runtime.cache import KVCache
from onboardlm.runtime.engine import CachedModel, build_cached_graph
from onboardlm.runtime.runner import Runner
from onboardlm.testing import assert_rmse_close
from onboardlm.testing.checkpoints import word_tokenizer
from onboardlm.testing.tiny_config import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TYPES = ("nemotron_h", "qwen3_next")
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
PROMPT_LENGTHS, STEPS = (11, 4, 7), 6


def _reference(model_type: str) -> torch.nn.Module:
    """transformers' fp32 model of a tiny config of ``model_type`` (PyTorch paths), weights of std 0.1."""
    config = tiny_config(AutoConfig.for_model(model_type), vocab_size=len(VOCAB))
    if hasattr(config, "use_mamba_kernels"):
        config.use_mamba_kernels = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif not name.endswith(("A_log", "dt_bias", "D")):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def _full_logits(model: torch.nn.Module, sequence: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([sequence])).logits[0, -1].float()


@pytest.mark.parametrize("model_type", TYPES)
def test_every_cached_step_on_the_gpu_matches_a_cpu_recompute(model_type: str) -> None:
    hf = _reference(model_type)
    lean = AutoModelForCausalLMFactory(copy.deepcopy(hf.config)).build_model("cuda", torch.float32)
    lean.load_state_dict({k: v.cuda() for k, v in hf.state_dict().items()}, strict=False)
    graph = build_cached_graph(lean.eval())
    assert graph.has_state
    cached = CachedModel(graph, KVCache.allocate(graph.caches, 4, 32, "cuda"))  # the default fast path
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, len(VOCAB), (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    logits = cached.prefill([list(s) for s in sequences], STEPS)
    for step in range(STEPS + 1):
        for row, sequence in enumerate(sequences):
            expected = _full_logits(hf, sequence)
            assert_rmse_close(logits[row].cpu(), expected, 1e-3, msg=f"{model_type} step {step} row {row}")
        tokens = torch.randint(3, len(VOCAB), (len(sequences),), generator=gen)
        for sequence, token in zip(sequences, tokens.tolist(), strict=True):
            sequence.append(token)
        logits = cached.decode(tokens.cuda())


@pytest.mark.parametrize("model_type", TYPES)
def test_run_decodes_transformers_greedy_tokens_on_the_gpu(model_type: str, tmp_path: Path) -> None:
    hf = _reference(model_type)
    tokenizer = word_tokenizer(VOCAB)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = ["w5 w9 w17 w3", "w40 w41"]
    settings = RunSettings(device="cuda", dtype="float32", max_new_tokens=12, prompts=prompts)
    results = Runner.load(str(tmp_path), settings).run()
    for result, prompt in zip(results, prompts, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.shape[1] == result.prompt_tokens
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        expected = out[0, ids.shape[1] :].tolist()
        assert result.new_token_ids == expected[: len(result.new_token_ids)], prompt
        assert len(result.new_token_ids) == 12 or result.stopped_on_eos


def test_run_of_one_new_token_on_the_gpu_answers_the_greedy_first_token(tmp_path: Path) -> None:
    """The CUDA warm-up must fit the cache ``run`` sizes for one new token (it asked for two)."""
    hf = _reference(TYPES[0])
    tokenizer = word_tokenizer(VOCAB)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = RunSettings(device="cuda", dtype="float32", max_new_tokens=1, prompts=["w5 w9 w17 w3"])
    (result,) = Runner.load(str(tmp_path), settings).run()
    ids = tokenizer("w5 w9 w17 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids).logits[0, -1].argmax().item()
    assert result.new_token_ids == [expected]
