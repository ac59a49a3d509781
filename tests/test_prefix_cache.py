"""Prefix caching end to end: the same tokens with and without it, for every way a prompt can share a prefix."""

from __future__ import annotations

import pytest
from defaults import scheduler_config
from helpers import make_gguf_checkpoint, make_hf_checkpoint

from stagecoach.cluster.backends import LocalPipeline, ThreadPipeline
from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto.types import SamplingParams

BS = 8
SYSTEM = [(11 * j) % 480 + 3 for j in range(37)]  # 4 full blocks and 5 tokens
EXACT = [(5 * j) % 480 + 7 for j in range(32)]  # exactly 4 blocks


def sampling(i: int) -> SamplingParams:
    """Greedy, seeded, and seeded with a repetition penalty (over the whole history, cached prompt tokens included)."""
    kind = i % 3
    if kind == 0:
        return SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return SamplingParams(
        temperature=0.9, seed=7 + i, max_tokens=12, ignore_eos=True, repetition_penalty=1.3 if kind == 2 else 1.0
    )


# Wave 1 fills the cache (two requests share a new prefix while it is being filled); wave 2 hits it.
WAVE_1 = [
    SYSTEM + [400, 401, 402],
    EXACT,
    [9] * 20,
    [(3 * j) % 480 + 5 for j in range(30)] + [1, 2],
    [(3 * j) % 480 + 5 for j in range(30)] + [3],
]
WAVE_2 = [
    SYSTEM + [410, 411, 412, 413, 414, 415],  # 4 blocks of the system prompt
    SYSTEM[:8] + [420] * 9,  # exactly one block
    EXACT + [430, 431],  # a prefix that ends exactly at a block boundary
    EXACT,  # the whole prompt cached: its last block is computed again, in a block of its own
    [440] * 3,  # nothing shared
]
CACHED_IN_WAVE_2 = [32, 8, 32, 24, 0]


@pytest.fixture(scope="module", params=["safetensors", "gguf"])
def model(tmp_path_factory, request):
    """A float checkpoint, and a GGUF one held quantized (every served type, helpers.make_gguf_checkpoint)."""
    path = tmp_path_factory.mktemp("prefix") / "model"
    make = make_gguf_checkpoint if request.param == "gguf" else make_hf_checkpoint
    make(path, num_hidden_layers=3, max_position_embeddings=256, vocab_size=512)
    return path


def waves(engine: Engine) -> tuple[list[list[int]], list[int]]:
    out, cached = [], []
    for wave in (WAVE_1, WAVE_2):
        seqs = engine.generate(wave, [sampling(i) for i in range(len(wave))])
        out += [s.output_token_ids for s in seqs]
        cached += [s.num_cached_tokens for s in seqs]
    return out, cached


@pytest.fixture(scope="module")
def without_caching(model):
    pipeline = LocalPipeline.load(model, ranges_from_counts([2, 1], 3), num_blocks=64, block_size=BS)
    engine = Engine(
        pipeline, scheduler_config(64, block_size=BS, max_model_len=256, vocab_size=512, prefix_caching=False)
    )
    out, cached = waves(engine)
    assert set(cached) == {0}
    return out


def test_in_process_the_cached_prefixes_give_the_same_tokens(model, without_caching):
    pipeline = LocalPipeline.load(model, ranges_from_counts([2, 1], 3), num_blocks=64, block_size=BS)
    engine = Engine(pipeline, scheduler_config(64, block_size=BS, max_model_len=256, vocab_size=512))
    out, cached = waves(engine)
    assert cached == [0] * len(WAVE_1) + CACHED_IN_WAVE_2
    assert out == without_caching
    stats = engine.stats()["prefix_cache"]
    assert stats["cached_tokens"] == sum(CACHED_IN_WAVE_2) and stats["prompt_tokens"] == sum(map(len, WAVE_1 + WAVE_2))
    assert stats["cached_blocks"] > 0 and engine.stats()["kv_blocks_used"] == 0


def test_over_grpc_with_microbatches_in_flight_the_same_tokens(model, without_caching):
    config = ClusterConfig.from_dict({"transport": {"host": "127.0.0.1"}, "pipeline": {"num_stages": 3}})
    pipeline = ThreadPipeline(model, ranges_from_counts([1, 1, 1], 3), config=config, num_blocks=64, block_size=BS)
    try:
        engine = Engine(
            pipeline, scheduler_config(64, block_size=BS, max_model_len=256, vocab_size=512), max_inflight=3
        )
        out, cached = waves(engine)
        assert out == without_caching and cached[len(WAVE_1) :] == CACHED_IN_WAVE_2
    finally:
        pipeline.shutdown()
