"""The submitter: runs one command as a Ray job, replacing the job an earlier submitter left, and lives as long as it does."""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable

from stagecoach.errors import ConfigError

TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}
METADATA_KEY = "stagecoach-submitter"  # the job metadata that marks a job as this submitter's, by name


def _client(address: str, wait_s: float, log: Callable[[str], None]):
    """A JobSubmissionClient, once Ray's dashboard answers (the head may still be starting)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, OSError, RuntimeError) as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"Ray's job API at {address} did not answer within {wait_s:.0f} s: {e}") from None
            log(f"waiting for Ray's job API at {address} ({type(e).__name__})")
            time.sleep(2)


def _wait_terminal(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def stop_previous(client, name: str, stop_timeout_s: float, log: Callable[[str], None]) -> None:
    """Stops every unfinished job an earlier submitter of this name started.

    A restarted submitter container must not leave the old server running beside the new one
    (both would want the same API port and stage ports).
    """
    for job in client.list_jobs():
        if (job.metadata or {}).get(METADATA_KEY) != name or str(job.status.value) in TERMINAL:
            continue
        log(f"stopping {job.submission_id}, left running by an earlier submitter")
        client.stop_job(job.submission_id)
        status = _wait_terminal(client, job.submission_id, stop_timeout_s)
        if status not in TERMINAL:
            raise ConfigError(f"job {job.submission_id} did not stop within {stop_timeout_s:.0f} s (status {status})")


def run_submitter(
    address: str,
    name: str,
    command: list[str],
    wait_s: float = 600.0,
    stop_timeout_s: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> int:
    """Submits `command` as a Ray job and follows its logs; returns 0 only if the job succeeded.

    SIGTERM or SIGINT stops the job (Ray sends it SIGTERM, so `stagecoach serve` drains) and
    waits up to `stop_timeout_s` for it to end.
    """
    log = log or (lambda msg: print(f"stagecoach submit: {msg}", file=sys.stderr, flush=True))
    if not command:
        raise ConfigError(
            "no command to submit: give it after '--', e.g. stagecoach submit -- stagecoach serve --config ..."
        )
    client = _client(address, wait_s, log)
    stop_previous(client, name, stop_timeout_s, log)
    job_id = client.submit_job(
        entrypoint=shlex.join(command),
        metadata={METADATA_KEY: name},
        submission_id=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    log(f"submitted {job_id}: {shlex.join(command)}")

    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            log(f"{signal.Signals(signum).name}: stopping {job_id}")
            threading.Thread(target=client.stop_job, args=(job_id,), daemon=True).start()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:

        async def follow() -> None:
            async for lines in client.tail_job_logs(job_id):
                sys.stdout.write(lines)
                sys.stdout.flush()

        try:
            asyncio.run(follow())
        except Exception as e:
            log(f"log stream ended: {type(e).__name__}: {e}")
        # The stream ends when the job does, or when the head restarts; the job's status decides.
        status = _wait_terminal(client, job_id, stop_timeout_s if stopping.is_set() else float("inf"))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log(f"{job_id} ended: {status}")
    return 0 if status == "SUCCEEDED" else 1
