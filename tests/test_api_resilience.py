"""The HTTP API keeps serving around what clients do: a client that disconnects mid-stream is a 499 (not a 500) and its
sequence is aborted; a 2 MB prompt is tokenised off the event loop, so /health answers meanwhile."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from http.client import HTTPConnection

import pytest
from aiohttp import web
from defaults import scheduler_config
from helpers import QWEN_DIR, free_port, http, make_hf_checkpoint, require_shared
from prometheus_client.parser import text_string_to_metric_families

from stagecoach.cluster.local_pipeline import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.api import build_runner
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.server_state import ServerState
from stagecoach.coordinator.tokenizer import Tokenizer


class ThreadServer:
    """The API as `stagecoach serve` runs it (build_runner), on an event loop of its own thread, so that a stalled
    loop shows as a late answer to this test's plain HTTP clients."""

    def __init__(self, state: ServerState) -> None:
        self.port, self.loop = free_port(), asyncio.new_event_loop()
        self.state = state
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.runner = build_runner(state)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("api_resilience") / "model"
    make_hf_checkpoint(path, num_hidden_layers=2, max_position_embeddings=512)
    return path


def serve(model, tokenizer: Tokenizer) -> tuple[ThreadServer, AsyncEngine]:
    pipeline = LocalPipeline.load(model, ranges_from_counts([1, 1], 2), num_blocks=64, block_size=8)
    engine = AsyncEngine(Engine(pipeline, scheduler_config(64, block_size=8, max_model_len=512, vocab_size=512)))
    state = ServerState(tokenizer=tokenizer, model_name="tiny", max_model_len=512, sampling_defaults={})
    state.engine, state.stages = engine, pipeline.stages
    return ThreadServer(state), engine


def samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_client_that_disconnects_mid_stream_is_a_499_logged_in_one_line_and_its_sequence_is_aborted(model, caplog):
    server, engine = serve(model, Tokenizer(model))
    try:
        with caplog.at_level(logging.INFO):
            conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
            body = {"prompt": [4, 5, 6], "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and resp.readline().startswith(b"data: ")  # streaming: its sequence runs
            conn.sock.close()
            conn.close()
            deadline = time.monotonic() + 30
            while True:
                m = samples(server.port)
                route = ("route", "/v1/completions")
                closed = m.get(("stagecoach_http_responses_total", (route, ("status", "499"))), 0)
                stats = engine.core.stats()
                if closed == 1 and stats["running"] == 0 and stats["kv_blocks_used"] == 0:
                    break
                assert time.monotonic() < deadline, (closed, stats)
                time.sleep(0.05)
        assert m.get(("stagecoach_http_responses_total", (route, ("status", "500"))), 0) == 0
        assert m[("stagecoach_requests_total", (("status", "499"),))] == 1
        lines = [r for r in caplog.records if "closed the connection" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
        # and the server serves on
        status, reply, _ = http(server.port, "/v1/completions", {"prompt": [4, 5, 6], "max_tokens": 4}, key=None)
        assert status == 200 and reply["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
        engine.stop()


class Watched(Tokenizer):
    """The real tokenizer, noting when a long text's tokenising starts and ends (as the API calls it, either way)."""

    started: threading.Event
    ended_at: float | None

    def _watch(self, call, text_len: int):
        if text_len < 100_000:
            return call()
        self.started.set()
        try:
            return call()
        finally:
            self.ended_at = time.monotonic()

    def encode(self, text: str) -> list[int]:
        return self._watch(lambda: super(Watched, self).encode(text), len(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._watch(lambda: super(Watched, self).encode_batch(texts), sum(map(len, texts)))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_health_answers_while_a_2_mb_prompt_is_tokenised(model, route):
    require_shared(QWEN_DIR)
    tokenizer = Watched(QWEN_DIR)  # Qwen's own vocabulary: tokenising 2 MB takes seconds here
    tokenizer.started, tokenizer.ended_at = threading.Event(), None
    server, engine = serve(model, tokenizer)
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40_000))[: 2 * 2**20]
    body = {"prompt": text} if route == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    done: dict[str, float] = {}

    def big() -> None:
        status, reply, _ = http(server.port, route, body | {"max_tokens": 1}, key=None, timeout=120)
        done["big"] = time.monotonic()
        done["status"] = status  # 400: far beyond the context; what matters is when it came

    try:
        t = threading.Thread(target=big)
        t.start()
        assert tokenizer.started.wait(60)
        status, _, _ = http(server.port, "/health", key=None, timeout=120)
        done["health"] = time.monotonic()
        t.join(120)
        assert status == 200 and done["status"] == 400
        assert done["health"] < tokenizer.ended_at < done["big"], (done, tokenizer.ended_at)
        print(f"/health answered {tokenizer.ended_at - done['health']:.2f} s before the 2 MB prompt's tokenising ended")
    finally:
        server.stop()
        engine.stop()
