"""The scheduler's side of faults: a stage that lost its KV cache (every running sequence is recomputed), a new KV
block count, and a microbatch a stage failed while staying up. Plain Python, no torch; mixed into
coordinator/scheduler.Scheduler, whose state it reads and changes."""

from __future__ import annotations

from stagecoach.coordinator.block_manager import BlockManager
from stagecoach.coordinator.sequence import Sequence, SequenceStatus
from stagecoach.proto.microbatch import MicroBatch

MAX_RETRIES = 1  # a sequence in a failed microbatch is retried once, alone; failing again ends it


class Recovery:
    def recompute_all(self) -> int:
        """After a stage lost its KV cache: every running sequence goes back to waiting, to be re-prefilled
        from prompt + tokens so far. Microbatches in flight are forgotten. Returns how many sequences."""
        seqs = list(self.running)
        for seq in seqs:
            seq.num_scheduled_tokens = seq.num_computed_tokens  # nothing is in flight any more
            seq.is_awaiting_sample = False
            self._requeue(seq)
        for seq in self._pending_free:
            seq.num_scheduled_tokens = seq.num_computed_tokens
            self._release(seq)
        self._pending_free.clear()
        self.block_manager.drop_cache()  # a replaced stage, or one with new layers, holds none of that K/V
        return len(seqs)

    def resize_blocks(self, num_blocks: int) -> None:
        """The stages' new KV block count (after a rebalance or a recovery), once recompute_all has freed every block."""
        assert self.block_manager.num_free_blocks == self.block_manager.num_blocks, "resize_blocks with blocks in use"
        self.config.num_blocks = num_blocks
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.prefix_caching)

    def microbatch_failed(self, batch: MicroBatch, inflight: list[MicroBatch]) -> tuple[list[Sequence], set[int]]:
        """A stage failed `batch` and stayed up. Returns the sequences that have now failed more than MAX_RETRIES
        times (ended, finish_reason "error") and the ids of the microbatches whose results are void.

        The stages before the failing one applied the microbatch and those after it never saw it, so its
        sequences start again from position 0, recomputed from prompt + tokens so far, as after a preemption;
        so do the sequences of every microbatch in `inflight` that shares one with them (transitively: those
        may be refused downstream, or have applied state that is now void). Each sequence of `batch` itself
        counts a failure and runs alone (see schedule) until its next token comes back.
        """
        void, seq_ids = {batch.batch_id}, {c.seq_id for c in batch.seqs}
        grew = True
        while grew:
            grew = False
            for other in inflight:
                if other.batch_id not in void and any(c.seq_id in seq_ids for c in other.seqs):
                    void.add(other.batch_id)
                    seq_ids.update(c.seq_id for c in other.seqs)
                    grew = True
        for seq_id in sorted(seq_ids):
            seq = self.sequences.get(seq_id)
            if seq is None:
                continue
            seq.num_scheduled_tokens = seq.num_computed_tokens  # nothing of it is in flight any more
            seq.is_awaiting_sample = False
            if seq in self._pending_free:  # finished while in flight
                self._pending_free.remove(seq)
                self._release(seq)
            elif seq.status is SequenceStatus.RUNNING:
                self._requeue(seq)
                self._drops.append(
                    seq_id
                )  # the stages forget its partial state (its first chunk would replace it anyway)
        ended = []
        for chunk in batch.seqs:
            seq = self.sequences.get(chunk.seq_id)
            if seq is None or seq.is_finished:
                continue
            seq.num_failures += 1
            if seq.num_failures > MAX_RETRIES:
                self._finish(seq, "error")
                ended.append(seq)
            else:
                self._suspects.add(seq.seq_id)
        return ended, void
