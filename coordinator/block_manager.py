"""Hands out KV cache blocks to sequences and takes them back, sharing full blocks by their content (prefix caching); plain Python, no torch.

Every stage holds the same block layout for its own layers, so one allocation here addresses all
of them, and a prefix found here is a hit on every stage at once.

A full block's key is SHA-256 of its parent's key and its token ids: equal keys mean equal tokens
from position 0, hence equal K/V on every stage. A block becomes reusable once the microbatch that
filled it has come back (`commit`): a microbatch that fails or is fenced off never publishes a
block some stage did not write. Freed blocks keep their content and key and are evicted least
recently used first (a block without a key before any with one) when a sequence needs a block, so
a cached prefix costs no running sequence its place.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from stagecoach.coordinator.sequence import Sequence


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The content key of a full block: its parent's key (b"" for the first block) and its token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    """`num_blocks` blocks of `block_size` slots: reference-counted, full ones shared by content when prefix_caching is on."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # evicted from the front
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # block → its key, once committed
        self._block_of: dict[bytes, int] = {}  # key → the block holding that content
        self._held = 0  # blocks in every sequence's table, a shared one once per holder: what they would take unshared

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content a new request can reuse (held or free)."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- a waiting sequence's cached prefix ---------------------------------------------------
    def match(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """The longest run of cached full blocks holding seq's first tokens, and their keys; always leaves its last
        token to compute (its logits are needed), so the block that token lands in is never a shared one."""
        if not self.prefix_caching:
            return [], []
        blocks, keys, parent = [], [], b""
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            key = block_key(parent, seq.tokens(i * bs, (i + 1) * bs))
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            parent = key
        return blocks, keys

    def can_adopt(self, blocks: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence may start with the cached `blocks` and the rest of its first num_tokens positions.

        Admission counts a shared block once per sequence holding it, as if nothing were shared: caching admits no
        more sequences than running without it would, so their growth never preempts more. What sharing saves is
        prefill compute, and room for the running sequences to grow.
        """
        taken_from_free = sum(1 for b in blocks if self._refs[b] == 0)
        needed = self.blocks_for(num_tokens)
        return needed - len(blocks) <= len(self._free) - taken_from_free and needed <= self.num_blocks - self._held

    def adopt(self, seq: Sequence, blocks: list[int], keys: list[bytes]) -> None:
        """seq (holding no blocks) starts with the cached blocks, shared with whoever else holds them."""
        assert not seq.block_table
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        self._held += len(blocks)
        seq.block_table, seq.block_keys = list(blocks), list(keys)

    # -- growing, committing, freeing ---------------------------------------------------------
    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether seq's table can cover positions [0, num_tokens) with the free blocks."""
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        assert needed <= len(self._free), "grow() without can_grow()"
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)  # the least recently used; its cached content is evicted
            key = self._key_of.pop(block, None)
            if key is not None:
                del self._block_of[key]
            self._refs[block] = 1
            seq.block_table.append(block)
        self._held += needed

    def shrink(self, seq: Sequence, num_tokens: int) -> None:
        """seq keeps only the blocks covering positions [0, num_tokens) (a verify pass's rejected drafts): the rest, which
        hold no committed content, go back to the free list."""
        keep = self.blocks_for(num_tokens)
        for block in reversed(seq.block_table[keep:]):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                self._free.move_to_end(block, last=False)  # no content worth keeping: reused first
        self._held -= max(len(seq.block_table) - keep, 0)
        del seq.block_table[keep:]

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Positions [0, num_tokens) of seq are written on every stage (their microbatch came back): its full blocks
        among them become reusable, unless a block with the same content already is."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = seq.block_keys[-1] if seq.block_keys else b""
        for i in range(len(seq.block_keys), num_tokens // bs):
            key = block_key(parent, seq.tokens(i * bs, (i + 1) * bs))
            block = seq.block_table[i]
            if key not in self._block_of and block not in self._key_of:
                self._key_of[block], self._block_of[key] = key, block
            seq.block_keys.append(key)
            parent = key

    def free(self, seq: Sequence) -> None:
        """Drops seq's hold on its blocks. A block no one holds any more keeps its content: the last of a table is
        evicted first (a prefix outlives its tail), and a block without a key before every block with one."""
        self._held -= len(seq.block_table)
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._key_of:
                    self._free.move_to_end(block, last=False)
        seq.block_table, seq.block_keys = [], []

    def drop_cache(self) -> None:
        """Forgets every block's content (a stage lost its K/V: a recovery, or a rebalance moved layers)."""
        self._key_of.clear()
        self._block_of.clear()
