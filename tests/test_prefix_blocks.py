"""Prefix caching in the block manager and scheduler: plain Python, tested without torch, Ray or gRPC."""

from __future__ import annotations

from defaults import scheduler_config

from stagecoach.coordinator.block_manager import BlockManager, block_key
from stagecoach.coordinator.scheduler import Scheduler
from stagecoach.coordinator.sequence import Sequence
from stagecoach.proto.types import SampleResult, SamplingParams

BS = 4


def params(max_tokens=3):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_batch(sched, batch, token=7):
    return sched.process_results(batch, [SampleResult(c.seq_id, token) for c in batch.seqs if c.do_sample])


def finish(sched):
    while (batch := sched.schedule()) is not None:
        run_batch(sched, batch)


def test_keys_chain_the_parent_and_are_not_pythons_hash():
    a, b = block_key(b"", [1, 2, 3, 4]), block_key(b"", [1, 2, 3, 5])
    assert len(a) == 32 and a != b and block_key(b"", [1, 2, 3, 4]) == a
    assert block_key(a, [5, 6, 7, 8]) != block_key(b, [5, 6, 7, 8])  # equal tokens after another prefix: another block


def test_a_full_block_is_reusable_only_once_its_microbatch_came_back():
    sched = Scheduler(scheduler_config(16, block_size=BS, max_model_len=64))
    prompt = list(range(3, 13))  # 10 tokens: two full blocks and a partial one
    a = sched.add_request(prompt, params())
    first = sched.schedule()
    b = sched.add_request(prompt + [99], params())  # same prefix, while a's prefill is in flight
    second = sched.schedule()
    assert second.seqs[0].start_pos == 0 and b.num_cached_tokens == 0  # nothing committed yet: b computes its own
    run_batch(sched, first)
    run_batch(sched, second)
    assert sched.block_manager.num_cached_blocks == 2  # two full blocks each, the same content: registered once
    c = sched.add_request(prompt + [42, 43], params())
    chunk = next(ch for ch in sched.schedule().seqs if ch.seq_id == c.seq_id)  # beside a's and b's decode steps
    assert (chunk.start_pos, chunk.num_tokens, c.num_cached_tokens) == (8, 4, 8)
    assert (
        chunk.new_blocks[:2] == a.block_table[:2] and chunk.new_blocks[2] not in a.block_table
    )  # shared prefix, own tail
    assert chunk.sampling is not None and chunk.token_ids == prompt + [
        42,
        43,
    ]  # a first chunk: the whole history for the last stage
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (10 + 11 + 12, 8)


def test_a_fully_cached_prompt_on_a_block_boundary_computes_its_last_token_in_a_block_of_its_own():
    sched = Scheduler(scheduler_config(16, block_size=BS, max_model_len=64))
    prompt = list(range(3, 11))  # exactly two blocks
    a = sched.add_request(prompt, params(max_tokens=1))
    batch = sched.schedule()
    shared = list(a.block_table)
    run_batch(sched, batch)  # a finishes: its blocks are freed, and stay cached
    b = sched.add_request(prompt, params(max_tokens=1))
    chunk = sched.schedule().seqs[0]
    assert (chunk.start_pos, chunk.num_tokens, b.num_cached_tokens) == (
        4,
        4,
        4,
    )  # one block reused; the second recomputed
    assert chunk.new_blocks[0] == shared[0] and chunk.new_blocks[1] not in shared


def test_cached_blocks_are_evicted_lru_before_any_running_sequence_is_preempted():
    bm = BlockManager(4, BS)
    a, b = Sequence(0, list(range(8)), params()), Sequence(1, list(range(100, 108)), params())
    for s in (a, b):
        bm.grow(s, 8)
        bm.commit(s, 8)
    held = a.block_table + b.block_table
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 4 and sorted(held) == [0, 1, 2, 3]
    c = Sequence(2, list(range(200, 206)), params())
    assert bm.can_grow(c, 6)
    bm.grow(c, 6)  # two blocks: a's, the least recently freed, go first (its tail before its head)
    assert bm.num_cached_blocks == 2
    hit, _ = bm.match(Sequence(3, list(range(100, 109)), params()))
    assert len(hit) == 2 and bm.match(Sequence(4, list(range(9)), params()))[0] == []


def test_shared_blocks_are_counted_and_freed_by_their_last_holder():
    bm = BlockManager(8, BS)
    a = Sequence(0, list(range(9)), params())
    bm.grow(a, 9)
    bm.commit(a, 9)
    b = Sequence(1, list(range(9)), params())
    blocks, keys = bm.match(b)
    # Admission counts the shared blocks as b's too: 3 + 5 fit 8 blocks, 3 + 6 do not (though 4 would be enough shared).
    assert len(blocks) == 2 and bm.can_adopt(blocks, 5 * BS) and not bm.can_adopt(blocks, 6 * BS)
    bm.adopt(b, blocks, keys)
    bm.grow(b, 9)
    assert bm.num_free_blocks == 4
    bm.free(a)
    assert bm.num_free_blocks == 5  # a's last block only: the two shared ones are b's too
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2


def test_preemption_and_abort_keep_the_cache_and_a_recovery_drops_it():
    sched = Scheduler(scheduler_config(6, block_size=BS, max_model_len=64))
    old = sched.add_request(list(range(3, 12)), params(max_tokens=8))
    run_batch(sched, sched.schedule())  # 9 prompt tokens: 2 full blocks committed
    young = sched.add_request(list(range(50, 58)), params(max_tokens=8))
    finish(sched)
    assert (
        old.is_finished and young.is_finished and sched.num_preemptions >= 1
    )  # 6 blocks: young was preempted and recomputed
    assert young.num_cached_tokens == 0
    again = sched.add_request(list(range(3, 12)), params())
    sched.abort(again.seq_id)
    third = sched.add_request(list(range(3, 12)), params())
    assert sched.schedule().seqs[0].start_pos == 8 and third.num_cached_tokens == 8
    sched.recompute_all()
    assert sched.block_manager.num_cached_blocks == 0
    assert sched.schedule().seqs[0].start_pos == 0


def test_off_means_no_sharing():
    sched = Scheduler(scheduler_config(16, block_size=BS, max_model_len=64, prefix_caching=False))
    for _ in range(2):
        seq = sched.add_request(list(range(3, 13)), params())
        assert sched.schedule().seqs[0].start_pos == 0 and seq.num_cached_tokens == 0
        finish(sched)
    assert sched.block_manager.num_cached_blocks == 0


def test_under_kv_pressure_caching_admits_no_more_and_preempts_no_more():
    """24 requests sharing a 16-token prefix on 16 blocks: sharing must not let more in than fit unshared."""
    runs = {}
    for caching in (True, False):
        sched = Scheduler(scheduler_config(16, block_size=BS, max_model_len=64, prefix_caching=caching))
        warm = sched.add_request(list(range(3, 20)), params(max_tokens=1))  # puts the prefix in the cache
        finish(sched)
        seqs = [sched.add_request(list(range(3, 19)) + [100 + i, 200 + i], params(max_tokens=12)) for i in range(24)]
        peak = 0
        while (batch := sched.schedule()) is not None:
            peak = max(peak, len(sched.running))
            run_batch(sched, batch)
        assert all(s.is_finished for s in [warm, *seqs])
        runs[caching] = (peak, sched.num_preemptions, [s.num_cached_tokens for s in seqs])
    assert runs[True][0] <= runs[False][0] and runs[True][1] <= runs[False][1], runs
    assert set(runs[True][2]) == {16} and set(runs[False][2]) == {0}
