"""Hands out KV cache blocks to sequences and takes them back; plain Python, no torch."""

from __future__ import annotations

from collections import deque

from stagecoach.coordinator.sequence import Sequence


class BlockManager:
    """A free list of `num_blocks` blocks of `block_size` slots, shared by every stage's cache.

    Every stage holds the same block layout for its own layers, so one allocation here
    addresses all of them; freeing needs no message to the stages.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's table can cover positions [0, num_tokens) with the free blocks."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        assert needed <= len(self._free), "grow() without can_grow()"
        for _ in range(needed):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table = []
