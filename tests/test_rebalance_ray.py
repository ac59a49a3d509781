"""A rebalance on Ray stages while 8 streams run: applied, the streams keep their text; a stage that dies in the middle of
applying one is recovered onto the old split, and nothing is lost. With health polled every 20 ms, a dozen rebalances
while idle cause no false recovery, and a stage killed while idle is noticed and replaced without any request."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml
from helpers import http, make_hf_checkpoint

KEY = "test-key-123"  # tests/test_serve.Server puts it in STAGECOACH_TEST_KEY
STREAMS = [[(11 * i + j) % 390 + 3 for j in range(12 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from test_recovery import Server

    tmp = tmp_path_factory.mktemp("rebalance_server")
    make_hf_checkpoint(tmp / "model", num_hidden_layers=6, max_position_embeddings=256)
    (tmp / "cluster.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp / "model")},
                # Health polled every 20 ms (as a user tuning for fast detection would): rebalances race the poller.
                "pipeline": {
                    "layers": [2, 2, 2],
                    "gpus_per_stage": 1,
                    "placement": "strict_spread",
                    "max_batch_tokens": 64,
                    "heartbeat_interval_s": 0.02,
                },
                # Stage 2 exits in the middle of any rebalance that changes its layers.
                "testing": {"stage_delay_ms": [3.0, 3.0, 3.0], "rebalance_crash_stage": 2},
                "cache": {"block_size": 8, "num_blocks": 256},
                "transport": {"host": "127.0.0.1"},
                "server": {"api_key_env": "STAGECOACH_TEST_KEY"},
            }
        )
    )
    s = Server(["--config", str(tmp / "cluster.yaml"), "--ray-address", ray_cluster.address], tmp / "server.log")
    s.wait_ready()
    yield s
    s.stop()


def Streams(server):
    """The 8 streams (greedy and seeded), read on threads."""
    from test_recovery import StreamSet

    bodies = [
        {"prompt": p, "max_tokens": 100, "ignore_eos": True}
        | ({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": i})
        for i, p in enumerate(STREAMS)
    ]
    return StreamSet(server.port, bodies, KEY)


def stats(server) -> dict:
    return http(server.port, "/v1/stats")[1]


@pytest.mark.slow
def test_a_rebalance_mid_stream_and_a_stage_dying_in_the_next_lose_nothing(server):
    reference = Streams(server).texts()
    before = stats(server)
    assert [s["layers"] for s in before["stages"]] == [[0, 2], [2, 4], [4, 6]]
    pids = [s["pid"] for s in before["stages"]]

    # Applied mid-stream (stage 2 keeps its layers): the same text, no recovery, the same processes.
    streams = Streams(server)
    streams.wait_mid_stream(5, min_running=6)
    status, record, _ = http(server.port, "/v1/admin/rebalance", {"layers": [1, 3, 2]}, timeout=120)
    assert status == 200 and record["outcome"] == "applied", record
    assert streams.texts() == reference
    after = stats(server)
    assert [s["layers"] for s in after["stages"]] == [[0, 1], [1, 4], [4, 6]] and [
        s["pid"] for s in after["stages"]
    ] == pids
    assert (
        after["engine"]["recoveries"] == before["engine"]["recoveries"]
        and after["rebalance"]["history"][-1]["pause_s"] == record["pause_s"]
    )
    print(
        f"rebalance [2, 2, 2] → [1, 3, 2] mid-stream: paused {record['pause_s']:.3f} s, {record['reprefilled']} sequences re-prefilled"
    )

    # Stage 2 exits while changing layers: the rebalance fails (503) and the recovery brings every stage back onto
    # the split before it, never a mix; the streams keep their text.
    streams = Streams(server)
    streams.wait_mid_stream(5, min_running=6)
    status, body, _ = http(server.port, "/v1/admin/rebalance", {"layers": [2, 3, 1]}, timeout=120)
    assert status == 503 and "going back to" in body["error"]["message"], body
    assert streams.texts() == reference
    end = stats(server)
    assert [s["layers"] for s in end["stages"]] == [[0, 1], [1, 4], [4, 6]]
    assert end["engine"]["recoveries"] == after["engine"]["recoveries"] + 1 and end["stages"][2]["pid"] != pids[2]
    assert end["rebalance"]["failed"] == 1 and end["rebalance"]["applied"] == 1
    assert http(server.port, "/health", key=None)[0] == 200


@pytest.mark.slow
def test_at_a_20_ms_heartbeat_idle_rebalances_are_not_failures_and_an_idle_kill_is_noticed_without_a_request(server):
    splits = ([2, 2, 2], [1, 3, 2])  # stage 2 keeps its layers: testing.rebalance_crash_stage stays out of it
    before = stats(server)
    current = [end - start for start, end in (s["layers"] for s in before["stages"])]
    first = 1 if current == splits[0] else 0
    for i in range(12):
        status, record, _ = http(server.port, "/v1/admin/rebalance", {"layers": splits[(first + i) % 2]}, timeout=120)
        assert status == 200 and record["outcome"] == "applied", record
    polls = stats(server)["health"]["polls"]
    time.sleep(0.5)
    idle = stats(server)
    assert idle["engine"]["recoveries"] == before["engine"]["recoveries"], idle["engine"]  # no spurious recovery
    assert idle["health"]["polls"] > polls and idle["health"]["poll_errors"] == 0, idle["health"]  # the poller lives on
    assert [s["state"] for s in idle["stages"]] == ["ready"] * 3

    pids = [s["pid"] for s in idle["stages"]]
    os.kill(pids[1], signal.SIGKILL)  # nothing in flight, no request coming: only the heartbeat can notice
    killed = time.monotonic()
    deadline = killed + 60  # a liveness bound, not a timing target
    while True:
        now = stats(server)
        if (
            now["engine"]["recoveries"] > idle["engine"]["recoveries"]
            and now["ready"]
            and [s["state"] for s in now["stages"]] == ["ready"] * 3
        ):
            break
        assert time.monotonic() < deadline, now["engine"]
        time.sleep(0.05)
    whole = time.monotonic() - killed
    assert now["engine"]["recoveries"] == idle["engine"]["recoveries"] + 1 and now["stages"][1]["pid"] != pids[1]
    assert now["health"]["poll_errors"] == 0 and http(server.port, "/health", key=None)[0] == 200
    print(
        f"12 rebalances at a 20 ms heartbeat, then an idle stage killed: whole again after {whole:.2f} s "
        f"(the recovery itself {now['engine']['recovery_seconds'][-1]:.2f} s), without any request"
    )
