"""Weights for equivalence tests that leave no branch of the lean model idle."""

from __future__ import annotations

import torch
from torch import nn

#: Spread of the random values given to weights that initialise to a constant.
SPREAD = 0.5


def randomize_constant_tensors(module: nn.Module, spread: float = SPREAD) -> list[str]:
    """Give every floating-point checkpoint tensor of ``module`` whose elements are all equal (norm
    weights of ones or zeros, biases, router score corrections, scalar gains) the value
    ``c + spread * N(0, 1)`` instead, and return their names.

    transformers initialises these to constants, and with a constant a wrong norm offset, a dropped
    bias or a skipped score correction changes nothing a test can see. Runs under ``no_grad``; the
    tensors are changed in place, so tied weights stay tied.
    """
    changed = []
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            first = tensor.reshape(-1)[0]
            if bool((tensor == first).all()):
                tensor.add_(torch.randn_like(tensor), alpha=spread)
                changed.append(name)
    return changed


def unit_embeddings(module: nn.Module) -> list[str]:
    """Draw the weights of every ``nn.Embedding`` of ``module`` from N(0, 1) and return their names.

    For layouts whose first attention reads the embeddings unnormalised (post-LN, GPT-1), where
    embeddings at the initializer's scale leave the attention scores near zero and the softmax flat.
    Changed in place, so an output projection tied to the embeddings stays tied.
    """
    changed = []
    with torch.no_grad():
        for name, child in module.named_modules():
            if isinstance(child, nn.Embedding):
                child.weight.normal_(0.0, 1.0)
                changed.append(f"{name}.weight")
    return changed
