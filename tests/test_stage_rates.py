"""Measured stage speeds: each stage times its decoder layers apart from its fixed work, and the planner's proposal follows."""

from __future__ import annotations

import pytest
from defaults import scheduler_config
from helpers import make_hf_checkpoint

from stagecoach.cluster.backends import ThreadPipeline
from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto.types import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rates") / "model"
    make_hf_checkpoint(path, num_hidden_layers=8, max_position_embeddings=256)
    return path


def test_a_slow_stage_is_measured_per_layer_and_the_proposal_moves_layers_off_it(model):
    config = ClusterConfig.from_dict(
        {
            "transport": {"host": "127.0.0.1"},
            "pipeline": {"num_stages": 4},
            "testing": {"layer_delay_ms": 2.0, "stage_slowdown": [1, 3, 1, 1]},
        }
    )
    pipeline = ThreadPipeline(model, ranges_from_counts([2, 2, 2, 2], 8), config=config, num_blocks=128, block_size=8)
    try:
        engine = Engine(
            pipeline, scheduler_config(128, block_size=8, max_model_len=256, vocab_size=512), max_inflight=4
        )
        engine.generate(
            [[(7 * i + j) % 500 + 3 for j in range(5 + i)] for i in range(16)],
            [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 16,
        )
    finally:
        pipeline.shutdown()
    speeds, work = engine.rates.speeds(), engine.rates.workload()
    assert work.decode_batches > 20 and work.prefill_tokens >= sum(5 + i for i in range(16))
    # At least the 2 ms each layer sleeps per microbatch, and stage 1 (three times slower) measured the slowest, its fixed
    # work apart; how much slower is this machine's figure (bench/rebalance.py), not this test's.
    others = [s.decode_layer_s for i, s in enumerate(speeds) if i != 1]
    assert min(others) >= 2e-3 and speeds[1].decode_layer_s > max(others), speeds
    assert all(0 <= s.decode_fixed_s < s.decode_layer_s for s in speeds)
    proposal = engine.stats()["rebalance"]
    assert proposal["layers"] == [2, 2, 2, 2] and proposal["proposed"][1] == 1 and sum(proposal["proposed"]) == 8
    assert proposal["predicted_gain"] > 0 and proposal["layers_moved"] >= 1
