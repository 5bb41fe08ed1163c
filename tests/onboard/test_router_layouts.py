"""Router layouts of other transformers releases are measured as the same router.

transformers 5.17 keeps Jamba's router a bare ``nn.Linear`` and picks the experts in the block's
``route_tokens_to_experts``; 5.25 has a ``JambaTopKRouter``. GraniteMoeHybrid's router returns
``(ids, weights, logits)`` on 5.17 and ``(logits, weights, ids)`` on 5.25. Each older layout is rebuilt
here on whichever release is installed, and must give the router spec that release's own module gives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from onboardlm.onboard.analyze_moe import _analyze_router
from onboardlm.onboard.block_routing import BlockRouting, routing_view
from onboardlm.testing import tiny_config


class _BlockRoutedMoe(nn.Module):
    """Jamba's MoE block as transformers 5.17 writes it: a linear router, the routing in the block."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def route_tokens_to_experts(
        self, hidden_states: torch.Tensor, router_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float)
        top_weights, top_ids = torch.topk(weights, self.top_k, dim=-1)
        return top_ids, top_weights.to(hidden_states.dtype)


def _first_moe(model_type: str) -> tuple[PretrainedConfig, nn.Module, str]:
    """The tiny config, the first MoE block of the transformers model and its path."""
    torch.manual_seed(0)
    config = tiny_config(AutoConfig.for_model(model_type))
    model = AutoModelForCausalLM.from_config(config).eval()
    path, block = next((n, m) for n, m in model.named_modules() if hasattr(m, "experts"))
    return config, block, path


def test_a_block_that_routes_with_a_linear_router_is_read_as_a_router() -> None:
    config, block, path = _first_moe("jamba")
    installed = _analyze_router(config, block, path)
    older = _BlockRoutedMoe(config).eval()
    view = routing_view(older, "router", "JambaTopKRouter")
    assert isinstance(view, BlockRouting) and view.weight is older.router.weight  # shared, not copied
    tokens = torch.randn(5, config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, ids = view(tokens)
    expected_ids, expected_weights = older.route_tokens_to_experts(tokens, older.router(tokens))
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
    torch.testing.assert_close(logits, older.router(tokens))
    assert _analyze_router(config, older, path) == installed
    assert installed.class_name == "JambaTopKRouter" and installed.scoring == "softmax"
    assert not installed.norm_topk_prob and installed.top_k_field == "num_experts_per_tok"


def test_a_router_returning_ids_first_is_read_as_one_returning_logits_first(monkeypatch) -> None:
    config, block, path = _first_moe("granitemoehybrid")
    installed = _analyze_router(config, block, path)
    router_class = type(block.router)
    forward = router_class.forward
    monkeypatch.setattr(router_class, "forward", lambda self, x: tuple(reversed(forward(self, x))))
    assert _analyze_router(config, block, path) == installed
    assert (installed.scoring, installed.norm_topk_prob) == ("softmax", True)  # softmax over the top-k


def test_a_linear_router_without_block_routing_is_left_as_it_is() -> None:
    linear = nn.Linear(8, 4, bias=False)
    holder = nn.Module()
    holder.router = linear
    assert routing_view(holder, "router", "XTopKRouter") is linear
