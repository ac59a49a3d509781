"""A dead engine loop comes back: its open requests end with 500, a new loop serves on a fresh pipeline, and after
three restarts the fourth failure turns /live to 503 so that Kubernetes restarts the pod."""

from __future__ import annotations

import json
import time
import urllib.request
from http.client import HTTPConnection

import pytest
import yaml
from helpers import http, make_hf_checkpoint
from test_serve import Server

pytestmark = pytest.mark.slow

CRASH = 9  # testing.engine_crash_token_id: a prompt holding it makes the engine loop raise


def wait_healthy(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while http(port, "/health", key=None)[0] != 200:
        assert time.monotonic() < deadline, "the server did not serve again"
        time.sleep(0.1)


def streamed_events(port: int, body: dict) -> list[str]:
    conn = HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}), {"Content-Type": "application/json"})
    return [line[6:].strip().decode() for line in iter(conn.getresponse().readline, b"") if line.startswith(b"data: ")]


def test_a_dead_loop_restarts_three_times_then_live_fails(tmp_path):
    make_hf_checkpoint(tmp_path / "model", num_hidden_layers=2, max_position_embeddings=256)
    config = tmp_path / "crashy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp_path / "model")},
                "pipeline": {"backend": "local"},
                "cache": {"block_size": 8, "num_blocks": 64},
                "testing": {"engine_crash_token_id": CRASH},
            }
        )
    )
    s = Server(["--config", str(config)], tmp_path / "server.log")
    good = {"prompt": [4, 5], "max_tokens": 3, "temperature": 0}
    try:
        s.wait_ready()
        for failure in range(1, 5):
            if failure == 2:  # a stream open at the crash gets the error event, then [DONE]
                events = streamed_events(s.port, {"prompt": [CRASH, 5], "max_tokens": 3})
                assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_failed", events
            else:
                status, payload, _ = http(s.port, "/v1/completions", {"prompt": [CRASH, 5], "max_tokens": 3}, key=None)
                assert (
                    status == 500
                    and payload["error"]["type"] == "server_error"
                    and payload["error"]["code"] == "engine_failed"
                ), payload
            if failure < 4:
                wait_healthy(s.port)
                assert http(s.port, "/v1/completions", good, key=None)[0] == 200, f"no service after restart {failure}"
                assert http(s.port, "/live", key=None)[0] == 200
        deadline = time.monotonic() + 10
        while http(s.port, "/live", key=None)[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, payload, _ = http(s.port, "/live", key=None)
        assert status == 503 and "not restarting" in payload["reason"]
        assert http(s.port, "/health", key=None)[0] == 503
        with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/metrics") as resp:
            assert "stagecoach_engine_restarts_total 3.0" in resp.read().decode()
    finally:
        s.stop()
