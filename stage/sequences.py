"""What a stage remembers of each running sequence: its block table and how many tokens it holds.

A microbatch's chunk says only what it adds (the idea of vLLM V1's scheduler output: a new
request's data once, then what changed; the kinds of chunk: proto/microbatch.py): a first chunk starts a
sequence with its blocks, at 0 or after a cached prefix whose blocks it lists first; a later chunk
must continue exactly where the stage's copy ends and may append blocks, except after a VERIFY chunk, when it may
start after any of that chunk's positions (the drafts after it were rejected: the table keeps the blocks covering it). Every chunk
of a microbatch is checked before any is applied, with the field and index of the first fault;
the checks are C loops over the microbatch (min, max, set), so they cost per new token and block, not per token of context.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagecoach.errors import KVCacheError, RequestError
from stagecoach.proto.microbatch import ChunkKind, MicroBatch, check_chunk


@dataclass(slots=True)
class _Sequence:
    block_table: list[int]  # appended to, never rewritten (a rollback replaces it): a compute thread may still read it
    num_tokens: int  # positions whose K/V this stage has been asked to write
    verify_start: int = -1  # its last chunk was a VERIFY from this position: the next may start after any of its rows


class SequenceTable:
    """Every running sequence's block table and length on one stage; changed only by `admit`, in arrival order."""

    def __init__(self, num_blocks: int, block_size: int, max_positions: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_positions = max_positions
        self.max_blocks = -(-max_positions // block_size)
        self._seqs: dict[int, _Sequence] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def clear(self) -> None:
        """A recovery's fence: the re-prefill's first chunks rebuild every table."""
        self._seqs.clear()

    def admit(self, batch: MicroBatch) -> list[list[int]]:
        """Checks the microbatch against what this stage holds, then applies its drops and chunks.

        Returns each chunk's block table (covering at least its positions), in chunk order.
        """
        self._check(batch)
        for seq_id in batch.drop_seq_ids:
            self._seqs.pop(seq_id, None)  # a sequence that never reached the stages is fine to drop
        tables = []
        for chunk in batch.seqs:
            if chunk.is_first:
                seq = self._seqs[chunk.seq_id] = _Sequence(list(chunk.new_blocks), 0)
            else:
                seq = self._seqs[chunk.seq_id]
                if chunk.start_pos < seq.num_tokens:  # after a verify pass: its rejected drafts' positions are void
                    seq.block_table = seq.block_table[: -(-chunk.start_pos // self.block_size)]
                seq.block_table.extend(chunk.new_blocks)
            seq.num_tokens = chunk.start_pos + chunk.num_tokens
            seq.verify_start = chunk.start_pos if chunk.kind is ChunkKind.VERIFY else -1
            tables.append(seq.block_table)
        return tables

    def _check(self, batch: MicroBatch) -> None:
        """Whole-microbatch checks run as C loops (min, max, set); only a failure looks for the first offender."""
        chunks = batch.seqs
        if not chunks:
            raise RequestError("seqs is empty: a microbatch needs at least one sequence")
        ids = [c.seq_id for c in chunks]
        if len(set(ids)) != len(ids):
            i = next(i for i, s in enumerate(ids) if s in ids[:i])
            raise RequestError(f"seqs[{i}].seq_id {ids[i]} appears twice in one microbatch")
        counts = [c.num_tokens for c in chunks]
        if min(counts) < 1:
            i = next(i for i, n in enumerate(counts) if n < 1)
            raise RequestError(f"seqs[{i}].num_tokens must be at least 1, got {counts[i]}")
        ends = [c.start_pos + c.num_tokens for c in chunks]
        if max(ends) > self.max_positions:
            i = next(i for i, e in enumerate(ends) if e > self.max_positions)
            raise RequestError(
                f"seqs[{i}].start_pos: positions up to {ends[i]} exceed max_position_embeddings {self.max_positions}"
            )
        blocks = [b for c in chunks for b in c.new_blocks]
        if blocks and (min(blocks) < 0 or max(blocks) >= self.num_blocks):
            i, j = next(
                (i, j) for i, c in enumerate(chunks) for j, b in enumerate(c.new_blocks) if not 0 <= b < self.num_blocks
            )
            raise KVCacheError(
                f"seqs[{i}].new_blocks[{j}]: block {chunks[i].new_blocks[j]} is outside the cache's {self.num_blocks} blocks"
            )
        dropped = set(batch.drop_seq_ids)
        # a dictionary look-up per sequence, nothing per token
        for i, (c, end) in enumerate(zip(chunks, ends, strict=True)):
            check_chunk(c, i)  # what its kind allows (proto/microbatch.py)
            held = len_table = 0
            if c.is_first:  # at 0, or after a cached prefix of whole blocks, listed first in its new_blocks
                held = c.start_pos
                if held % self.block_size:
                    raise RequestError(
                        f"seqs[{i}].start_pos {held}: a first chunk starts at 0 or after a cached prefix of whole "
                        f"{self.block_size}-token blocks"
                    )
            else:
                seq = self._seqs.get(c.seq_id)
                if seq is None or c.seq_id in dropped:
                    raise RequestError(
                        f"seqs[{i}].seq_id {c.seq_id} is not a sequence this stage holds: its first chunk must bring "
                        f"its sampling parameters"
                    )
                held, len_table = seq.num_tokens, len(seq.block_table)
                if 0 <= seq.verify_start < c.start_pos < held:  # the drafts after start_pos were rejected
                    held, len_table = c.start_pos, -(-c.start_pos // self.block_size)
            if c.start_pos != held:
                raise RequestError(
                    f"seqs[{i}].start_pos {c.start_pos}: this stage holds {held} tokens of sequence {c.seq_id}"
                )
            have, need = len_table + len(c.new_blocks), -(-end // self.block_size)
            if not need <= have <= self.max_blocks:
                raise RequestError(
                    f"seqs[{i}].new_blocks: the block table would hold {have} blocks; positions up to {end} need {need} "
                    f"(at most {self.max_blocks})"
                )
