"""Sequence state lives on the stages: a chunk carries what it adds, recoveries rebuild the state, penalties still see the prompt."""

from __future__ import annotations

import pytest
import torch
from defaults import scheduler_config
from helpers import wire_microbatch

from stagecoach.cluster.backends import LocalPipeline, ThreadPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.scheduler import Scheduler
from stagecoach.errors import RequestError
from stagecoach.proto.microbatch import MicroBatch, SeqChunk
from stagecoach.proto.types import SampleResult, SamplingParams
from stagecoach.stage.sequences import SequenceTable

RANGES = ranges_from_counts([2, 1, 1], 4)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return hf_checkpoint("state", num_hidden_layers=4, max_position_embeddings=512)


def decode_bytes(context: int, num_seqs: int = 8, hidden: int = 512) -> int:
    """The encoded size of one decode microbatch of num_seqs sequences at this context, from stage 0 to stage 1."""
    sched = Scheduler(
        scheduler_config(num_seqs * (context // 16 + 2), block_size=16, max_num_batched_tokens=num_seqs * context)
    )
    for i in range(num_seqs):
        sched.add_request(
            [(i + j) % 400 + 3 for j in range(context - 1)], SamplingParams(temperature=0, max_tokens=4, seed=1)
        )
    prefill = sched.schedule()
    sched.process_results(prefill, [SampleResult(c.seq_id, 7) for c in prefill.seqs if c.do_sample])
    batch = sched.schedule()
    assert [c.start_pos for c in batch.seqs] == [context - 1] * num_seqs and all(not c.new_blocks for c in batch.seqs)
    return wire_microbatch(batch, torch.zeros(num_seqs, hidden)).ByteSize()


def test_a_decode_microbatch_does_not_grow_with_context():
    short, long = decode_bytes(64), decode_bytes(4000)
    # Only the positions' varints widen (one byte each here); no block table, no slots, no history.
    assert long - short <= 8 and long / short <= 1.05, (short, long)


def greedy_ids(pipeline, prompts, n=10, max_batch_tokens=512, **sampling):
    engine = Engine(
        pipeline,
        scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size, max_num_batched_tokens=max_batch_tokens),
        max_inflight=2,
    )
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **sampling) for _ in prompts]
    return [s.output_token_ids for s in engine.generate(prompts, params)]


def test_penalties_still_see_the_prompt(model):
    path, hf = model
    prompt = [5, 9, 5, 9, 200, 31, 5, 9, 77, 5, 9, 31, 200, 5, 9, 7, 8, 5, 9, 3]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.8
        )[0, len(prompt) :].tolist()
    assert ref != greedy_ids(LocalPipeline.load(path, RANGES, num_blocks=64, block_size=8), [prompt])[0], (
        "the penalty must matter here"
    )
    # Chunked prefill (8 tokens a microbatch): the last stage's history is assembled from three chunks.
    local = greedy_ids(
        LocalPipeline.load(path, RANGES, num_blocks=64, block_size=8),
        [prompt],
        max_batch_tokens=8,
        repetition_penalty=1.8,
    )
    pipeline = ThreadPipeline(path, RANGES, num_blocks=64, block_size=8)
    try:
        distributed = greedy_ids(pipeline, [prompt], max_batch_tokens=8, repetition_penalty=1.8)
    finally:
        pipeline.shutdown()
    assert local == distributed == [ref]


def test_a_recovery_rebuilds_every_stage_state_and_outputs_stay_equal(model):
    path, _ = model
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14]]
    expected = greedy_ids(LocalPipeline.load(path, RANGES, num_blocks=64, block_size=8), prompts, n=12)
    pipeline = ThreadPipeline(path, RANGES, num_blocks=64, block_size=8)
    try:
        engine = Engine(pipeline, scheduler_config(64, block_size=8), max_inflight=2)
        seqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts]
        while min(len(s.output_token_ids) for s in seqs) < 5:
            engine.step(30)
        assert all(len(w.runner.sequences) == 3 for w in pipeline.workers)
        engine.reconfigure()  # fences off what is in flight: every stage forgets every sequence
        assert (
            all(len(w.runner.sequences) == 0 for w in pipeline.workers)
            and pipeline.workers[-1].runner.sampler.num_sequences == 0
        )
        engine.run()  # the re-prefill's first chunks rebuild the tables and the last stage's histories
        assert [s.output_token_ids for s in seqs] == expected
    finally:
        pipeline.shutdown()


def chunk(seq_id, start, n, new_blocks=(), **kw) -> SeqChunk:
    return SeqChunk(seq_id, start, n, list(new_blocks), sampling=SamplingParams() if start == 0 else None, **kw)


def test_the_table_refuses_what_it_does_not_hold_and_changes_nothing_then():
    table = SequenceTable(num_blocks=8, block_size=4, max_positions=64)
    table.admit(MicroBatch(0, [chunk(1, 0, 5, [2, 3])], []))
    cases = {
        "seqs[1].seq_id 9 is not a sequence this stage holds": [chunk(1, 5, 1), chunk(9, 3, 1)],
        "seqs[0].start_pos 4: this stage holds 5 tokens of sequence 1": [chunk(1, 4, 1)],
        "seqs[0].new_blocks[1]: block 8 is outside the cache's 8 blocks": [chunk(1, 5, 4, [4, 8])],
        "positions up to 9 need 3": [chunk(1, 5, 4)],
        "seqs[0].num_tokens must be at least 1": [chunk(1, 5, 0)],
    }
    for message, seqs in cases.items():
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
            table.admit(MicroBatch(1, seqs, []))
        assert isinstance(info.value, RequestError) or "outside the cache" in message
    # Nothing above changed the table: sequence 1 still continues at 5, with its two blocks.
    assert table.admit(MicroBatch(2, [chunk(1, 5, 3)], [])) == [[2, 3]]
    with pytest.raises(RequestError, match="not a sequence this stage holds"):
        table.admit(MicroBatch(3, [chunk(1, 8, 1)], [], drop_seq_ids=[1]))  # dropped first, so it cannot continue
    assert table.admit(MicroBatch(4, [chunk(1, 0, 2, [6])], [], drop_seq_ids=[1])) == [
        [6]
    ]  # dropped, then started again in one microbatch
