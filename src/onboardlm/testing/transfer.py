"""Copy weights from a HuggingFace module into its lean counterpart through the real loading path."""

from __future__ import annotations

from torch import nn

from onboardlm.models.factory import LoadReport, load_checkpoint_into


def transfer_weights(reference: nn.Module, lean: nn.Module) -> LoadReport:
    """Load ``reference.state_dict()`` into ``lean`` with ``load_state_dict`` and a strict key check.

    The lean module's load-state-dict hooks run (e.g. unpacking fused experts), exactly as when a
    checkpoint is loaded, so a test that passes exercises the same code as a real load.
    """
    state_dict = {key: value.detach().clone() for key, value in reference.state_dict().items()}
    return load_checkpoint_into(lean, state_dict, subject=f"state dict of {type(reference).__name__}")
