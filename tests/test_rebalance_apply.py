"""Applying a rebalance while serving: stages change layers (reading only those they gain), streams keep their exact tokens."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from defaults import scheduler_config
from helpers import make_hf_checkpoint
from prometheus_client.parser import text_string_to_metric_families

from stagecoach.cluster.backends import LocalPipeline, ThreadPipeline
from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.api import build_app
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.rebalancer import RebalancePolicy
from stagecoach.coordinator.server_state import ServerState
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ConflictError, RequestError
from stagecoach.proto.model_config import ModelConfig
from stagecoach.proto.types import SamplingParams
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.loader import change_layers, layer_weight_bytes, load_stage_model
from stagecoach.stage.model import AttentionMetadata
from stagecoach.stage.quantized import QuantizedLinear

KEY = "admin-key"
PROMPTS = [[(7 * i + j) % 500 + 3 for j in range(5 + 2 * i)] for i in range(8)]


def sampling(i: int) -> SamplingParams:
    """Greedy and seeded streams alike: every draw is seeded by position, so a re-prefill draws the same tokens."""
    return (
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(temperature=0.9, top_p=0.9, seed=1000 + i, max_tokens=40, ignore_eos=True)
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rebalance") / "model"
    make_hf_checkpoint(path, num_hidden_layers=8, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    pipeline = LocalPipeline.load(model, ranges_from_counts([2, 2, 2, 2], 8), num_blocks=128, block_size=8)
    seqs = Engine(pipeline, scheduler_config(128, block_size=8, max_model_len=256, vocab_size=512)).generate(
        PROMPTS, [sampling(i) for i in range(8)]
    )
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("source", ["safetensors", "gguf", "gptq"])
def test_a_stage_reads_only_the_layers_it_gains_and_computes_as_if_loaded_whole(model, hf_checkpoint, source):
    if source == "gguf":  # quantized layers: a gained one arrives in its packed form, with its packed byte count
        model, _ = hf_checkpoint("gguf_mixed8", num_hidden_layers=8)
    if source == "gptq":  # the same from a GPTQ checkpoint (act-order: the layers' input permutations move too)
        model, _ = hf_checkpoint("gptq_8layers", num_hidden_layers=8, packing=dict(act_order=True))
    config = ModelConfig.from_pretrained(model)
    stage = load_stage_model(model, 2, 4)
    kept = stage.model.layers["3"]
    loaded = []
    grown = change_layers(stage, 2, 6, model, torch.float32, "cpu", progress=loaded.append)
    # it gained layers 4 and 5
    assert (
        sum(loaded) == sum(layer_weight_bytes(config, 4, 6, torch.float32, model)) and grown.model.layers["3"] is kept
    )
    held = {n: t.numel() * t.element_size() for n, t in [*grown.named_parameters(), *grown.named_buffers()]}
    assert (
        sum(n for name, n in held.items() if ".layers.4." in name)
        == layer_weight_bytes(config, 4, 5, torch.float32, model)[0]
    )
    if source != "safetensors":
        assert isinstance(grown.model.layers["4"].mlp.up_proj, QuantizedLinear)
    fresh = load_stage_model(model, 2, 6)
    x = torch.randn(5, config.hidden_size)
    outs = []
    for m in (grown, fresh):
        cache = KVCache(4, 4, 8, config.num_key_value_heads, config.head_dim)
        outs.append(m(x, AttentionMetadata.build([(0, 5, [0])], 8, torch.device("cpu")), cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    loaded.clear()
    shrunk = change_layers(grown, 4, 6, model, torch.float32, "cpu", progress=loaded.append)
    assert loaded == [] and list(shrunk.model.layers) == ["4", "5"]


def run_with(engine: Engine, pipeline, during=None) -> list[list[int]]:
    """The 8 streams on the engine's serving loop; `during(engine, seqs)` runs once every stream has 10 tokens."""
    seqs = [engine.add_request(p, sampling(i)) for i, p in enumerate(PROMPTS)]
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    try:
        if during is not None:
            while min(len(s.output_token_ids) for s in seqs) < 10:
                time.sleep(0.002)
            during(engine, seqs)
        deadline = time.monotonic() + 120
        while not all(s.is_finished for s in seqs):
            assert time.monotonic() < deadline and loop.is_alive()
            time.sleep(0.01)
    finally:
        stop.set()
        pipeline.wake()
        loop.join(timeout=30)
    return [s.output_token_ids for s in seqs]


def test_over_grpc_an_admin_rebalance_mid_stream_keeps_every_token(model, reference):
    config = ClusterConfig.from_dict({"transport": {"host": "127.0.0.1"}, "pipeline": {"num_stages": 4}})
    pipeline = ThreadPipeline(model, ranges_from_counts([2, 2, 2, 2], 8), config=config, num_blocks=128, block_size=8)
    records = []
    try:
        engine = Engine(
            pipeline, scheduler_config(128, block_size=8, max_model_len=256, vocab_size=512), max_inflight=4
        )
        out = run_with(
            engine, pipeline, lambda e, seqs: records.append(e.rebalancer.request([3, 1, 1, 3]).result(timeout=60))
        )
        assert out == reference
        assert [s.layers for s in pipeline.stages] == [(0, 3), (3, 4), (4, 5), (5, 8)]
        assert [w.model.layer_start for w in pipeline.workers] == [0, 3, 4, 5]
        (record,) = records
        assert (
            record["outcome"] == "applied"
            and record["from"] == [2, 2, 2, 2]
            and record["reprefilled"] == 8
            and record["pause_s"] > 0
        )
        stats = engine.stats()
        assert (
            stats["rebalance"]["applied"] == 1
            and stats["rebalance"]["layers"] == [3, 1, 1, 3]
            and stats["kv_blocks_used"] == 0
        )
    finally:
        pipeline.shutdown()


def test_auto_moves_layers_off_a_slow_stage_and_the_streams_keep_their_tokens(model, reference):
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
            pipeline,
            scheduler_config(128, block_size=8, max_model_len=256, vocab_size=512),
            max_inflight=4,
            rebalance=RebalancePolicy("auto", min_gain=0.10, cooldown_s=0.0),
        )
        assert run_with(engine, pipeline) == reference
        applied = [h for h in engine.rebalancer.history if h["outcome"] == "applied"]
        assert applied and applied[0]["trigger"] == "auto" and applied[0]["predicted_gain"] >= 0.10
        assert engine.layer_counts[1] == 1, engine.rebalancer.history  # the slow stage keeps one layer
    finally:
        pipeline.shutdown()


def test_a_split_that_is_not_this_pipelines_is_refused_and_changes_nothing(model):
    pipeline = LocalPipeline.load(model, ranges_from_counts([4, 4], 8), num_blocks=64, block_size=8)
    engine = Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=256, vocab_size=512))
    for counts in ([4, 3], [8, 0], [2, 2, 4], "4,4", [4.0, 4.0], [True, 7]):
        with pytest.raises(RequestError, match="at least one layer") as e:
            engine.rebalancer.apply(counts, "admin", None)
        assert e.value.param == "layers"
    assert engine.layer_counts == [4, 4] and engine.rebalancer.history == []
    engine.rebalancer.busy = True  # one under way
    with pytest.raises(ConflictError, match="already under way"):
        engine.rebalancer.request([3, 5])


def call(state: ServerState, requests: list[tuple]) -> list[tuple[int, dict | str]]:
    async def go():
        async with TestClient(TestServer(build_app(state), host="127.0.0.1")) as client:
            out = []
            for method, path, body, key in requests:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                async with client.request(method, path, json=body, headers=headers) as resp:
                    out.append(
                        (
                            resp.status,
                            await resp.json() if resp.content_type == "application/json" else await resp.text(),
                        )
                    )
            return out

    return asyncio.run(go())


def test_the_admin_endpoint_needs_an_api_key_and_reports_the_split_pause_and_proposal(model):
    pipeline = LocalPipeline.load(model, ranges_from_counts([4, 4], 8), num_blocks=64, block_size=8)
    engine = AsyncEngine(Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=256, vocab_size=512)))
    state = ServerState(tokenizer=Tokenizer(model), model_name="tiny", max_model_len=256, sampling_defaults={})
    state.engine, state.stages = engine, pipeline.stages
    try:
        ((status, body),) = call(state, [("POST", "/v1/admin/rebalance", {"layers": [3, 5]}, None)])
        assert status == 403 and "--api-key-env" in body["error"]["message"] and engine.core.layer_counts == [4, 4]
        state.api_key = KEY
        replies = call(
            state,
            [
                ("POST", "/v1/admin/rebalance", {"layers": [3, 5]}, "wrong"),
                ("POST", "/v1/admin/rebalance", {"layers": [3, 4]}, KEY),
                (
                    "POST",
                    "/v1/admin/rebalance",
                    None,
                    KEY,
                ),  # the current proposal: none before 32 measured microbatches
                ("POST", "/v1/admin/rebalance", {"layers": [3, 5]}, KEY),
                ("GET", "/v1/stats", None, KEY),
                ("GET", "/metrics", None, None),
            ],
        )
        assert [r[0] for r in replies] == [401, 400, 400, 200, 200, 200], replies
        assert replies[1][1]["error"]["param"] == "layers" and "no proposal yet" in replies[2][1]["error"]["message"]
        applied = replies[3][1]
        assert (
            applied["outcome"] == "applied"
            and applied["to"] == [3, 5]
            and [s["layers"] for s in applied["stages"]] == [[0, 3], [3, 8]]
        )
        rebalance = replies[4][1]["rebalance"]
        assert (
            rebalance["mode"] == "suggest"
            and rebalance["layers"] == [3, 5]
            and rebalance["history"][-1]["pause_s"] == applied["pause_s"]
        )
        gauges = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(replies[5][1])
            for s in f.samples
        }
        assert (
            gauges[("stagecoach_rebalance_predicted_gain", ())] == 0.0 and gauges[("stagecoach_rebalancing", ())] == 0.0
        )
        assert (
            gauges[("stagecoach_prefix_cache_queries_total", ())]
            == gauges[("stagecoach_prefix_cache_hits_total", ())]
            == 0
        )
        engine.core.failure = "a test's recovery"  # what a recovery under way sets
        ((status, body),) = call(state, [("POST", "/v1/admin/rebalance", {"layers": [4, 4]}, KEY)])
        assert status == 409 and "recovery" in body["error"]["message"]
    finally:
        engine.stop()
        pipeline.shutdown()
