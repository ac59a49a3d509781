"""Continuous batching into microbatches: decode steps and prefill chunks under a token budget and the free KV blocks.

Plain Python, no torch. A sequence whose sampling chunk is in flight sits out until its token
comes back; a long prompt's non-sampling chunks may follow each other down the pipe. When blocks
run out, the youngest sequence that has nothing in flight is preempted: its blocks are freed and
it is recomputed from prompt + tokens so far when blocks are free again. A microbatch that a stage
failed (staying up) puts its sequences under suspicion: each is recomputed in a microbatch of its
own until its next token comes back, and one that fails again ends (`microbatch_failed`).
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass

from stagecoach.coordinator.block_manager import BlockManager
from stagecoach.coordinator.request_checks import RequestLimits, check_request
from stagecoach.coordinator.scheduler_recovery import Recovery
from stagecoach.coordinator.sequence import Sequence, SequenceStatus
from stagecoach.coordinator.speculative import PassPlan, Speculation
from stagecoach.errors import ConfigError
from stagecoach.proto.microbatch import ChunkKind, MicroBatch, SeqChunk
from stagecoach.proto.types import SampleResult, SamplingParams


@dataclass(slots=True)
class SchedulerConfig:
    """Built from the cluster config (pipeline.max_batch_tokens, max_num_seqs; server.max_running) and the started pipeline."""

    num_blocks: int  # KV blocks per stage (every stage holds the same layout)
    block_size: int  # tokens per KV block
    max_num_batched_tokens: int  # token budget of one microbatch (chunked prefill splits longer prompts)
    max_num_seqs: int  # sequences in one microbatch at most
    max_model_len: int  # prompt + generated tokens of one sequence at most
    max_running: int | None = None  # sequences admitted (holding KV blocks) at once; None: as many as fit
    vocab_size: int | None = None  # prompts' token ids must be below this; None: not checked here
    prefix_caching: bool = True  # full blocks shared by content between requests (cache.prefix_caching)

    def __post_init__(self) -> None:
        for name in (
            "num_blocks",
            "block_size",
            "max_num_batched_tokens",
            "max_num_seqs",
            "max_model_len",
            "max_running",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"scheduler: {name} must be at least 1, got {getattr(self, name)}")


class Scheduler(Recovery):
    def __init__(self, config: SchedulerConfig, speculation: Speculation | None = None) -> None:
        self.config = config
        self.speculation = speculation  # verify passes of draft tokens (coordinator/speculative.py); None: off
        self.block_manager = BlockManager(config.num_blocks, config.block_size, config.prefix_caching)
        self.prefix_cache_queries = 0  # prompt tokens of first admissions
        self.prefix_cache_hits = 0  # of them, found in the prefix cache (not prefilled)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self._drops: list[int] = []  # finished, aborted or preempted since the last microbatch: the stages forget them
        self._pending_free: list[Sequence] = []  # finished while a chunk was in flight
        self._suspects: set[int] = set()  # in a failed microbatch since their last token: each runs alone
        self._next_batch_id = 0
        self._seq_ids = itertools.count()

    # -- requests -------------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        c = self.config
        return RequestLimits(c.max_model_len, c.vocab_size, c.num_blocks * c.block_size)

    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        return self.add_requests([(prompt_token_ids, sampling)])[0]

    def add_requests(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
        """Queues requests, all or none: RequestError (from requests.check_request) for the first that can never run."""
        limits = self.limits
        for prompt, sampling in requests:
            check_request(prompt, sampling, limits)
        seqs = [Sequence(next(self._seq_ids), list(prompt), sampling) for prompt, sampling in requests]
        for seq in seqs:
            self.sequences[seq.seq_id] = seq
            self.waiting.append(seq)
        return seqs

    def abort(self, seq_id: int) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, "abort")

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one microbatch -------------------------------------------------------------------
    def schedule(self, max_seqs: int | None = None) -> MicroBatch | None:
        """The next microbatch, or None when nothing can run now (everything is waiting on the pipe).

        max_seqs caps this microbatch below config.max_num_seqs, to spread sequences over several.
        """
        if self._suspects and (batch := self._schedule_suspect()) is not None:
            return batch
        budget = self.config.max_num_batched_tokens
        max_seqs = min(max_seqs or self.config.max_num_seqs, self.config.max_num_seqs)
        chunks: list[SeqChunk] = []
        scheduled: set[int] = set()
        plan = self._plan(budget, max_seqs)

        for seq in list(self.running):
            if budget == 0 or len(chunks) >= max_seqs:
                break
            n = min(self._unscheduled(seq), budget)
            if n == 0:
                continue
            drafts = self._drafts(seq, budget, plan) if n == 1 else []
            if not self._make_room(seq, seq.num_scheduled_tokens + n + len(drafts), scheduled):
                continue
            chunks.append(self._chunk(seq, n, drafts))
            n += len(drafts)
            scheduled.add(seq.seq_id)
            budget -= n

        max_running = self.config.max_running or self.config.num_blocks
        while self.waiting and budget > 0 and len(chunks) < max_seqs and len(self.running) < max_running:
            seq = self.waiting[0]
            # Admission never preempts: the running sequences go first (and a suspect goes alone).
            if seq.num_failures or (n := self._admit(seq, budget)) is None:
                break
            chunks.append(self._chunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n

        return self._batch(chunks) if chunks else None

    def _schedule_suspect(self) -> MicroBatch | None:
        """A microbatch holding only one suspect's next chunk, or None when no suspect can run now."""
        budget = self.config.max_num_batched_tokens
        for seq_id in sorted(self._suspects):
            seq = self.sequences[seq_id]
            if seq.status is SequenceStatus.RUNNING:
                n = min(seq.num_tokens - seq.num_scheduled_tokens, budget)
                if seq.is_awaiting_sample or n == 0 or not self._make_room(seq, seq.num_scheduled_tokens + n, {seq_id}):
                    continue
            elif (
                len(self.running) >= (self.config.max_running or self.config.num_blocks)
                or (n := self._admit(seq, budget)) is None
            ):
                continue
            return self._batch([self._chunk(seq, n)])
        return None

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """A waiting sequence takes its cached prefix and blocks for a first chunk of at most `budget` tokens, and runs;
        returns that chunk's length, or None (nothing changes) when its blocks do not fit."""
        cached, keys = self.block_manager.match(seq)
        start = len(cached) * self.block_manager.block_size
        n = min(seq.num_tokens - start, budget)
        if not self.block_manager.can_adopt(cached, start + n):
            return None
        self.waiting.remove(seq)  # the head, but for a suspect
        self.block_manager.adopt(seq, cached, keys)
        self.block_manager.grow(seq, start + n)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        seq.num_scheduled_tokens = seq.num_computed_tokens = start  # the stages hold the prefix's K/V already
        seq.num_blocks_sent = seq.num_history_sent = 0  # its first chunk starts it (again) on every stage
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(start, seq.num_prompt_tokens)
            self.prefix_cache_queries += seq.num_prompt_tokens
            self.prefix_cache_hits += seq.num_cached_tokens
        return n

    def _batch(self, chunks: list[SeqChunk]) -> MicroBatch:
        dropped, self._drops = self._drops, []
        return MicroBatch(
            batch_id=self._take_batch_id(),
            seqs=chunks,
            token_ids=[t for c in chunks for t in self._chunk_tokens(c)],
            drop_seq_ids=dropped,
        )

    def _chunk_tokens(self, c: SeqChunk) -> list[int]:
        """Stage 0's input for a chunk: its positions' tokens (a verify chunk: the newest token, then its drafts)."""
        if c.kind is ChunkKind.VERIFY:
            return self.sequences[c.seq_id].tokens(c.start_pos, c.start_pos + 1) + c.token_ids
        return self.sequences[c.seq_id].tokens(c.start_pos, c.start_pos + c.num_tokens)

    def _drafts(self, seq: Sequence, budget: int, plan: PassPlan | None) -> list[int]:
        """Draft tokens to verify with seq's next token (a decode step), or [] to decode it plainly."""
        if self.speculation is None or seq.num_history_sent != seq.num_tokens or seq.num_blocks_sent == 0:
            return []
        return self.speculation.drafts(seq, budget, len(self.running), self.config.max_model_len, plan)

    def _unscheduled(self, seq: Sequence) -> int:
        """Tokens of a running sequence not scheduled yet (0: nothing it can run now)."""
        if seq.status is not SequenceStatus.RUNNING or seq.is_awaiting_sample or seq.num_failures:
            return 0
        return seq.num_tokens - seq.num_scheduled_tokens

    def _plan(self, budget: int, max_seqs: int) -> PassPlan | None:
        """The speculation cost model's view of the next microbatch: the rows its running sequences will take without
        drafts (the first max_seqs of them that have work, within the budget), and the drafts proposed for them."""
        if self.speculation is None or not self.speculation.config.cost_model:
            return None
        ready = [(s, n) for s in self.running if (n := self._unscheduled(s)) > 0][:max_seqs]
        proposals = {s.seq_id: d for s, n in ready if n == 1 and (d := self._drafts(s, budget, None))}
        rows, plain = min(sum(n for _, n in ready), budget), all(n == 1 for _, n in ready)
        return self.speculation.plan(rows, len(ready), plain, proposals)

    def _take_batch_id(self) -> int:
        self._next_batch_id += 1
        return self._next_batch_id - 1

    def _make_room(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Grows seq's block table to num_tokens, preempting the youngest idle sequences if needed."""
        while not self.block_manager.can_grow(seq, num_tokens):
            victims = [s for s in self.running if s is not seq and s.seq_id not in scheduled and not s.is_in_flight]
            if not victims:
                return False  # blocks come back when in-flight work finishes
            self._preempt(max(victims, key=lambda s: s.seq_id))
        self.block_manager.grow(seq, num_tokens)
        return True

    @property
    def next_batch_id(self) -> int:
        """The id the next microbatch will get (microbatch ids only grow)."""
        return self._next_batch_id

    def stats(self) -> dict:
        """The scheduler's part of /v1/stats' `engine` object (docs/stats.md)."""
        bm = self.block_manager
        queries, hits = self.prefix_cache_queries, self.prefix_cache_hits
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "block_size": bm.block_size,
            "preemptions": self.num_preemptions,
            "isolating": self.num_suspects,
            "prefix_cache": {
                "enabled": bm.prefix_caching,
                "cached_blocks": bm.num_cached_blocks,
                "prompt_tokens": queries,
                "cached_tokens": hits,
                "hit_rate": round(hits / queries, 4) if queries else 0.0,
            },
        }

    @property
    def num_suspects(self) -> int:
        """Sequences running alone because a microbatch of theirs failed."""
        return len(self._suspects)

    def _preempt(self, seq: Sequence) -> None:
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)
        self._drops.append(seq.seq_id)

    def _requeue(self, seq: Sequence) -> None:
        """Frees seq's blocks and puts it back in the queue, to be recomputed from prompt + tokens so far."""
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = seq.num_computed_tokens = 0
        # Back to the front, in arrival order, so it is recomputed before newer requests.
        index = next((i for i, w in enumerate(self.waiting) if w.seq_id > seq.seq_id), len(self.waiting))
        self.waiting.insert(index, seq)

    def _chunk(self, seq: Sequence, n: int, drafts: list[int] | None = None) -> SeqChunk:
        """What the stages lack of seq for its next n tokens: new blocks, and the tokens the last stage's history lacks.
        With drafts, a verify chunk: the newest token and the drafts after it (the last stage's history gains only
        what it accepts)."""
        start = seq.num_scheduled_tokens
        end = start + n
        do_sample = end == seq.num_tokens
        # the stages start the sequence (again) from this chunk: at 0, or after its cached prefix
        first = seq.num_blocks_sent == 0
        history = seq.tokens(seq.num_history_sent, end)  # a first chunk: the whole history, cached prompt included
        chunk = SeqChunk(
            seq_id=seq.seq_id,
            start_pos=start,
            num_tokens=n + len(drafts or ()),
            new_blocks=seq.block_table[seq.num_blocks_sent :],
            do_sample=do_sample,
            sampling=seq.sampling if first else None,
            num_prompt_tokens=seq.num_prompt_tokens if first else 0,
            token_ids=list(drafts) if drafts else history,
            kind=ChunkKind.VERIFY if drafts else ChunkKind.of(first, n, len(history)),
        )
        seq.num_blocks_sent = len(seq.block_table)
        seq.num_history_sent = max(seq.num_history_sent, end)
        seq.num_scheduled_tokens = start + chunk.num_tokens
        seq.is_awaiting_sample = do_sample
        return chunk

    # -- results --------------------------------------------------------------------------
    def process_results(self, batch: MicroBatch, samples: list[SampleResult]) -> list[Sequence]:
        """Applies a returned microbatch; returns the sequences that received a token (a verify chunk's sequence: the
        drafts the last stage accepted and one more, each a sample, in order)."""
        emitted = Counter(sample.seq_id for sample in samples)
        for chunk in batch.seqs:
            seq = self.sequences[chunk.seq_id]
            if chunk.kind is ChunkKind.VERIFY:  # positions after the accepted drafts are void: their blocks go back
                seq.num_computed_tokens += emitted.get(seq.seq_id, chunk.num_tokens)
                seq.num_scheduled_tokens = seq.num_computed_tokens
                self.block_manager.shrink(seq, seq.num_computed_tokens)
                seq.num_blocks_sent = min(seq.num_blocks_sent, len(seq.block_table))
                if self.speculation is not None and seq.seq_id in emitted:
                    num_out = len(seq.output_token_ids) + emitted[seq.seq_id]
                    self.speculation.record(seq.seq_id, chunk.num_tokens - 1, emitted[seq.seq_id], num_out)
            else:
                seq.num_computed_tokens += chunk.num_tokens
                if not seq.is_finished:
                    self.block_manager.commit(seq, seq.num_computed_tokens)
            if chunk.do_sample:
                seq.is_awaiting_sample = False
        verified = {c.seq_id for c in batch.seqs if c.kind is ChunkKind.VERIFY}
        updated = []
        for sample in samples:
            seq = self.sequences.get(sample.seq_id)
            if seq is None or seq.is_finished:  # aborted while its token was in flight, or stopped by an earlier one
                continue
            if seq.num_failures:  # its microbatches go through again: no longer under suspicion
                seq.num_failures = 0
                self._suspects.discard(seq.seq_id)
            seq.output_token_ids.append(sample.token_id)
            seq.num_history_sent = seq.num_tokens  # the last stage appended the token to its history itself
            seq.output_logprobs.append(sample.logprob)
            seq.output_top_logprobs.append(sample.top_logprobs)
            if seq.seq_id in verified:  # its accepted drafts' blocks, as their tokens arrive (before it may finish)
                self.block_manager.commit(seq, min(seq.num_computed_tokens, seq.num_tokens))
            if not updated or updated[-1] is not seq:
                updated.append(seq)
            params = seq.sampling
            if not params.ignore_eos and sample.token_id in params.stop_token_ids:
                self._finish(seq, "stop")
            elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.config.max_model_len:
                self._finish(seq, "length")
        for seq in [s for s in self._pending_free if not s.is_in_flight]:
            self._pending_free.remove(seq)
            self._release(seq)
        return updated

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._suspects.discard(seq.seq_id)
        if seq.is_in_flight:
            # Its blocks are still being written by a microbatch in flight: the pipeline hands
            # them back when that microbatch returns (see process_results).
            self._pending_free.append(seq)
        else:
            self._release(seq)
        self._drops.append(seq.seq_id)

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        del self.sequences[seq.seq_id]
        if self.speculation is not None:
            self.speculation.forget(seq.seq_id)
