"""Copy weights from a HuggingFace module into its lean counterpart through the real loading path."""

from __future__ import annotations

import torch
from torch import nn

from onboardlm.models.factory import LoadReport, load_checkpoint_into


def checkpoint_state_dict(reference: nn.Module) -> dict[str, torch.Tensor]:
    """``reference.state_dict()`` as a saved checkpoint holds it: detached copies, and a tensor that
    several keys share (tied embeddings) only under its first key, as ``save_pretrained`` writes it."""
    state_dict, seen = {}, set()
    for key, value in reference.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and identity in seen:
            continue
        seen.add(identity)
        state_dict[key] = value.detach().clone()
    return state_dict


def transfer_weights(reference: nn.Module, lean: nn.Module) -> LoadReport:
    """Load ``reference``'s checkpoint state dict into ``lean`` with ``load_state_dict`` and a strict
    key check.

    The lean module's load-state-dict hooks run (e.g. unpacking fused experts) and keys it ties must
    be declared tied (the checkpoint has ``lm_head.weight`` only when untied), exactly as when a
    checkpoint is loaded, so a test that passes exercises the same code as a real load.
    """
    subject = f"state dict of {type(reference).__name__}"
    return load_checkpoint_into(lean, checkpoint_state_dict(reference), subject=subject)
