"""A stage's paged KV cache: K and V block pools for each layer it owns, addressed by slots and block tables."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from stagecoach.errors import KVCacheError


class KVCache:
    """K and V of every owned layer, each `[num_blocks, block_size, num_kv_heads, head_dim]`.

    The cache makes no allocation decisions: the coordinator's block manager hands out blocks,
    and every microbatch says which slots to write and which blocks to read.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise KVCacheError(f"a KV cache needs at least one block of at least one slot, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def layer(self, local_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[local_index], self.v[local_index]

    def check(self, slot_mapping: Iterable[int], block_tables: Iterable[Iterable[int]]) -> None:
        """Raises KVCacheError naming the first slot or block outside the cache."""
        for slot in slot_mapping:
            if not 0 <= slot < self.num_slots:
                raise KVCacheError(f"slot {slot} is outside the cache's {self.num_slots} slots ({self.num_blocks} blocks x {self.block_size})")
        for table in block_tables:
            for block in table:
                if not 0 <= block < self.num_blocks:
                    raise KVCacheError(f"block {block} is outside the cache's {self.num_blocks} blocks")
