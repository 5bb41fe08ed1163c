"""Shared test setup: one torch thread per xdist worker, GPU tests skipped without CUDA, factory
registrations restored after each test, a two-rank ``torchrun`` command."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch

from onboardlm.models.factory import AutoModelForCausalLMFactory


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _factory_registrations() -> Iterator[None]:
    """Tests that import a generated model file register it; undo that after each test."""
    with AutoModelForCausalLMFactory.registrations_restored():
        yield


@pytest.fixture
def torchrun_two_ranks() -> list[str]:
    """The command prefix that starts two local ranks under ``torch.distributed.run --standalone``,
    whose rendezvous binds a free port itself (no port picked here and released before use)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
