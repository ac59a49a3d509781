"""`stagecoach submit`, the Helm chart's submitter, against a real `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def submitter(address: str, env: dict, log: Path, *command: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "stagecoach"),
            "submit",
            "--address",
            address,
            "--name",
            "t",
            "--stop-timeout",
            "30",
            "--",
            *command,
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )


def jobs(address: str, env: dict) -> list[tuple[str, str]]:
    code = (
        "from ray.job_submission import JobSubmissionClient; import sys; "
        f"[print(j.submission_id, j.status.value) for j in JobSubmissionClient({address!r}).list_jobs()]"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.startswith("t-")]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_submitter_follows_replaces_and_stops_its_job(tmp_path, ray_head_cluster):
    sleeper = [sys.executable, "-c", "import time; print('first job up', flush=True); time.sleep(600)"]
    address, env = ray_head_cluster
    # A job that runs until stopped: the submitter prints its logs and stays.
    first = submitter(address, env, tmp_path / "first.log", *sleeper)
    wait_for(
        lambda: "first job up" in (tmp_path / "first.log").read_text(),
        60,
        "the first job's log never reached the submitter",
    )
    wait_for(
        lambda: [s for _, s in jobs(address, env)] == ["RUNNING"], 30, "the first job never showed as RUNNING"
    )  # Ray's status lags the log
    assert first.poll() is None

    # A restarted submitter (same name) stops the job the first one left, then runs its own. The job
    # sees the environment of Ray's head (the chart puts the API key and link token there).
    second = submitter(
        address,
        env,
        tmp_path / "second.log",
        sys.executable,
        "-c",
        "import os; print('second job done, head env:', os.environ.get('STAGECOACH_TEST_HEAD_ENV'))",
    )
    assert second.wait(timeout=90) == 0, (tmp_path / "second.log").read_text()
    assert "second job done, head env: head" in (tmp_path / "second.log").read_text()
    assert "STAGECOACH_TEST_HEAD_ENV" not in env
    assert first.wait(timeout=30) == 1  # its job was STOPPED, not SUCCEEDED
    assert sorted(s for _, s in jobs(address, env)) == ["STOPPED", "SUCCEEDED"]

    # SIGTERM (a pod being deleted) stops the job and the submitter ends.
    third = submitter(address, env, tmp_path / "third.log", *sleeper)
    wait_for(lambda: "first job up" in (tmp_path / "third.log").read_text(), 60, "the third job never started")
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=60) == 1
    assert "RUNNING" not in [s for _, s in jobs(address, env)]

    # A job that fails makes the submitter fail (the container restarts and resubmits).
    failing = submitter(address, env, tmp_path / "failing.log", sys.executable, "-c", "raise SystemExit(3)")
    assert failing.wait(timeout=90) == 1
    assert "FAILED" in (tmp_path / "failing.log").read_text()


def test_submitter_without_a_command_says_what_to_give(tmp_path):
    out = subprocess.run(
        [str(BIN / "stagecoach"), "submit", "--address", "http://127.0.0.1:9"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "stagecoach submit -- stagecoach serve" in out.stderr
