"""The distributed pipeline: stages as Ray actors on separate nodes, microbatches over gRPC, several in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from defaults import scheduler_config
from helpers import hf_greedy

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.config import CacheSection, ClusterConfig, ModelSection, PipelineSection, TransportSection
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.errors import ConfigError
from stagecoach.proto.types import SamplingParams

pytestmark = pytest.mark.slow

MODEL = dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)
NEW_TOKENS = 16
PROMPT = [5, 77, 123, 9, 301, 42, 42, 7, 250, 11, 3, 199, 64]


def greedy(n=NEW_TOKENS):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def compile_settings() -> dict:
    """pytest --compile (and --compile-batch-sizes): the stages' pipeline.compile for this run."""
    settings = {"compile": os.environ["STAGECOACH_TEST_COMPILE"]} if os.environ.get("STAGECOACH_TEST_COMPILE") else {}
    if settings and os.environ.get("STAGECOACH_TEST_COMPILE_BATCH_SIZES"):
        settings["compile_batch_sizes"] = [int(b) for b in os.environ["STAGECOACH_TEST_COMPILE_BATCH_SIZES"].split(",")]
    return settings


def make_config(
    model_dir,
    counts,
    placement="auto",
    gpus=1.0,
    max_inflight=None,
    num_blocks=128,
    max_batch_tokens=512,
    memory_limit_mb=None,
):
    return ClusterConfig(
        model=ModelSection(path=str(model_dir)),
        pipeline=PipelineSection(
            layers=counts,
            gpus_per_stage=gpus,
            placement=placement,
            max_inflight=max_inflight,
            max_batch_tokens=max_batch_tokens,
            memory_limit_mb=memory_limit_mb,
            ready_timeout_s=120,
            **compile_settings(),
        ),
        cache=CacheSection(block_size=8, num_blocks=num_blocks),
        transport=TransportSection(host="127.0.0.1"),
    )


def run_engine(pipeline, prompts, max_inflight, max_batch_tokens=512, n=NEW_TOKENS):
    engine = Engine(
        pipeline,
        scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size, max_num_batched_tokens=max_batch_tokens),
        max_inflight=max_inflight,
    )
    seqs = engine.generate(prompts, [greedy(n) for _ in prompts])
    return [s.output_token_ids for s in seqs], engine


def ray_pipeline(config):
    from stagecoach.cluster.ray_pipeline import RayPipeline

    return RayPipeline(config, ranges_from_counts(config.pipeline.layers, sum(config.pipeline.layers)))


def alive_stage_actors():
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "StageActor"), ("state", "=", "ALIVE")])


def live_placement_groups():
    import ray

    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return hf_checkpoint("ray_gqa2", **MODEL)


@pytest.mark.parametrize(
    "source, counts",
    [
        ("hf", [5]),
        ("hf", [3, 2]),
        ("hf", [3, 1, 1]),
        ("hf", [2, 1, 1, 1]),
        ("gguf", [3, 1, 1]),
        ("gptq", [5]),
        ("gptq", [3, 1, 1]),
    ],
    ids=["1", "2", "3-uneven", "4", "gguf-file-3-uneven", "gptq-1", "gptq-3-uneven"],
)
def test_greedy_equals_local_and_hf(ray_cluster, model, hf_checkpoint, source, counts):
    # "gguf": `--model tiny.gguf`, a file in every served type, its tensors held quantized by the stages;
    # "gptq": a GPTQ checkpoint (4 bits, groups of 128, act-order), every decoder linear packed.
    from test_model_parity import CONFIGS

    key = {"hf": None, "gguf": "gguf_mixed", "gptq": "gptq_4bit_g128_actorder"}[source]
    model_dir, hf_model = model if key is None else hf_checkpoint(key, **CONFIGS[key])
    prompts = [PROMPT, [9, 8, 7]]
    pipeline = ray_pipeline(make_config(model_dir, counts))
    try:
        assert [s.layers for s in pipeline.stages] == ranges_from_counts(counts, 5)
        got, _ = run_engine(pipeline, prompts, max_inflight=len(counts))
    finally:
        pipeline.shutdown()
    local, _ = run_engine(
        LocalPipeline.load(model_dir, ranges_from_counts(counts, 5), num_blocks=128, block_size=8), prompts, 1
    )
    assert got == local
    assert got == [hf_greedy(hf_model, p, NEW_TOKENS)[0] for p in prompts]


def test_strict_spread_puts_each_stage_on_its_own_node(ray_cluster, model):
    model_dir, _ = model
    pipeline = ray_pipeline(make_config(model_dir, [2, 1, 1, 1], placement="strict_spread"))
    try:
        node_ids = [s.node_id for s in pipeline.stages]
        assert len(set(node_ids)) == 4
        # Ray's own view agrees: the four StageActor processes live on those four nodes.
        actors = alive_stage_actors()
        assert sorted(a.node_id for a in actors) == sorted(node_ids)
        assert sorted(a.pid for a in actors) == sorted(s.pid for s in pipeline.stages)
        assert all(s.address.startswith("127.0.0.1:") for s in pipeline.stages)
    finally:
        pipeline.shutdown()
    assert alive_stage_actors() == [] and live_placement_groups() == []


def test_cli_json_reports_nodes(ray_cluster, model):
    model_dir, _ = model
    cmd = [
        str(Path(sys.executable).parent / "stagecoach"),
        "generate",
        "--model",
        str(model_dir),
        "--stages",
        "4",
        "--gpus-per-stage",
        "1",
        "--placement",
        "strict_spread",
        "--ray-address",
        ray_cluster.address,
        "--grpc-host",
        "127.0.0.1",
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "4,5",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert isinstance(out, list) and len(out) == 2
    stages = out[0]["stages"]
    assert [s["index"] for s in stages] == [0, 1, 2, 3]
    assert len({s["node_id"] for s in stages}) == 4
    assert all(s["address"].startswith("127.0.0.1:") and s["pid"] > 0 for s in stages)


def test_sixteen_concurrent_requests_with_microbatches_in_flight(ray_cluster, model):
    model_dir, _ = model
    prompts = [[(7 * i + j) % 400 + 3 for j in range(1 + (5 * i) % 23)] for i in range(16)]
    pipeline = ray_pipeline(make_config(model_dir, [2, 1, 1, 1], max_inflight=4, num_blocks=256))
    try:
        together, engine = run_engine(pipeline, prompts, max_inflight=4)
    finally:
        pipeline.shutdown()
    assert engine.peak_inflight == 4
    local = LocalPipeline.load(model_dir, ranges_from_counts([2, 1, 1, 1], 5), num_blocks=256, block_size=8)
    alone = [run_engine(local, [p], 1)[0][0] for p in prompts]
    assert together == alone


def test_long_prompt_is_chunked_and_matches_hf(ray_cluster, model):
    model_dir, hf_model = model
    prompt = list(range(3, 93))  # 90 tokens, budget 16 per microbatch: 6 chunks
    pipeline = ray_pipeline(make_config(model_dir, [3, 2], max_batch_tokens=16))
    try:
        got, engine = run_engine(pipeline, [prompt], max_inflight=2, max_batch_tokens=16)
    finally:
        pipeline.shutdown()
    assert engine.num_batches >= 6 + NEW_TOKENS - 1
    assert got[0] == hf_greedy(hf_model, prompt, NEW_TOKENS)[0]


def test_small_kv_pool_preempts_and_still_matches(ray_cluster, model):
    model_dir, _ = model
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4, 3], list(range(40, 60)), [300, 301]]
    pipeline = ray_pipeline(make_config(model_dir, [3, 2], num_blocks=12))  # 96 slots; the four need 116
    try:
        got, engine = run_engine(pipeline, prompts, max_inflight=2)
    finally:
        pipeline.shutdown()
    assert engine.scheduler.num_preemptions > 0
    local = LocalPipeline.load(model_dir, ranges_from_counts([3, 2], 5), num_blocks=64, block_size=8)
    assert got == [run_engine(local, [p], 1)[0][0] for p in prompts]


def test_more_stages_than_gpus_fails_fast_and_leaves_nothing(ray_cluster, model):
    model_dir, _ = model
    config = make_config(model_dir, [1, 1, 1, 1, 1])
    with pytest.raises(ConfigError, match=r"5 stages .* need 5 GPUs, but the Ray cluster has 4"):
        ray_pipeline(config)
    assert alive_stage_actors() == [] and live_placement_groups() == []


def test_stage_over_its_memory_budget_is_refused_before_loading(ray_cluster, model):
    model_dir, _ = model
    config = make_config(model_dir, [3, 2], memory_limit_mb=0)
    with pytest.raises(ConfigError, match=r"stage 0 .* needs .* MiB of weights .* memory budget on cpu is 0.0 MiB"):
        ray_pipeline(config)
    assert alive_stage_actors() == [] and live_placement_groups() == []


def test_speculation_over_ray_with_microbatches_in_flight(ray_cluster, model):
    """Verify chunks over gRPC between Ray stages, three microbatches in flight: the tokens one-at-a-time decoding
    gives, greedy and seeded sampling with every option (drafts from foresight of those tokens, some wrong)."""
    from test_speculative_identity import EVERY_OPTION, Foresight

    from stagecoach.cluster.config_speculative import SpeculativeSection
    from stagecoach.coordinator.speculative import Speculation

    model_dir, _ = model
    prompts = [[5, 6, 7, 8, 9, 10] * 4, [100, 101, 102, 100, 101], PROMPT, [30, 31, 32, 30, 31, 32, 30]] * 2
    options = [dict(temperature=0.0)] * 4 + [EVERY_OPTION] * 4
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **o) for o in options]
    local = LocalPipeline.load(model_dir, ranges_from_counts([3, 1, 1], 5), num_blocks=128, block_size=8)
    expected = [
        s.output_token_ids for s in Engine(local, scheduler_config(128, block_size=8)).generate(prompts, params)
    ]
    pipeline = ray_pipeline(make_config(model_dir, [3, 1, 1], max_inflight=3))
    try:
        speculation = Speculation(
            SpeculativeSection(method="ngram", min_acceptance=0.0, max_running=64, cost_model=False)
        )
        speculation.proposer = Foresight(prompts, expected)
        engine = Engine(
            pipeline,
            scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size),
            max_inflight=3,
            speculation=speculation,
        )
        seqs = engine.generate(prompts, params)
    finally:
        pipeline.shutdown()
    assert [s.output_token_ids for s in seqs] == expected
    assert speculation.accepted > 0 and engine.peak_inflight > 1, speculation.stats()
