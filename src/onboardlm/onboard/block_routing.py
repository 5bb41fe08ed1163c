"""MoE blocks that pick their experts themselves, read as a router module.

The analyzer probes routers in transformers 5's later form: a ``gate``/``router`` module with an
integer ``top_k`` whose forward returns ``(logits, top-k weights, top-k ids)``. Some releases keep the
router a bare ``nn.Linear`` (its logits) and choose the experts in a method of the MoE block instead
(Jamba's ``route_tokens_to_experts`` on transformers 5.17; 5.25 moved it into ``JambaTopKRouter``).
:class:`BlockRouting` presents such a block's routing in the later form, over the linear's own weight
(the checkpoint key ``<router>.weight`` is the same either way), so one probe and one generated router
serve both releases.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BlockRouting", "routing_view"]

#: The block method that turns router logits into (top-k ids, top-k weights).
ROUTE_METHOD = "route_tokens_to_experts"


class BlockRouting(nn.Module):
    """A block's linear router and its routing method as one router: ``forward(tokens [T, H])`` returns
    ``(logits [T, E], weights [T, k], ids [T, k])``. It shares the linear's parameters (not copies) and
    is never put into the model; ``lean_class`` names the generated router class."""

    def __init__(self, block: nn.Module, attr: str, lean_class: str) -> None:
        super().__init__()
        linear: nn.Linear = getattr(block, attr)
        self.weight = linear.weight
        if linear.bias is not None:
            self.bias = linear.bias
        self.top_k: int = block.top_k
        self.attr, self.lean_class, self.block_type = attr, lean_class, type(block)
        self._route: Callable[..., tuple[torch.Tensor, ...]] = getattr(block, ROUTE_METHOD)
        self._takes_tokens = len(inspect.signature(self._route).parameters) == 2

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states, self.weight, getattr(self, "bias", None))
        chosen = self._route(*((hidden_states, logits) if self._takes_tokens else (logits,)))
        weights = next(t for t in chosen if t.is_floating_point())
        ids = next(t for t in chosen if not t.is_floating_point())
        return logits, weights, ids

    def rebuilt(self, block: nn.Module) -> BlockRouting:
        """The same view of another block of this block's class (one built from a changed config)."""
        return BlockRouting(block, self.attr, self.lean_class)


def routing_view(block: nn.Module, attr: str, lean_class: str) -> nn.Module:
    """The block's router ``getattr(block, attr)``, or, where that is a bare ``nn.Linear`` and the block
    chooses the experts itself (an integer ``top_k`` and a ``route_tokens_to_experts`` method), a
    :class:`BlockRouting` over the two."""
    router = getattr(block, attr)
    routes = callable(getattr(block, ROUTE_METHOD, None)) and isinstance(getattr(block, "top_k", None), int)
    if type(router) is nn.Linear and not isinstance(getattr(router, "top_k", None), int) and routes:
        return BlockRouting(block, attr, lean_class)
    return router
