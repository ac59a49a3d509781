"""Scheduler and block manager: plain Python, tested without torch, Ray or gRPC."""

from __future__ import annotations

import subprocess
import sys

import pytest
from defaults import scheduler_config

from stagecoach.coordinator.scheduler import Scheduler
from stagecoach.errors import RequestError
from stagecoach.proto.types import SampleResult, SamplingParams


def params(max_tokens=4, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def run_batch(sched, batch, token=7):
    """Plays the pipeline: every sampling chunk gets `token` back."""
    return sched.process_results(batch, [SampleResult(c.seq_id, token) for c in batch.seqs if c.do_sample])


def test_core_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import stagecoach.coordinator.scheduler, stagecoach.coordinator.block_manager, stagecoach.cluster.partition\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_first_chunk_brings_its_blocks_sampling_and_tokens():
    sched = Scheduler(scheduler_config(8, block_size=4))
    seq = sched.add_request(list(range(10)), params())
    batch = sched.schedule()
    chunk = batch.seqs[0]
    assert chunk.start_pos == 0 and chunk.num_tokens == 10 and chunk.do_sample
    assert chunk.new_blocks == seq.block_table and len(chunk.new_blocks) == 3
    assert chunk.sampling is seq.sampling and chunk.num_prompt_tokens == 10
    assert chunk.token_ids == list(range(10)) and batch.token_ids == list(range(10))
    run_batch(sched, batch)
    (decode,) = sched.schedule().seqs  # position 10: still in the third block
    assert (decode.start_pos, decode.new_blocks, decode.token_ids, decode.sampling) == (10, [], [], None)


def test_continuous_batching_mixes_decode_and_prefill():
    sched = Scheduler(scheduler_config(32, block_size=4, max_num_batched_tokens=16))
    a = sched.add_request([1, 2, 3], params(max_tokens=3))
    run_batch(sched, sched.schedule())
    b = sched.add_request(list(range(20)), params(max_tokens=2))  # joins while a decodes
    batch = sched.schedule()
    assert [(c.seq_id, c.num_tokens) for c in batch.seqs] == [(a.seq_id, 1), (b.seq_id, 15)]
    assert not batch.seqs[1].do_sample  # chunked: the prompt continues in the next microbatch
    run_batch(sched, batch)
    batch = sched.schedule()
    assert [(c.seq_id, c.num_tokens, c.start_pos) for c in batch.seqs] == [(a.seq_id, 1, 4), (b.seq_id, 5, 15)]
    assert batch.seqs[1].token_ids == list(range(15, 20)) and batch.seqs[1].sampling is None  # what it adds, no more
    assert (
        batch.seqs[0].token_ids == [] and len(batch.seqs[0].new_blocks) == 1
    )  # a decodes position 4: a new block, no tokens
    run_batch(sched, batch)
    assert a.is_finished and a.finish_reason == "length" and a.output_token_ids == [7, 7, 7]
    assert batch.drop_seq_ids == [] and sched.schedule().drop_seq_ids == [a.seq_id]


def test_sequence_in_flight_waits_for_its_token():
    sched = Scheduler(scheduler_config(16, block_size=4))
    sched.add_request([1, 2, 3], params())
    first = sched.schedule()
    assert sched.schedule() is None  # its only chunk samples: nothing to send until the token is back
    run_batch(sched, first)
    assert sched.schedule() is not None


def test_long_prompt_chunks_may_pipeline():
    sched = Scheduler(scheduler_config(16, block_size=4, max_num_batched_tokens=8))
    sched.add_request(list(range(20)), params())
    b1, b2, b3 = sched.schedule(), sched.schedule(), sched.schedule()
    assert [c.start_pos for b in (b1, b2, b3) for c in b.seqs] == [0, 8, 16]
    assert b3.seqs[0].do_sample and sched.schedule() is None


def test_stop_token_and_freeing_blocks():
    sched = Scheduler(scheduler_config(4, block_size=4))
    seq = sched.add_request([1, 2], params(max_tokens=10, stop_token_ids=[99]))
    run_batch(sched, sched.schedule(), token=5)
    assert sched.block_manager.num_free_blocks == 3
    run_batch(sched, sched.schedule(), token=99)
    assert seq.finish_reason == "stop" and seq.output_token_ids == [5, 99]
    assert sched.block_manager.num_free_blocks == 4 and not sched.has_unfinished


def test_preemption_frees_youngest_and_recomputes():
    sched = Scheduler(scheduler_config(4, block_size=2))
    old = sched.add_request([1, 2, 3], params(max_tokens=4))  # 2 blocks
    young = sched.add_request([4, 5, 6], params(max_tokens=4))  # 2 blocks: the pool is full
    run_batch(sched, sched.schedule())  # both prefill (positions 0-2) and sample one token
    run_batch(sched, sched.schedule())  # both decode position 3: 2 blocks each, the pool is full
    batch = sched.schedule()  # old needs a third block for position 4: the young one goes
    assert sched.num_preemptions == 1 and young.num_preemptions == 1
    assert [c.seq_id for c in batch.seqs] == [old.seq_id]
    run_batch(sched, batch)
    while sched.has_unfinished:
        batch = sched.schedule()
        for c in batch.seqs:
            if c.seq_id == young.seq_id and c.start_pos == 0:
                # The re-prefill resends prompt + the token sampled before the preemption.
                assert c.token_ids == [4, 5, 6, 7, 7] and c.num_prompt_tokens == 3
        run_batch(sched, batch)
    assert old.output_token_ids == young.output_token_ids == [7, 7, 7, 7]
    assert sched.block_manager.num_free_blocks == 4


def test_abort_while_in_flight_frees_blocks_on_return():
    sched = Scheduler(scheduler_config(4, block_size=4))
    seq = sched.add_request([1, 2, 3], params())
    batch = sched.schedule()
    sched.abort(seq.seq_id)
    assert sched.block_manager.num_free_blocks == 3  # still being written by the batch in flight
    assert run_batch(sched, batch) == []
    assert sched.block_manager.num_free_blocks == 4 and seq.finish_reason == "abort"


def test_requests_that_can_never_fit_are_refused():
    sched = Scheduler(scheduler_config(2, block_size=4, max_model_len=100))
    with pytest.raises(RequestError, match="exceeds the KV cache's 8 token slots"):
        sched.add_request([1] * 6, params(max_tokens=4))
    with pytest.raises(RequestError, match="limit is 100"):
        sched.add_request([1] * 100, params())
    with pytest.raises(RequestError, match="empty"):
        sched.add_request([], params())


def test_a_failed_microbatch_isolates_its_sequences_and_ends_the_one_that_fails_again():
    sched = Scheduler(scheduler_config(32, block_size=4))
    a, bad, c = (sched.add_request(p, params(max_tokens=3)) for p in ([1, 2], [3, 4, 5], [6]))
    batch = sched.schedule()
    assert [ch.seq_id for ch in batch.seqs] == [a.seq_id, bad.seq_id, c.seq_id]
    ended, void = sched.microbatch_failed(batch, [])
    assert ended == [] and void == {batch.batch_id} and sched.num_suspects == 3
    assert (
        sched.block_manager.num_free_blocks == 32 and len(sched.waiting) == 3
    )  # every block back; all restart from position 0
    # Each suspect runs alone, from position 0, and the stages are told to forget what they half applied.
    alone = [sched.schedule() for _ in range(3)]
    assert [[(ch.seq_id, ch.start_pos) for ch in b.seqs] for b in alone] == [
        [(a.seq_id, 0)],
        [(bad.seq_id, 0)],
        [(c.seq_id, 0)],
    ]
    assert sorted(alone[0].drop_seq_ids) == [a.seq_id, bad.seq_id, c.seq_id]
    run_batch(sched, alone[0])
    ended, void = sched.microbatch_failed(
        alone[1], [alone[2]]
    )  # bad fails again; c's microbatch shares nothing with it
    assert ended == [bad] and bad.finish_reason == "error" and void == {alone[1].batch_id}
    run_batch(sched, alone[2])
    assert (
        sched.num_suspects == 0 and a.num_failures == c.num_failures == 0
    )  # their tokens came back: batched together again
    batch = sched.schedule()
    assert [ch.seq_id for ch in batch.seqs] == [a.seq_id, c.seq_id] and bad.seq_id in batch.drop_seq_ids
    run_batch(sched, batch)
    while sched.has_unfinished:
        run_batch(sched, sched.schedule())
    assert a.output_token_ids == c.output_token_ids == [7, 7, 7]
    assert sched.block_manager.num_free_blocks == 32 and bad.seq_id not in sched.sequences


def test_a_failed_microbatch_voids_the_microbatches_in_flight_that_share_a_sequence():
    sched = Scheduler(scheduler_config(32, block_size=4, max_num_batched_tokens=8))
    long = sched.add_request(list(range(12)), params(max_tokens=2))
    first = sched.schedule()  # long's first 8 tokens
    other = sched.add_request([1, 2], params(max_tokens=2))
    follower = sched.schedule()  # long's last 4 tokens, and other's prompt
    solo = sched.add_request([3], params(max_tokens=2))
    unrelated = sched.schedule()
    assert [ch.seq_id for ch in follower.seqs] == [long.seq_id, other.seq_id] and [
        ch.seq_id for ch in unrelated.seqs
    ] == [solo.seq_id]
    ended, void = sched.microbatch_failed(first, [follower, unrelated])
    # The follower continues a sequence the stages after the failing one never saw: void, and other restarts too.
    assert ended == [] and void == {first.batch_id, follower.batch_id}
    assert (
        long.num_failures == 1 and other.num_failures == 0 and other in sched.waiting and other.num_computed_tokens == 0
    )
    run_batch(sched, unrelated)
    assert solo.output_token_ids == [7]
    while sched.has_unfinished:
        run_batch(sched, sched.schedule())
    assert long.output_token_ids == other.output_token_ids == solo.output_token_ids == [7, 7]
    assert sched.block_manager.num_free_blocks == 32


def test_a_sequence_finished_while_its_failed_microbatch_was_in_flight_is_freed():
    sched = Scheduler(scheduler_config(8, block_size=4))
    seq = sched.add_request([1, 2, 3], params())
    batch = sched.schedule()
    sched.abort(seq.seq_id)
    assert sched.microbatch_failed(batch, []) == ([], {batch.batch_id})
    assert sched.block_manager.num_free_blocks == 8 and not sched.has_unfinished and sched.num_suspects == 0


def test_each_chunk_names_its_kind_and_keeps_its_contract():
    """First (at 0, and again after a preemption), prefill continuation and decode, as proto/microbatch.py states them;
    every chunk the scheduler builds passes the stages' check of its kind."""
    from stagecoach.proto.microbatch import ChunkKind, check_chunk

    sched = Scheduler(scheduler_config(32, block_size=4, max_num_batched_tokens=8))
    seq = sched.add_request(list(range(3, 15)), params(max_tokens=3))
    kinds = []
    while (batch := sched.schedule()) is not None:
        for i, chunk in enumerate(batch.seqs):
            check_chunk(chunk, i)
            kinds.append((chunk.kind, chunk.start_pos, chunk.num_tokens, len(chunk.token_ids)))
        run_batch(sched, batch)
    assert kinds == [
        (ChunkKind.FIRST, 0, 8, 8),  # the prompt's first 8 tokens, its whole history so far
        (ChunkKind.PREFILL, 8, 4, 4),  # the rest of the prompt: its own tokens
        (ChunkKind.DECODE, 12, 1, 0),  # the sampled token, which the last stage kept itself
        (ChunkKind.DECODE, 13, 1, 0),
    ]
    assert seq.is_finished
