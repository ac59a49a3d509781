"""The README's `ray job submit` recipe, end to end, against a real `ray start --head` cluster on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, http, make_hf_checkpoint

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_serves_and_ray_job_stop_leaves_nothing(tmp_path, ray_head_cluster):
    model = tmp_path / "model"
    make_hf_checkpoint(model, num_hidden_layers=3, max_position_embeddings=256)
    http_port = free_port()
    address, env = ray_head_cluster
    job_env = env | {"RAY_ADDRESS": address}
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(REPO),
            "--no-wait",
            "--",
            str(BIN / "stagecoach"),
            "serve",
            "--model",
            str(model),
            "--stages",
            "2",
            "--port",
            str(http_port),
            "--grpc-host",
            "127.0.0.1",
        ],
        env=job_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stderr
    job_id = next(
        w for line in submit.stdout.splitlines() for w in line.replace("'", " ").split() if w.startswith("raysubmit_")
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if http(http_port, "/health", key=None, timeout=5)[0] == 200:
                break
        except OSError:
            pass
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", address, job_id],
            env=job_env,
            capture_output=True,
            text=True,
        ).stdout
        if time.monotonic() > deadline or "FAILED" in status or "SUCCEEDED" in status:
            logs = subprocess.run(
                [str(BIN / "ray"), "job", "logs", "--address", address, job_id],
                env=job_env,
                capture_output=True,
                text=True,
            ).stdout
            pytest.fail(f"the serving job did not come up: {status[-500:]}\n{logs[-3000:]}")
        time.sleep(1)
    status, body, _ = http(
        http_port,
        "/v1/completions",
        {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
        key=None,
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 4

    def state(kind: str) -> list[dict]:
        """Ray's state API, asked from a process that holds this cluster's token."""
        code = (
            f"import json; from ray.util.state import list_{kind}; "
            f"print(json.dumps([x.__dict__ for x in list_{kind}(address={address!r})], default=str))"
        )
        out = subprocess.run([sys.executable, "-c", code], env=job_env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def alive_stage_actors() -> list[dict]:
        return [a for a in state("actors") if a["class_name"] == "StageActor" and a["state"] == "ALIVE"]

    assert len(alive_stage_actors()) == 2
    subprocess.run(
        [str(BIN / "ray"), "job", "stop", "--address", address, job_id],
        env=job_env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    deadline = time.monotonic() + 60
    while alive_stage_actors() and time.monotonic() < deadline:
        time.sleep(1)
    assert alive_stage_actors() == []
    assert [g for g in state("placement_groups") if g["state"] != "REMOVED"] == []
