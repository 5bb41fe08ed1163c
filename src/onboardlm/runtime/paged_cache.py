"""Paged KV cache: fixed-size blocks of cache slots, handed out from a free list.

A graph with state caches (conv, SSM, delta rule) also gets state slots: one ``[*features]`` state per
running sequence, handed out by a :class:`StateSlots` free list when the sequence is admitted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from onboardlm.transforms.kv_cache import CacheSpec


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` cache positions."""
    return -(-tokens // block_size)


class BlockAllocator:
    """The free list of ``num_blocks`` cache blocks; a block belongs to at most one sequence."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks off the free list; :class:`MemoryError` when fewer are free."""
        if count > len(self._free):
            raise MemoryError(f"{count} KV blocks asked for, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Return ``blocks`` to the free list; freeing a block that is not in use is an error."""
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"KV block {block} is not in use")
            self._used.remove(block)
            self._free.append(block)


class StateSlots:
    """The free list of ``num_slots`` state slots; a slot belongs to at most one running sequence."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"need at least one state slot, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a slot off the free list; :class:`MemoryError` when none is free."""
        if not self._free:
            raise MemoryError(f"no state slot free ({self.num_slots} in use)")
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"state slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)


@dataclass
class PagedKVCache:
    """Zero-initialised caches, one per :class:`CacheSpec`: ``[num_blocks, block_size, *features]`` per
    token, ``[num_state_slots, *features]`` per state."""

    num_blocks: int
    block_size: int
    tensors: dict[str, torch.Tensor]
    num_state_slots: int = 0

    @classmethod
    def allocate(
        cls,
        specs: list[CacheSpec],
        num_blocks: int,
        block_size: int,
        device: str | torch.device,
        num_state_slots: int = 0,
    ) -> PagedKVCache:
        if num_state_slots < 1 and any(not spec.per_token for spec in specs):
            raise ValueError("a graph with state caches needs at least one state slot")
        tensors = {
            spec.name: torch.zeros(
                *((num_blocks, block_size) if spec.per_token else (num_state_slots,)),
                *spec.features,
                dtype=spec.dtype,
                device=device,
            )
            for spec in specs
        }
        return cls(num_blocks, block_size, tensors, num_state_slots)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
