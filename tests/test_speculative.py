"""Speculative decoding's parts that need no model: the n-gram proposer (prompt lookup). Plain Python."""

from __future__ import annotations

import pytest

from stagecoach.coordinator.speculative import NgramIndex, NgramProposer


def reader(tokens: list[int]):
    return lambda start, end: tokens[start:end]


def test_the_longest_suffix_seen_before_proposes_what_followed_its_latest_occurrence():
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    p = NgramProposer(num_tokens=4, min_match=1, max_match=3)
    assert p.propose(0, reader(tokens), len(tokens), 8) == [4, 5, 9, 9]  # "1 2 3" at 0
    tokens.append(4)
    assert p.propose(0, reader(tokens), len(tokens), 8) == [5, 9, 9, 1]  # "2 3 4" at 1
    tokens += [7, 7, 7]
    # "7 7 7" never occurred before; "7 7" ends at 13 (its latest occurrence with a token after it): [7]
    assert p.propose(0, reader(tokens), len(tokens), 8) == [7]
    assert p.propose(0, reader(tokens), len(tokens), 0) == []  # max_tokens 0: nothing to propose
    assert p.propose(1, reader([6, 8, 5]), 3, 8) == []  # no suffix seen before
    assert p.propose(2, reader([1, 2, 1, 2]), 4, 1) == [1]  # capped by max_tokens


def test_min_match_is_the_shortest_suffix_looked_up():
    tokens = [5, 1, 6, 2, 7, 1]
    assert NgramProposer(3, 1, 3).propose(0, reader(tokens), 6, 3) == [6, 2, 7]
    assert NgramProposer(3, 2, 3).propose(0, reader(tokens), 6, 3) == []  # "7 1" never occurred before


def test_the_index_reads_only_new_tokens_and_a_window_before_them():
    tokens = list(range(100)) + list(range(50))
    reads = []

    def tokens_of(start, end):
        reads.append(end - start)
        return tokens[start:end]

    index = NgramIndex(2, 4)
    assert index.propose(tokens_of, len(tokens), 5) == [50, 51, 52, 53, 54]
    reads.clear()
    tokens.append(50)
    assert index.propose(tokens_of, len(tokens), 5) == [51, 52, 53, 54, 55]
    assert max(reads) <= 4 + 2 + 5  # a step reads the new token, max_match before it, the suffix and the proposal


# -- the scheduler and block manager with verify passes (plain Python: no torch, Ray or gRPC) -------------------------
def spec_scheduler(num_blocks=16, block_size=4, num_tokens=4, **kw):
    from defaults import scheduler_config

    from stagecoach.cluster.config_speculative import SpeculativeSection
    from stagecoach.coordinator.scheduler import Scheduler
    from stagecoach.coordinator.speculative import Speculation

    section = SpeculativeSection(**({"method": "ngram", "num_tokens": num_tokens, "min_acceptance": 0.0} | kw))
    return Scheduler(scheduler_config(num_blocks, block_size=block_size), Speculation(section))


def greedy(max_tokens=32, **kw):
    from stagecoach.proto.types import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def answer(sched, batch, tokens_by_seq):
    """Plays the last stage: each sampling chunk's sequence gets the given tokens back, in order."""
    from stagecoach.proto.types import SampleResult

    samples = [SampleResult(c.seq_id, t) for c in batch.seqs if c.do_sample for t in tokens_by_seq[c.seq_id]]
    return sched.process_results(batch, samples)


PROMPT = [1, 2, 3, 4, 5, 6, 7, 1, 2]  # "1 2" occurred before: drafts 3 4 5 6 (and on)


def test_a_decode_step_with_drafts_is_one_verify_chunk_counted_whole():
    from stagecoach.proto.microbatch import ChunkKind

    sched = spec_scheduler()
    seq = sched.add_request(PROMPT, greedy())
    answer(sched, sched.schedule(), {seq.seq_id: [3]})  # prefill; "1 2 3" occurred at 0
    batch = sched.schedule()
    (chunk,) = batch.seqs
    assert chunk.kind is ChunkKind.VERIFY and (chunk.start_pos, chunk.num_tokens) == (9, 5)
    assert chunk.token_ids == [4, 5, 6, 7] and batch.token_ids == [3, 4, 5, 6, 7] and chunk.do_sample
    assert len(seq.block_table) == 4 and chunk.new_blocks == seq.block_table[3:]  # positions 9..13 need 4 blocks
    assert seq.num_scheduled_tokens == 14


def test_rejected_drafts_give_their_blocks_back_and_the_next_chunk_starts_after_the_accepted():
    sched = spec_scheduler()
    seq = sched.add_request(PROMPT, greedy())
    answer(sched, sched.schedule(), {seq.seq_id: [3]})
    free_before = sched.block_manager.num_free_blocks
    batch = sched.schedule()  # verify 3 | 4 5 6 7 at 9..13
    assert sched.block_manager.num_free_blocks == free_before - 1
    answer(sched, batch, {seq.seq_id: [4, 9]})  # 4 accepted, 5 rejected: 9 drawn instead
    assert seq.output_token_ids == [3, 4, 9] and seq.num_computed_tokens == 11 == seq.num_scheduled_tokens
    assert len(seq.block_table) == 3 and sched.block_manager.num_free_blocks == free_before  # [12, 16) went back
    nxt = sched.schedule().seqs[0]
    assert nxt.start_pos == 11 and nxt.new_blocks == seq.block_table[3:]
    assert sched.speculation.stats() | {"method": "ngram"} == {
        "method": "ngram",
        "verify_passes": 1,
        "draft_tokens": 4,
        "accepted_tokens": 1,
        "acceptance_rate": 0.25,
        "tokens_per_pass": 2.0,
        "declined_by_cost": 0,
    }


def test_a_block_holding_a_rejected_draft_is_never_published_to_the_prefix_cache():
    sched = spec_scheduler(block_size=4)
    seq = sched.add_request([1, 2, 3, 4, 5, 6, 1, 2, 3], greedy())
    answer(sched, sched.schedule(), {seq.seq_id: [4]})  # positions 0..8 written; 9 tokens known
    batch = sched.schedule()  # verify 4 | 5 6 1 2 at 9..13: block [12, 16) would fill with drafts
    assert batch.seqs[0].token_ids == [5, 6, 1, 2]
    answer(sched, batch, {seq.seq_id: [5, 6, 8]})  # 5 6 accepted, 1 rejected
    cached = sched.block_manager.num_cached_blocks
    assert seq.num_computed_tokens == 12 and cached == 3  # [0, 12): 4 5 6 at 9..11 complete block 2
    answer(sched, sched.schedule(), {seq.seq_id: [0]})  # 8 at 12 (a plain decode or another verify)
    assert all(k for k in seq.block_keys) and len(seq.block_keys) == 3  # block 3 holds 8 at 12, not the draft 1


def test_a_stop_token_or_max_tokens_inside_an_accepted_run_ends_where_one_at_a_time_would():
    sched = spec_scheduler()
    stop = sched.add_request(PROMPT, greedy(stop_token_ids=[5]))
    short = sched.add_request(PROMPT, greedy(max_tokens=3))
    answer(sched, sched.schedule(), {stop.seq_id: [3], short.seq_id: [3]})
    batch = sched.schedule()
    drafts = {c.seq_id: c.token_ids for c in batch.seqs}
    assert drafts[stop.seq_id] == [4, 5, 6, 7] and drafts[short.seq_id] == [4]  # room for max_tokens only
    answer(sched, batch, {stop.seq_id: [4, 5, 6, 7, 1], short.seq_id: [4, 5]})
    assert stop.output_token_ids == [3, 4, 5] and stop.finish_reason == "stop"
    assert short.output_token_ids == [3, 4, 5] and short.finish_reason == "length"
    assert not sched.has_unfinished and sched.block_manager.num_free_blocks == 16


def test_no_drafts_under_load_and_none_after_poor_acceptance_until_the_backoff_ends():
    sched = spec_scheduler(max_running=1, backoff_steps=2, min_acceptance=0.5)
    a = sched.add_request(PROMPT, greedy())
    b = sched.add_request(PROMPT, greedy())
    answer(sched, sched.schedule(), {a.seq_id: [3], b.seq_id: [3]})
    assert all(c.num_tokens == 1 for c in sched.schedule().seqs)  # two running > max_running 1: plain decode
    sched = spec_scheduler(backoff_steps=2, min_acceptance=0.5)
    a = sched.add_request(PROMPT, greedy())
    answer(sched, sched.schedule(), {a.seq_id: [3]})
    answer(sched, sched.schedule(), {a.seq_id: [8]})  # a verify pass, nothing accepted: acceptance 0.5 → 0.25
    kinds = []
    for token in (9, 10, 11):
        batch = sched.schedule()
        kinds.append(batch.seqs[0].num_tokens)
        answer(sched, batch, {a.seq_id: [token]})
    assert kinds[:2] == [1, 1]  # two plain steps


def test_a_stage_rolls_a_sequence_back_after_a_verify_chunk_and_refuses_anything_else():
    from stagecoach.errors import RequestError
    from stagecoach.proto.microbatch import ChunkKind, MicroBatch, SeqChunk
    from stagecoach.stage.sequences import SequenceTable

    table = SequenceTable(num_blocks=16, block_size=4, max_positions=64)
    first = SeqChunk(0, 0, 9, new_blocks=[0, 1, 2], do_sample=True, sampling=greedy(), num_prompt_tokens=9)
    table.admit(MicroBatch(0, [first], []))
    verify = SeqChunk(0, 9, 5, new_blocks=[3], do_sample=True, token_ids=[4, 5, 6, 7], kind=ChunkKind.VERIFY)
    (held,) = table.admit(MicroBatch(1, [verify], []))
    assert held == [0, 1, 2, 3]
    with pytest.raises(RequestError, match=r"seqs\[0\]\.start_pos 9: this stage holds 14 tokens"):
        table.admit(MicroBatch(2, [SeqChunk(0, 9, 1, do_sample=True)], []))  # at least the newest token stands
    (after,) = table.admit(MicroBatch(3, [SeqChunk(0, 11, 1, do_sample=True)], []))  # one draft accepted
    assert after == [0, 1, 2] and held == [0, 1, 2, 3]  # a new table: an older microbatch may still read the old
    with pytest.raises(RequestError, match=r"start_pos 11: this stage holds 12 tokens"):
        table.admit(MicroBatch(4, [SeqChunk(0, 11, 1, do_sample=True)], []))  # only right after a VERIFY chunk
    with pytest.raises(RequestError, match=r"a VERIFY chunk of 3 tokens brings its 2 drafts \(got 1\)"):
        table.admit(MicroBatch(5, [SeqChunk(0, 12, 3, [3], True, token_ids=[1], kind=ChunkKind.VERIFY)], []))


def test_an_abort_while_a_verify_pass_is_in_flight_frees_everything_when_it_returns():
    sched = spec_scheduler()
    seq = sched.add_request(PROMPT, greedy())
    answer(sched, sched.schedule(), {seq.seq_id: [3]})
    batch = sched.schedule()  # a verify pass in flight
    sched.abort(seq.seq_id)
    assert sched.block_manager.num_free_blocks < 16  # its blocks are still being written
    answer(sched, batch, {seq.seq_id: [4, 5, 6]})  # the stage did not know: its samples are dropped
    assert seq.output_token_ids == [3] and seq.finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished


def test_a_preempted_sequence_is_recomputed_from_its_accepted_tokens_only():
    sched = spec_scheduler(num_blocks=6, block_size=4)
    a = sched.add_request(PROMPT, greedy(max_tokens=8))
    answer(sched, sched.schedule(), {a.seq_id: [3]})
    answer(sched, sched.schedule(), {a.seq_id: [4, 9]})  # 4 accepted, 5 rejected
    answer(sched, sched.schedule(), {a.seq_id: [10]})
    free = sched.block_manager.num_free_blocks
    sched._preempt(a)  # as when blocks run out
    assert sched.block_manager.num_free_blocks == free + 3  # [0, 12): nothing of the rejected drafts' block is held
    batch = sched.schedule()
    first = batch.seqs[0]
    # the prefix cache gives back its three full blocks, all accepted tokens: 1 2 3 4 5 6 7 1 | 2 3 4 9 | ...
    assert first.is_first and first.start_pos == 12 and a.seq_id in batch.drop_seq_ids
    assert first.token_ids == PROMPT + [3, 4, 9, 10]  # the history: accepted tokens only


# -- the cost model: a pass's measured time by its rows decides whether drafts pay ------------------------------------
def test_pass_cost_is_measured_per_row_count_and_interpolated_between():
    from stagecoach.coordinator.speculative import PassCost

    cost = PassCost()
    cost.observe(4, True, 9.0)  # a row count's first pass is warm-up: dropped
    assert cost.estimate(4, True) is None
    cost.observe(4, True, 1.0)
    cost.observe(8, True, 2.0)
    cost.observe(8, True, 2.0)
    assert cost.estimate(4, True) == 1.0 and cost.estimate(6, True) == 1.5
    assert cost.estimate(9, True) is None and cost.estimate(2, True) is None  # not measured on one side: unknown
    assert cost.estimate(6, False) is None  # plain decode passes and the others are apart
    cost.observe(4, True, 2.0)
    assert cost.estimate(4, True) == 1.2  # a moving average


def measured(sched, fixed_s: float, per_row_s: float, plain: tuple[float, float] | None = None) -> None:
    """Teaches the scheduler's cost model a pass time of fixed + rows × per-row (plain decode passes: `plain`'s)."""
    for rows in range(1, 65):
        for is_plain, (fixed, per_row) in ((False, (fixed_s, per_row_s)), (True, plain or (fixed_s, per_row_s))):
            for _ in range(2):
                sched.speculation.cost.observe(rows, is_plain, fixed + rows * per_row)


def decoding(num_seqs: int, cost_model: bool = True, without_drafts: int = 0, **kw):
    """A scheduler whose sequences (PROMPT each) have had one verify pass that accepted none of its 4 drafts (acceptance
    0.5 each) and have drafts again; and `without_drafts` more, whose tokens never repeat (nothing to propose)."""
    from stagecoach.proto.microbatch import ChunkKind

    sched = spec_scheduler(num_blocks=64, cost_model=cost_model, max_running=64, **kw)
    seqs = [sched.add_request(PROMPT, greedy()) for _ in range(num_seqs)]
    others = [sched.add_request([20 + 10 * i, 21 + 10 * i], greedy()) for i in range(without_drafts)]
    answer(
        sched, sched.schedule(), {s.seq_id: [3] for s in seqs} | {s.seq_id: [23 + 10 * i] for i, s in enumerate(others)}
    )
    batch = sched.schedule()
    assert [c.kind is ChunkKind.VERIFY for c in batch.seqs] == [True] * num_seqs + [False] * without_drafts
    # drafts 4 … rejected: 5 drawn, and "5" occurred before: drafts 6 7 1 2
    answer(sched, batch, {s.seq_id: [5] for s in seqs} | {s.seq_id: [24 + 10 * i] for i, s in enumerate(others)})
    return sched, seqs


def test_the_cost_model_verifies_where_a_pass_pays_for_its_rows_and_not_under_load():
    from stagecoach.proto.microbatch import ChunkKind

    # Reading weights dominates (fixed 2 ms, 1 ms a row): one sequence at acceptance 0.5 gets 3 tokens in 7 ms instead
    # of 1 in 3 ms, and verifies; eight of them get 10 tokens in 14 ms instead of 8 in 10 ms, and decode plainly.
    for num_seqs, verifies in ((1, True), (8, False)):
        sched, seqs = decoding(num_seqs)
        measured(sched, 0.002, 0.001)
        batch = sched.schedule()
        assert len(batch.seqs) == num_seqs
        assert all((c.kind is ChunkKind.VERIFY) == verifies for c in batch.seqs), (num_seqs, batch.seqs)
        assert sched.speculation.stats()["declined_by_cost"] == (0 if verifies else num_seqs)
        if verifies:
            assert batch.seqs[0].token_ids == [6, 7, 1, 2]
    # Without the cost model, the same eight verify.
    sched, _ = decoding(8, cost_model=False)
    measured(sched, 0.002, 0.001)
    assert all(c.kind is ChunkKind.VERIFY for c in sched.schedule().seqs)


def test_drafts_cost_a_sequence_beside_them_at_most_five_percent_of_its_tokens_per_second():
    from stagecoach.proto.microbatch import ChunkKind

    # Reading weights dominates (20 ms, 0.1 ms a row). Eight sequences with drafts and one without: the pass without
    # drafts takes 20.9 ms, and drafts go in while it stays within 5 % of that (21.945 ms): 4 + 4 + 2 (21.9 ms).
    sched, _ = decoding(8, without_drafts=1)
    measured(sched, 0.020, 0.0001)
    batch = sched.schedule()
    assert [len(c.token_ids) if c.kind is ChunkKind.VERIFY else 0 for c in batch.seqs] == [4, 4, 2] + [0] * 6
    assert sched.speculation.stats()["declined_by_cost"] == 5
    # The eight alone: each expects 3 tokens from a verify pass, so every one verifies all of its drafts.
    sched, _ = decoding(8)
    measured(sched, 0.020, 0.0001)
    assert [len(c.token_ids) for c in sched.schedule().seqs] == [4] * 8


def test_a_compiled_plain_decode_step_faster_than_eager_rows_is_not_given_up():
    from stagecoach.proto.microbatch import ChunkKind

    # The verify pass that pays against an eager decode step (the test above: 3 tokens in 7 ms, not 1 in 3 ms) does
    # not against a plain step compiled 5x faster (1 token in 0.6 ms).
    sched, _ = decoding(1)
    measured(sched, 0.002, 0.001, plain=(0.0004, 0.0002))
    assert sched.schedule().seqs[0].kind is ChunkKind.DECODE
    assert sched.speculation.stats()["declined_by_cost"] == 1


def test_one_of_every_32_declines_is_let_through_so_the_figures_stay_current():
    from stagecoach.coordinator.speculative import EXPLORE_EVERY
    from stagecoach.proto.microbatch import ChunkKind

    sched, seqs = decoding(8)
    measured(sched, 0.002, 0.001)
    cycle, verified = [6, 7, 1, 2, 3, 4, 5], 0
    for step in range(5):
        batch = sched.schedule()
        verified += sum(c.kind is ChunkKind.VERIFY for c in batch.seqs)
        answer(sched, batch, {s.seq_id: [cycle[step % 7]] for s in seqs})
    assert EXPLORE_EVERY == 32 and verified == 1 and sched.speculation.stats()["declined_by_cost"] == 39
