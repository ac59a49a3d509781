"""A stage's paged KV cache: K and V block pools for each layer it owns, addressed by slots and block tables."""

from __future__ import annotations

import torch

from stagecoach.errors import KVCacheError


class KVCache:
    """K and V of every owned layer, each `[num_blocks + 1, block_size, num_kv_heads, head_dim]` (the last: `pad_block`).

    The cache makes no allocation decisions: the coordinator's block manager hands out blocks, and
    the stage's sequence table (stage/sequences.py) says which a microbatch writes and reads.
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
            raise KVCacheError(
                f"a KV cache needs at least one block of at least one slot, got {num_blocks} x {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One block more than it hands out: the padding rows of a compiled decode step (stage/compiled.py) write there.
        self.pad_block = num_blocks
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> KVCache:
        """A cache of num_blocks blocks for the layers a stage's model holds."""
        c = model.config
        return cls(
            model.layer_end - model.layer_start,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
            dtype,
            device,
        )

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    def layer(self, local_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[local_index], self.v[local_index]


def cpu_num_blocks(num_blocks: int | None, max_tokens: int, block_size: int) -> int:
    """A CPU stage's cache size: cache.num_blocks if given, else enough blocks for cache.max_tokens."""
    return num_blocks or -(-max_tokens // block_size)
