"""The engine's own API, called from another thread while its one loop runs: add (all or none), abort, stats, close."""

from __future__ import annotations

import threading
import time

import pytest
from defaults import scheduler_config
from helpers import make_hf_checkpoint

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.errors import EngineFailure, RequestError
from stagecoach.proto.types import SamplingParams


@pytest.fixture
def running(tmp_path):
    make_hf_checkpoint(tmp_path / "model", num_hidden_layers=2, max_position_embeddings=256)
    pipeline = LocalPipeline.load(tmp_path / "model", ranges_from_counts([1, 1], 2), num_blocks=64, block_size=8)
    engine = Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=256, vocab_size=512))
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    yield engine
    stop.set()
    pipeline.wake()
    loop.join(timeout=10)
    assert not loop.is_alive()
    pipeline.shutdown()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_requests_from_another_thread_stream_their_tokens(running):
    updates: dict[int, list] = {}
    seqs = running.submit_request(
        [([4, 5], greedy(3)), ([6], greedy(5))], lambda seq_id: updates.setdefault(seq_id, []).append
    ).result(timeout=30)
    until(lambda: all(updates.get(s.seq_id) and updates[s.seq_id][-1].finished for s in seqs))
    got = {s.seq_id: [t for u in updates[s.seq_id] for t in u.token_ids] for s in seqs}
    assert [len(got[s.seq_id]) for s in seqs] == [3, 5] and [updates[s.seq_id][-1].finish_reason for s in seqs] == [
        "length",
        "length",
    ]
    assert got[seqs[0].seq_id] == seqs[0].output_token_ids
    stats = running.stats()
    assert (stats["running"], stats["waiting"], stats["kv_blocks_used"]) == (0, 0, 0) and stats["microbatches"] >= 5


def test_requests_are_added_all_or_none(running):
    future = running.submit_request([([4], greedy(2)), ([], greedy(2))], lambda seq_id: lambda update: None)
    with pytest.raises(RequestError, match="empty") as info:
        future.result(timeout=30)
    assert info.value.param == "prompt"
    assert running.stats()["running"] == 0 and running.stats()["waiting"] == 0


def test_abort_frees_the_sequence(running):
    updates: list = []
    (seq,) = running.submit_request([([4, 5], greedy(200))], lambda seq_id: updates.append).result(timeout=30)
    until(lambda: updates)
    running.abort(seq.seq_id)
    until(lambda: updates[-1].finished)
    assert updates[-1].finish_reason == "abort"
    until(lambda: running.stats()["kv_blocks_used"] == 0)


def test_a_closed_engine_refuses_every_request_and_ends_the_open_ones(running):
    updates: list = []
    running.submit_request([([4, 5], greedy(200))], lambda seq_id: updates.append).result(timeout=30)
    running.close(EngineFailure("the loop is gone"))
    assert isinstance(updates[-1].error, EngineFailure) and updates[-1].finished
    with pytest.raises(EngineFailure, match="the loop is gone"):
        running.submit_request([([4], greedy(2))], lambda seq_id: updates.append).result(timeout=1)
