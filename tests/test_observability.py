"""Seeing the pipeline: /v1/stats against the stages' own totals, a slowed stage, Prometheus names, `stagecoach top` in tmux."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import http, make_hf_checkpoint
from test_serve import LINK_TOKEN, Server

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
DELAY_MS = 40.0  # stage 1 only; the tiny model's own compute is about a millisecond


@pytest.fixture(scope="module")
def loaded_server(ray_cluster, tmp_path_factory):
    """A 3-stage server whose middle stage is slowed on purpose, with requests flowing through it."""
    tmp = tmp_path_factory.mktemp("observe")
    make_hf_checkpoint(tmp / "model", num_hidden_layers=3, max_position_embeddings=512)
    config = tmp / "slow.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp / "model")},
                "pipeline": {"num_stages": 3, "gpus_per_stage": 0, "placement": "pack"},
                "testing": {"stage_delay_ms": [0.0, DELAY_MS, 0.0]},
                "cache": {"block_size": 8, "num_blocks": 256},
                "transport": {
                    "host": "127.0.0.1",
                    "token_env": "STAGECOACH_TEST_LINK_TOKEN",
                },  # so the test can ask the stages itself
            }
        )
    )
    server = Server(["--config", str(config), "--ray-address", ray_cluster.address], tmp / "server.log")
    server.wait_ready()
    stop = threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            http(
                server.port,
                "/v1/completions",
                {"prompt": [3 + i % 300, 4, 5], "max_tokens": 8, "temperature": 0, "ignore_eos": True},
                key=None,
            )
            i += 1

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = http(server.port, "/v1/stats", key=None)[1]
        if all(s["microbatches"] >= 20 for s in stats["stages"]) and stats["throughput"]["output_tokens_per_s"] > 0:
            break
        time.sleep(0.5)
    server.stop_load = lambda: (stop.set(), [w.join(timeout=60) for w in workers])
    yield server
    stop.set()
    server.stop()


LATENCY = {"p50": float, "p95": float, "p99": float, "mean": float}
SCHEMA = {
    "model": str,
    "ready": bool,
    "draining": bool,
    "uptime_s": float,
    "active_requests": int,
    "throughput": {"input_tokens_per_s": float, "output_tokens_per_s": float, "requests_per_s": float},
    "latency": {"ttft_ms": LATENCY, "itl_ms": LATENCY, "coordinator_hop_ms": LATENCY},
    "pipeline_utilisation": float,
    "engine": {
        "running": int,
        "waiting": int,
        "kv_blocks_used": int,
        "kv_blocks_total": int,
        "block_size": int,
        "inflight": int,
        "peak_inflight": int,
        "max_inflight": int,
        "microbatches": int,
        "preemptions": int,
        "recoveries": int,
        "recovery_seconds": list,
        "recovering": bool,
        "rebalancing": bool,
        "microbatch_failures": int,
        "isolating": int,
        "prefix_cache": {
            "enabled": bool,
            "cached_blocks": int,
            "prompt_tokens": int,
            "cached_tokens": int,
            "hit_rate": float,
        },
        "requests_failed": {"stage_error": int},
        "speculative": {
            "method": str,
            "verify_passes": int,
            "draft_tokens": int,
            "accepted_tokens": int,
            "acceptance_rate": float,
            "tokens_per_pass": float,
            "declined_by_cost": int,
        },
    },
    "rebalance": (dict, type(None)),
    "health": {"polls": int, "poll_errors": int, "last_poll_at": float, "last_poll_age_s": float},
}
STAGE = {
    "index": int,
    "state": str,
    "layers": list,
    "node_id": str,
    "address": str,
    "pid": int,
    "device": str,
    "weight_bytes": int,
    "weight_formats": dict,  # weight_bytes by format: float32 here
    "memory_used_bytes": int,
    "memory_total_bytes": int,
    "kv_blocks_total": int,
    "kv_blocks_used": int,
    "microbatches": int,
    "microbatches_per_s": float,
    "utilisation": float,
    "compute_seconds_total": float,
    "compute_ms": LATENCY,
    "queue_ms": LATENCY,
    "hop_ms": LATENCY,
    "errors": int,
}


def check_schema(doc, schema, where="stats"):
    assert set(doc) == set(schema), f"{where}: keys {sorted(doc)} != {sorted(schema)}"
    for key, kind in schema.items():
        value = doc[key]
        if isinstance(kind, dict):
            check_schema(value, kind, f"{where}.{key}")
        elif kind is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}.{key}={value!r}"
        else:
            assert isinstance(value, kind), f"{where}.{key}={value!r}"


def test_stats_schema_and_compute_totals_agree_with_the_stages(loaded_server):
    from stagecoach.proto import stagecoach_pb2 as pb
    from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc

    loaded_server.stop_load()
    time.sleep(0.5)
    stats = http(loaded_server.port, "/v1/stats", key=None)[1]
    check_schema({k: v for k, v in stats.items() if k != "stages"}, SCHEMA)
    assert [s["index"] for s in stats["stages"]] == [0, 1, 2]
    for s in stats["stages"]:
        check_schema(s, STAGE, f"stages[{s['index']}]")
        assert s["state"] == "ready" and s["weight_formats"] == {"float32": s["weight_bytes"]}
        with grpc.insecure_channel(s["address"]) as ch:
            own = pb_grpc.StageStub(ch).Health(
                pb.HealthRequest(), timeout=10, metadata=(("x-stagecoach-token", LINK_TOKEN),)
            )
        assert own.batches_done == s["microbatches"]
        ratio = s["compute_seconds_total"] / (own.compute_ns_total / 1e9)
        assert 0.9 <= ratio <= 1.1, (
            f"stage {s['index']}: /v1/stats says {s['compute_seconds_total']:.4f} s, the stage {own.compute_ns_total / 1e9:.4f} s"
        )


def test_slowed_stage_shows_in_its_own_compute_only(loaded_server):
    stages = http(loaded_server.port, "/v1/stats", key=None)[1]["stages"]
    p50 = [s["compute_ms"]["p50"] for s in stages]
    assert p50[1] >= DELAY_MS and p50[1] > max(p50[0], p50[2]), p50  # the delay is a floor; the order is what shows
    frame = subprocess.run(
        [str(BIN / "stagecoach"), "top", "--once", "--url", f"http://127.0.0.1:{loaded_server.port}"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    rows = stage_rows(frame.stdout)
    assert (
        rows[1]["compute p50"] >= DELAY_MS
        and rows[0]["compute p50"] < DELAY_MS / 2
        and rows[2]["compute p50"] < DELAY_MS / 2
    )


def test_prometheus_metrics_follow_the_conventions(loaded_server):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{loaded_server.port}/metrics") as resp:
        families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    assert families and all(name.startswith("stagecoach_") for name in families)
    for name, family in families.items():
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    stages = {s.labels["stage"] for s in families["stagecoach_stage_compute_seconds"].samples if "stage" in s.labels}
    assert stages == {"0", "1", "2"}
    senders = {s.labels["sender"] for s in families["stagecoach_hop_seconds"].samples if "sender" in s.labels}
    assert {"coordinator", "0", "1"} <= senders
    assert {s.labels["stage"]: s.value for s in families["stagecoach_stage_up"].samples} == {
        "0": 1.0,
        "1": 1.0,
        "2": 1.0,
    }


ROW = re.compile(r"^[│|]\s*(\d+)\s*[│|](.*)$")
COLUMNS = [
    "node",
    "device",
    "layers",
    "weights GB",
    "KV use",
    "compute p50",
    "compute p99",
    "queue p50",
    "hop p50",
    "hop p99",
    "mb/s",
    "errors",
    "state",
]


def stage_rows(screen: str) -> dict[int, dict]:
    rows = {}
    for line in screen.splitlines():
        m = ROW.match(line.strip())
        if m:
            cells = [c.strip() for c in re.split(r"[│|]", m.group(2)) if c.strip()]
            row = dict(zip(COLUMNS, cells, strict=False))
            for key in ("compute p50", "compute p99", "queue p50", "hop p50", "hop p99"):
                row[key] = float(row[key])
            rows[int(m.group(1))] = row
    return rows


@pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed (make test installs it where apt-get can)"
)
def test_top_in_tmux_shows_every_stage_under_load(loaded_server):
    socket = f"sc-test-{loaded_server.port}"
    tmux = ["tmux", "-L", socket]
    stop_load = threading.Event()

    def load():
        while not stop_load.is_set():
            http(
                loaded_server.port,
                "/v1/completions",
                {"prompt": [7, 8, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True},
                key=None,
            )

    t = threading.Thread(target=load, daemon=True)
    t.start()
    cmd = f"env -u COLUMNS -u LINES {BIN / 'stagecoach'} top --url http://127.0.0.1:{loaded_server.port} --interval 0.5"
    subprocess.run(
        [*tmux, "-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "200", "-y", "40", cmd], check=True
    )
    subprocess.run([*tmux, "resize-window", "-t", "top", "-x", "200", "-y", "40"], capture_output=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True).stdout
            rows = stage_rows(screen)
            out = re.search(r"out ([0-9.]+) tok/s", screen)
            if (
                len(rows) == 3
                and out
                and float(out.group(1)) > 0
                and "rebalance (suggest): layers" in screen
                and "measuring" not in screen
            ) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sorted(rows) == [0, 1, 2], screen
        assert all(r["compute p50"] > 0 and r["state"] == "ready" for r in rows.values()), screen
        assert float(out.group(1)) > 0, screen
        assert rows[1]["compute p50"] >= DELAY_MS and rows[1]["compute p50"] > rows[0]["compute p50"], screen
        # stage 1's delay is fixed work, not its layers': the measured split is balanced
        assert re.search(
            r"rebalance \(suggest\): layers \S+ are balanced for the measured speeds · microbatches failed 0", screen
        ), screen
        assert re.search(r"prefix hits \d+ % \(\d+ blocks\)", screen), screen
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
        deadline = time.monotonic() + 10
        while (
            subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True).returncode == 0
            and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        assert subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True).returncode != 0, (
            "q did not quit"
        )
    finally:
        stop_load.set()
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        t.join(timeout=30)


def test_top_says_when_the_server_is_unreachable():
    frame = subprocess.run(
        [str(BIN / "stagecoach"), "top", "--once", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert frame.returncode == 1 and "cannot reach http://127.0.0.1:9" in frame.stdout
