"""``fuse_fp8_linears``: FP8 fake-quant linears become the fused FP8 op (CPU: graph rewrite and numbers).

A tiny random Llama is exported and cached as ``onboardlm run`` does, its linears quantised to FP8
(``quantize_fp8_linears``, per channel), then fused. On the CPU the rewritten graph must call only the
fused op (none of the reference op left), with q/k/v and gate/up merged into one FP8 linear each (their
FP8 weights and scales concatenated, the originals gone), and its prefill + decode logits must equal the
reference graph's: the fused op runs the reference off CUDA and merging is exact under per-token
activation scales. On CUDA (skipped elsewhere) the fused kernels inside the fast path (CUDA graphs
included) must give the logits of the same graph run on the reference ops, within bf16 and FP8 rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops._library import op_targets
from onboardlm.testing.cached import prefill_then_decode, zero_caches
from onboardlm.transforms import CachedGraph, insert_cached_attention, insert_logit_gather
from onboardlm.transforms.backends import use_direct_kernels
from onboardlm.transforms.compile import SpeedOptions, accelerate
from onboardlm.transforms.fuse_fp8 import fuse_fp8_linears
from onboardlm.transforms.quantize_fp8 import quantize_fp8_linears

CONFIG = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=64,
)  # fmt: skip


def _graph(device: str = "cpu", dtype: torch.dtype = torch.float32) -> CachedGraph:
    """The ``onboardlm run`` graph (``runtime.engine.build_cached_graph``, spelt out: the runtime package
    needs the CLI's dependencies) with its linears quantised to FP8."""
    torch.manual_seed(0)
    model = AutoModelForCausalLMFactory(LlamaConfig(**CONFIG)).build_model("cpu", dtype).to(device)
    ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    positions = torch.arange(8, device=device).expand(2, 8)
    kwargs = {"input_ids": ids, "position_ids": positions}
    gm = torch_export_to_gm(model, kwargs=kwargs, dynamic_shapes=causal_lm_dynamic_shapes())
    quantize_fp8_linears(gm)
    cached = insert_cached_attention(gm)
    insert_logit_gather(cached.gm)
    use_direct_kernels(cached.gm)
    return cached


def _calls(gm, name: str) -> int:
    targets = set(op_targets(name))
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def test_fusion_rewrites_the_graph_and_keeps_the_reference_logits_on_cpu() -> None:
    reference, fused = _graph(), _graph()
    assert _calls(reference.gm, "torch_fake_quant_fp8_linear") == 7 * 2  # q k v o gate up down per layer
    assert fuse_fp8_linears(fused.gm) == 14
    assert _calls(fused.gm, "torch_fake_quant_fp8_linear") == 0
    assert _calls(fused.gm, "torch_quant_fp8_linear") == 4 * 2  # qkv, o, gate_up, down per layer
    state = fused.gm.state_dict()
    attn = "model.layers.0.self_attn"
    assert f"{attn}.q_proj.weight" not in state and f"{attn}.k_proj.weight_scale" not in state
    ref_state = reference.gm.state_dict()
    expected = torch.cat([ref_state[f"{attn}.{p}_proj.weight"] for p in "qkv"])
    assert state[f"{attn}.q_proj.weight_fused"].dtype == torch.float8_e4m3fn
    assert torch.equal(state[f"{attn}.q_proj.weight_fused"].view(torch.uint8), expected.view(torch.uint8))
    scales = torch.cat([ref_state[f"{attn}.{p}_proj.weight_scale"] for p in "qkv"])
    assert torch.equal(state[f"{attn}.q_proj.weight_scale_fused"], scales)
    assert fuse_fp8_linears(fused.gm) == 0  # nothing left to swap

    ids = torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    want = prefill_then_decode(reference.gm, zero_caches(reference, 2, 16), ids, 6)
    got = prefill_then_decode(fused.gm, zero_caches(fused, 2, 16), ids, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fused_kernels_in_the_fast_path_match_the_reference_graph_on_cuda() -> None:
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    logits = {}
    for fast_path in (False, True):  # the reference graph on CUDA, then the fast path (fused kernels)
        graph = _graph("cuda", torch.bfloat16)
        caches = {k: v.to(dtype=torch.bfloat16, device="cuda") for k, v in zero_caches(graph, 2, 16).items()}
        step = graph.gm
        if fast_path:
            step = accelerate(graph.gm, caches, SpeedOptions(batch_sizes=(2,)))
            assert step.report.captured == [2]  # decode steps replay a CUDA graph holding the FP8 kernels
            assert _calls(graph.gm, "torch_quant_fp8_linear") > 0
            assert _calls(graph.gm, "torch_fake_quant_fp8_linear") == 0

        def run(step=step, caches=caches, **kw: torch.Tensor) -> torch.Tensor:
            moved = {
                k: v if k in caches or not isinstance(v, torch.Tensor) else v.cuda() for k, v in kw.items()
            }
            return step(**moved)

        logits[fast_path] = prefill_then_decode(run, caches, ids, 8).float().cpu()
    ref, got = logits[False].double(), logits[True].double()
    # bf16 differences of the fast path's other kernels move activations across FP8 rounding steps (1/16
    # relative each), so whole-model logits differ by a few percent; wrong scales would differ by ~100 %.
    assert float((got - ref).norm() / ref.norm()) < 5e-2
