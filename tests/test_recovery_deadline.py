"""A stage that never comes back: its requests end with 503 within the deadline, and the server serves again once it returns.

A module of its own: the chaos tests' server holds three of the four nodes' GPUs until its module ends.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from helpers import http, make_hf_checkpoint
from test_recovery import config_file, stage_pid, stream_text
from test_serve import Server

pytestmark = pytest.mark.slow


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model"
    make_hf_checkpoint(path, num_hidden_layers=3, max_position_embeddings=1024)
    return path


def test_a_stage_that_never_comes_back_ends_requests_with_503_then_serves_again(model, ray_cluster, tmp_path):
    deadline_s = 4.0
    s = Server(
        ["--config", config_file(tmp_path, model, recovery_timeout_s=deadline_s), "--ray-address", ray_cluster.address],
        tmp_path / "server.log",
    )
    try:
        s.wait_ready()
        hidden = model.with_name("model-away")
        progress, out = [0], {}
        t = threading.Thread(
            target=stream_text,
            args=(
                s.port,
                {"prompt": [5, 6, 7], "max_tokens": 800, "temperature": 0, "ignore_eos": True},
                progress,
                0,
                out,
            ),
        )
        t.start()
        while http(s.port, "/v1/stats", key=None)[1]["engine"]["running"] == 0:
            time.sleep(0.01)
        time.sleep(0.3)
        os.rename(model, hidden)  # a restarted stage cannot load: the stage does not come back
        try:
            killed_at = time.monotonic()
            os.kill(stage_pid(s.port, 1), signal.SIGKILL)
            t.join(timeout=120)
            ended = time.monotonic() - killed_at
            text, events = out[0]
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])["error"]
            assert error["code"] == "pipeline_failed" and "did not recover" in error["message"]
            assert ended < deadline_s + 15, ended
            status, payload, headers = http(s.port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 2}, key=None)
            assert status == 503 and headers.get("Retry-After") and http(s.port, "/health", key=None)[0] == 503
        finally:
            os.rename(hidden, model)  # the stage can come back now
        deadline = time.monotonic() + 120
        while http(s.port, "/health", key=None)[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (
            http(s.port, "/v1/completions", {"prompt": [1, 2], "max_tokens": 3, "temperature": 0}, key=None)[0] == 200
        )
    finally:
        s.stop()
