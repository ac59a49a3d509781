"""A poisoned request fails alone: a stage that raises on one request's microbatches (and stays up) ends that request only."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request

import pytest
import yaml
from defaults import scheduler_config
from helpers import hf_greedy, http, make_gguf_checkpoint, make_hf_checkpoint

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto.types import SamplingParams
from stagecoach.stage.testing_knobs import StageTesting

POISON = 37  # testing.poison.prefill_tokens: a prompt of this length is the poisoned request


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, request):
    """A float checkpoint, or (parametrized "gguf") a GGUF one held quantized: (folder, HF model on its values)."""
    path = tmp_path_factory.mktemp("poison") / "model"
    if getattr(request, "param", "safetensors") == "gguf":
        return path, make_gguf_checkpoint(path, num_hidden_layers=3, vocab_size=512)[1]
    return path, make_hf_checkpoint(path, num_hidden_layers=3, max_position_embeddings=256)


@pytest.mark.parametrize(
    "checkpoint, stage",
    [("safetensors", 0), ("safetensors", 1), ("safetensors", 2), ("gguf", 1)],
    ids=["first stage", "middle stage", "last stage", "gguf, middle stage"],
    indirect=["checkpoint"],
)
def test_in_process_the_poisoned_sequence_ends_and_the_others_match_the_reference(checkpoint, stage):
    path, hf = checkpoint
    pipeline = LocalPipeline.load(path, ranges_from_counts([1, 1, 1], 3), num_blocks=64, block_size=8)
    pipeline.runners[stage].testing = StageTesting(poison_prefill_tokens=POISON)
    engine = Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=256, vocab_size=512))
    prompts = [[(5 * i + j) % 500 + 3 for j in range(4 + 3 * i)] for i in range(4)]
    poisoned = [[(3 * j) % 500 + 3 for j in range(POISON)], [(7 * j) % 500 + 3 for j in range(POISON)]]
    seqs = engine.generate(prompts[:2] + poisoned[:1] + prompts[2:] + poisoned[1:], [greedy(12)] * 6)
    ok = seqs[:2] + seqs[3:5]
    assert [s.finish_reason for s in seqs] == ["length", "length", "error", "length", "length", "error"]
    for prompt, seq in zip(prompts, ok, strict=False):
        assert seq.output_token_ids == hf_greedy(hf, prompt, 12)[0]
    stats = engine.stats()
    # One mixed failure, then each poisoned sequence alone once more; every innocent one got through alone.
    assert (
        stats["requests_failed"] == {"stage_error": 2}
        and stats["recoveries"] == 0
        and stats["microbatch_failures"] == 3
    )
    assert stats["kv_blocks_used"] == 0 and stats["isolating"] == 0


# -- the acceptance: a 3-stage Ray server with testing.poison on its middle stage ---------------------------------------
STREAMS = [
    [(13 * i + j) % 390 + 3 for j in range(40 + i)] for i in range(8)
]  # longer than POISON: no innocent re-prefill matches it
NEW_TOKENS = 80


def poisoned_prompt(k: int) -> list[int]:
    return [(17 * j + 5 * k) % 390 + 3 for j in range(POISON)]


@pytest.fixture(scope="module")
def server(checkpoint, ray_cluster, tmp_path_factory):
    from test_recovery import Server

    tmp = tmp_path_factory.mktemp("poison_server")
    (tmp / "cluster.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(checkpoint[0])},
                # A budget that never splits a prompt: the poisoned one's first chunk is always exactly POISON tokens, and no other's is.
                "pipeline": {
                    "num_stages": 3,
                    "gpus_per_stage": 1,
                    "placement": "strict_spread",
                    "max_batch_tokens": 2048,
                },
                "testing": {"stage_delay_ms": [3.0, 3.0, 3.0], "poison": {"stage": 1, "prefill_tokens": POISON}},
                "cache": {"block_size": 8, "num_blocks": 512},
                "transport": {"host": "127.0.0.1"},
            }
        )
    )
    s = Server(["--config", str(tmp / "cluster.yaml"), "--ray-address", ray_cluster.address], tmp / "server.log")
    s.wait_ready()
    yield s
    s.stop()


def engine_stats(server) -> dict:
    return http(server.port, "/v1/stats", key=None)[1]["engine"]


def Streams(server):
    """The 8 greedy streams, read on threads."""
    from test_recovery import StreamSet

    body = {"max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0}
    return StreamSet(server.port, [body | {"prompt": p} for p in STREAMS])


@pytest.fixture(scope="module")
def reference(server):
    """The 8 streams' texts without a poisoned request (and the stage pids, which must never change without a kill)."""
    return Streams(server).texts()


class Poisoned(threading.Thread):
    """One poisoned request, streamed or not: its status, its events (streamed) and how long it took."""

    def __init__(self, server, k: int, stream: bool) -> None:
        super().__init__()
        self.port, self.k, self.stream = server.port, k, stream
        self.start()

    def run(self) -> None:
        from test_recovery import stream_text

        start = time.monotonic()
        body = {"prompt": poisoned_prompt(self.k), "max_tokens": 20, "temperature": 0}
        if self.stream:
            out = {}
            stream_text(self.port, body, [0], 0, out)
            self.status, self.body = 200, out[0][1]
        else:
            self.status, self.body, _ = http(self.port, "/v1/completions", body, key=None, timeout=120)
        self.took = time.monotonic() - start

    def check(self) -> None:
        self.join(timeout=120)
        if self.stream:  # an error event, then [DONE]
            assert self.body[-1] == "[DONE]" and json.loads(self.body[-2])["error"]["code"] == "stage_error", self.body[
                -3:
            ]
        else:
            assert self.status == 500 and self.body["error"]["code"] == "stage_error", (self.status, self.body)
            assert "stage 1" in self.body["error"]["message"] and "testing.poison" in self.body["error"]["message"]


def pids(server) -> list[int]:
    return [s["pid"] for s in http(server.port, "/v1/stats", key=None)[1]["stages"]]


def failed_total(server) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as resp:
        text = resp.read().decode()
    return float(re.search(r'^stagecoach_requests_failed_total\{reason="stage_error"\} (\S+)$', text, re.M).group(1))


@pytest.mark.slow
@pytest.mark.parametrize(
    "when, poisoned",
    [("with the streams", [False]), ("mid-stream", [True]), ("mid-stream, two at once", [False, True])],
)
def test_poisoned_requests_fail_alone_and_the_streams_keep_their_text(server, reference, when, poisoned):
    before, stage_pids, failed = engine_stats(server), pids(server), failed_total(server)
    streams = Streams(server)
    if when != "with the streams":
        streams.wait_mid_stream(15)
    requests = [Poisoned(server, k, stream) for k, stream in enumerate(poisoned)]
    for r in requests:
        r.check()
    assert streams.texts() == reference
    after = engine_stats(server)
    print(
        f"{when}: poisoned requests ended after {', '.join(f'{r.took:.2f} s' for r in requests)}; "
        f"{after['microbatch_failures'] - before['microbatch_failures']} failed microbatches"
    )
    assert (
        after["recoveries"] == before["recoveries"] and pids(server) == stage_pids
    )  # the stage stayed up: no recovery
    assert after["requests_failed"]["stage_error"] - before["requests_failed"]["stage_error"] == len(poisoned)
    assert failed_total(server) - failed == len(poisoned)
    assert after["isolating"] == 0 and after["running"] == 0 and after["kv_blocks_used"] == 0
    assert http(server.port, "/health", key=None)[0] == 200


@pytest.mark.slow
def test_a_stage_killed_during_isolation_is_recovered_and_nothing_is_lost(server, reference):
    before = engine_stats(server)
    streams = Streams(server)
    streams.wait_mid_stream(15)
    request = Poisoned(server, 7, stream=True)
    deadline = time.monotonic() + 30
    while (
        engine_stats(server)["microbatch_failures"] == before["microbatch_failures"]
    ):  # the first failure: isolation begins
        assert time.monotonic() < deadline
    os.kill(pids(server)[2], signal.SIGKILL)
    request.check()
    assert streams.texts() == reference
    after = engine_stats(server)
    assert (
        after["recoveries"] == before["recoveries"] + 1
        and after["requests_failed"]["stage_error"] == before["requests_failed"]["stage_error"] + 1
    )
    assert http(server.port, "/health", key=None)[0] == 200
