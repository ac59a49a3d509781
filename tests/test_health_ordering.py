"""Health checks ordered against reconfigurations: a poller at 0.02 s racing re-attaches and rebalances never calls a
closing channel, never dies, and never reports a stage that is up as failed; one poll's error is logged and the next runs.

The race runs in a child process: closing a gRPC channel while another thread starts a call on it has crashed the
whole process (SIGSEGV in gRPC's Cython layer), and a crash must fail this test, not end the test run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_hf_checkpoint

INTERVAL_S = 0.02
NUM_ATTACHES = 100
SPLITS = ([1, 3], [3, 1])  # rebalanced back and forth


def _config(model_dir: str):
    from stagecoach.cluster.config import ClusterConfig

    return ClusterConfig.from_dict(
        {
            "model": {"path": model_dir},
            "pipeline": {"backend": "thread", "layers": [2, 2], "heartbeat_interval_s": INTERVAL_S},
            "cache": {"num_blocks": 64, "block_size": 8},
            "transport": {"host": "127.0.0.1"},
        }
    )


async def _supervised(model_dir: str):
    """The server's own supervisor over in-process gRPC stages (no HTTP listener): (supervisor, state)."""
    from stagecoach.coordinator.serve import server_state
    from stagecoach.coordinator.supervisor import EngineSupervisor
    from stagecoach.coordinator.tokenizer import Tokenizer
    from stagecoach.proto.model_config import ModelConfig

    config = _config(model_dir)
    tokenizer, model = Tokenizer(model_dir), ModelConfig.from_pretrained(model_dir)
    state = server_state(config, tokenizer, model)
    supervisor = EngineSupervisor(config, state, tokenizer, model)
    await supervisor.start()
    return supervisor, state


async def _race(model_dir: str) -> dict:
    supervisor, state = await _supervised(model_dir)
    poller = asyncio.ensure_future(supervisor.poll_health(INTERVAL_S))
    pipeline, engine = supervisor.pipeline, state.engine.core
    addresses = [s.address for s in pipeline.stages]
    loop = asyncio.get_running_loop()

    def reattach() -> None:  # the reproduction's shape: channels closed and replaced while the poller calls them
        for _ in range(NUM_ATTACHES):
            pipeline.attach(addresses)

    def rebalance() -> list[str]:  # and the real reconfiguration, through the engine's loop
        return [engine.rebalancer.request(SPLITS[i % 2]).result(timeout=60)["outcome"] for i in range(10)]

    started = time.monotonic()
    await loop.run_in_executor(None, reattach)
    outcomes = await loop.run_in_executor(None, rebalance)
    await asyncio.sleep(10 * INTERVAL_S)  # polls after the last reconfiguration
    result = {
        "poller_alive": not poller.done(),
        "poller_error": repr(poller.exception()) if poller.done() and not poller.cancelled() else None,
        "recoveries": len(engine.recoveries),
        "rebalances": outcomes,
        "stage_states": list(state.stage_states),
        "polls": state.health_polls,
        "poll_errors": state.health_poll_errors,
        "seconds": round(time.monotonic() - started, 2),
    }
    poller.cancel()
    await supervisor.stop()
    return result


def _child(model_dir: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    print("RESULT " + json.dumps(asyncio.run(_race(model_dir))), flush=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("health_ordering") / "model"
    make_hf_checkpoint(path, num_hidden_layers=4, max_position_embeddings=256)
    return path


@pytest.mark.slow
def test_a_poller_at_20_ms_racing_100_reattaches_and_10_rebalances_survives_and_reports_nothing_false(model):
    proc = subprocess.run([sys.executable, __file__, str(model)], capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"the process ended with {proc.returncode} (a negative code is a signal):\n{tail}"
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    print(result)
    assert result["poller_alive"], result
    assert result["recoveries"] == 0 and result["poll_errors"] == 0, result
    assert result["rebalances"] == ["applied"] * 10 and result["stage_states"] == ["ready", "ready"], result
    assert result["polls"] > 20, result  # it kept polling through all of it


if __name__ == "__main__":
    _child(sys.argv[1])


def test_an_error_in_one_poll_is_logged_counted_and_the_next_poll_runs_and_a_recovery_leaves_every_stage_ready(
    model, caplog
):
    from prometheus_client import generate_latest

    from stagecoach.coordinator.server_metrics import stats_document

    async def go() -> tuple[dict, str]:
        supervisor, state = await _supervised(str(model))
        engine = state.engine.core
        check, calls = engine.check_stages, []

        def failing_once() -> list[str] | None:
            calls.append(time.monotonic())
            if len(calls) == 2:
                raise RuntimeError("injected into the second health poll")
            return check()

        engine.check_stages = failing_once
        poller = asyncio.ensure_future(supervisor.poll_health(INTERVAL_S))
        try:
            while len(calls) < 6:
                assert not poller.done(), poller
                await asyncio.sleep(INTERVAL_S)
            poller.cancel()
            # A recovery's end makes every stage ready at once (the stage that failed was replaced), not at the next poll.
            state.stage_states = ["ready", "failed"]
            state.metrics.stage_up.labels("1").set(0)
            engine.on_recovery(0.5)
            return stats_document(state), generate_latest(state.metrics.registry).decode()
        finally:
            poller.cancel()
            await supervisor.stop()

    with caplog.at_level(logging.ERROR, logger="stagecoach.serve"):
        stats, metrics = asyncio.run(go())
    (record,) = [r for r in caplog.records if "health poll failed" in r.getMessage()]
    assert record.exc_info and "injected into the second health poll" in str(record.exc_info[1])
    health = stats["health"]
    assert health["poll_errors"] == 1 and health["polls"] >= 4 and health["last_poll_at"] is not None, health
    assert [s["state"] for s in stats["stages"]] == ["ready", "ready"]
    assert "stagecoach_health_poll_errors_total 1.0" in metrics
    assert "stagecoach_health_last_poll_timestamp_seconds" in metrics and "stagecoach_recoveries_total 1.0" in metrics
    assert 'stagecoach_stage_up{stage="0"} 1.0' in metrics and 'stagecoach_stage_up{stage="1"} 1.0' in metrics
