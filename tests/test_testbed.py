"""Many hosts on one machine (`stagecoach testbed`): distinct addresses, mutual TLS, silent link cuts, spare nodes, a slow link.

One testbed of 3 nodes and a spare, one `stagecoach serve` on it (3 stages, TLS), and the
scenarios in order: the sockets, a shaped link, a 10 s cut, a cut for good (the stage moves), and
a cut with nowhere to move. Each scenario prints what it measured (run with -rP to see it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import http, make_hf_checkpoint
from test_link_security import make_ca_and_certs
from test_recovery import stream_text
from test_serve import Server

BIN = Path(sys.executable).parent
NEW_TOKENS = 120
PROMPTS = [[(7 * i + j) % 390 + 3 for j in range(4 + i)] for i in range(8)]
RECOVERY_TIMEOUT_S = 15.0


def _namespaces_work() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the testbed needs root on Linux"
    if not (shutil.which("ip") and shutil.which("tc") and shutil.which("ss")):
        return "the testbed needs iproute2 (ip, tc, ss)"
    probe = subprocess.run(["ip", "netns", "add", "sctb-probe"], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", "sctb-probe"], capture_output=True)
    return None if probe.returncode == 0 else f"network namespaces are unavailable here: {probe.stderr.strip()}"


pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_namespaces_work()), reason=_namespaces_work() or "")]


def run_testbed(*args: str, timeout: float = 180) -> dict:
    done = subprocess.run([str(BIN / "stagecoach"), "testbed", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout) if done.stdout.strip() else {}


def leftovers() -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = re.findall(
        r"^\d+: (sctb-[^:@]+)", subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout, re.M
    )
    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and "stagecoach-testbed" in _cmdline(p)]
    return [n for n in names if n.startswith("sctb-")] + links + [f"pid {p.name}" for p in procs]


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _netns(proc: Path) -> str:
    try:
        return os.readlink(proc / "ns" / "net")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def bed():
    try:
        # Ray declares a silent node dead after 20 s: our own heartbeat notices first, so that a stage moves
        # off a node Ray still counts alive (a new group on the spare) and a 10 s cut heals without a restart.
        yield run_testbed("up", "--nodes", "3", "--spare", "1", "--node-death-s", "20")
    finally:
        run_testbed("down")
        run_testbed("down")  # safe twice
        assert leftovers() == []


@pytest.fixture(scope="module")
def server(bed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("testbed")
    make_hf_checkpoint(tmp / "model", num_hidden_layers=3, max_position_embeddings=2048)
    # The certificate names the testbed's addresses only: a link to any other address would fail its check.
    tls = make_ca_and_certs(tmp, [bed["coordinator_address"]] + [n["address"] for n in bed["nodes"]])
    config = tmp / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp / "model")},
                "pipeline": {
                    "num_stages": 3,
                    "gpus_per_stage": 1,
                    "placement": "strict_spread",
                    "max_batch_tokens": 1024,
                    "recovery_timeout_s": RECOVERY_TIMEOUT_S,
                },
                "testing": {
                    "stage_delay_ms": [3.0, 3.0, 3.0]
                },  # stretches generation out, so that a cut lands mid-stream
                "cache": {"block_size": 8, "num_blocks": 512},
                "transport": tls,  # no host: each stage binds its node's address, the coordinator the one its route to the head leaves by
            }
        )
    )
    s = Server(
        ["--config", str(config), "--ray-address", bed["ray_address"]],
        tmp / "server.log",
        env=bed["env"] | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
    )  # not the session cluster's "0": the nodes are not on 127.0.0.1
    try:
        s.wait_ready(timeout=240)
        yield s
    finally:
        s.stop()


def stats(server) -> dict:
    return http(server.port, "/v1/stats", key=None)[1]


def stage_hosts(server) -> list[str]:
    return [s["address"].rsplit(":", 1)[0] for s in stats(server)["stages"]]


def node_of(bed, address: str) -> int:
    return next(n["index"] for n in bed["nodes"] if n["address"] == address)


def streams(server, fault=None, after_batches: int = 40) -> tuple[dict, dict]:
    """Eight greedy streams at once; `fault()` runs once they are all running. Returns the outputs and, with a fault,
    when it was done (`fault_at`), how long until the engine was seen recovering (`noticed_s`) and the recovery's own time."""
    progress, out = [0] * len(PROMPTS), {}
    body = {"max_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0}
    threads = [
        threading.Thread(target=stream_text, args=(server.port, body | {"prompt": p}, progress, i, out))
        for i, p in enumerate(PROMPTS)
    ]
    start = stats(server)["engine"]["microbatches"]
    for t in threads:
        t.start()
    info: dict = {}
    if fault is not None:
        deadline = time.monotonic() + 60
        while stats(server)["engine"]["microbatches"] < start + after_batches and time.monotonic() < deadline:
            time.sleep(0.05)
        recoveries = stats(server)["engine"]["recoveries"]
        fault()
        info["fault_at"] = time.monotonic()
        while any(t.is_alive() for t in threads):  # watch the engine while the streams run
            engine = stats(server)["engine"]
            if engine["recovering"] and "noticed_s" not in info:
                info["noticed_s"] = time.monotonic() - info["fault_at"]
            if engine["recoveries"] > recoveries:
                info["recovery_s"] = engine["recovery_seconds"][recoveries]
            time.sleep(0.1)
    for t in threads:
        t.join(timeout=240)
    return out, info


def texts(out: dict) -> list[str]:
    return [out[i][0] for i in range(len(PROMPTS))]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def listeners(namespace: str | None = None) -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket and bound UDP socket, IPv4 and IPv6."""
    cmd = ["ss", "-tulnpH"] if namespace is None else ["ip", "netns", "exec", namespace, "ss", "-tulnpH"]
    rows = []
    for line in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines():
        fields = line.split()
        rows.append((fields[4].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:"), " ".join(fields[6:])))
    return rows


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def test_every_socket_is_on_loopback_or_a_testbed_address(bed, server):
    hosts = stage_hosts(server)
    assert len(set(hosts)) == 3 and set(hosts) <= {n["address"] for n in bed["nodes"]}, hosts
    # The machine's own namespace: the server listens on 127.0.0.1 (HTTP) and the bridge address (gRPC), nothing of Ray at all.
    ours = descendants(server.proc.pid)
    own = [
        (addr, proc)
        for addr, proc in listeners()
        if any(f"pid={p}," in proc for p in ours) or re.search(r"raylet|gcs_server|ray::", proc)
    ]
    assert own and all(addr in ("127.0.0.1", "::1", bed["coordinator_address"]) for addr, _ in own), own
    # (Ray processes here belong to the test session's own cluster on 127.0.0.1.) The testbed's all live in its namespaces.
    here = os.readlink("/proc/self/ns/net")
    testbed_procs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and "stagecoach-testbed/ray" in _cmdline(p)]
    assert testbed_procs and all(_netns(p) not in ("", here) for p in testbed_procs)
    # Each testbed namespace holds loopback and its own address only, so even a wildcard listener there covers nothing else.
    for node in bed["nodes"]:
        addrs = set(
            re.findall(
                r"inet6? ([0-9a-f.:]+)/",
                subprocess.run(["ip", "-n", node["namespace"], "addr"], capture_output=True, text=True).stdout,
            )
        )
        assert addrs == {"127.0.0.1", node["address"]}, (node, addrs)
        for addr, proc in listeners(node["namespace"]):
            assert addr in ("127.0.0.1", "::1", node["address"], "*", "0.0.0.0", "::"), (node["namespace"], addr, proc)


def test_a_slow_link_out_of_stage_0_shows_in_its_hop_only(bed, server):
    """Runs first of the traffic: /v1/stats' windows hold only these prefills (one microbatch each, max_tokens 1)."""
    sent = [0]

    def prefills(n: int) -> None:
        for _ in range(n):
            # each prompt its own first token: no prefix to share, every prefill sends all 1000 tokens' states
            sent[0] += 1
            prompt = [sent[0] % 390 + 3] + [(13 * j) % 390 + 3 for j in range(999)]
            status, body, _ = http(
                server.port,
                "/v1/completions",
                {"prompt": prompt, "max_tokens": 1, "temperature": 0},
                key=None,
                timeout=120,
            )
            assert status == 200, body

    def hops() -> list[float]:
        s = stats(server)
        return [
            s["stages"][0]["hop_ms"]["p50"],
            s["stages"][1]["hop_ms"]["p50"],
            s["latency"]["coordinator_hop_ms"]["p50"],
        ]

    prefills(8)  # medians of 8: a slow first request or two do not move them
    before = hops()
    node = node_of(bed, stage_hosts(server)[0])
    # 1000 tokens x hidden 64 x float32 = 256 kB: at 4 Mbit/s about 0.5 s, against a few ms unshaped.
    run_testbed("limit", str(node), "4mbit")
    try:
        prefills(16)  # twice as many as before: the windows' medians are the shaped ones
        after = hops()
    finally:
        run_testbed("limit", str(node), "off")
    print(
        f"hop p50 ms before/after limiting stage 0's egress to 4mbit: stage 0 {before[0]}/{after[0]}, stage 1 {before[1]}/{after[1]}, "
        f"coordinator {before[2]}/{after[2]}"
    )
    # 256 kB through a 4 Mbit/s link take about 0.5 s whatever the machine: a generous one-sided bound from the bytes and
    # the rate (half of it). The other hops do not pass that link: each stays below a quarter of it.
    assert after[0] >= 250, (before, after)
    assert all(a < after[0] / 4 for a in after[1:]), (before, after)


@pytest.fixture(scope="module")
def reference(server):
    out, _ = streams(server)
    assert all(out[i][1][-1] == "[DONE]" for i in out)
    return texts(out)


def test_a_10_s_cut_of_stage_1s_node_loses_no_stream(bed, server, reference):
    host = stage_hosts(server)[1]
    node, pid = node_of(bed, host), stats(server)["stages"][1]["pid"]
    out, timing = streams(server, lambda: run_testbed("cut", str(node), "--for", "10"))
    assert texts(out) == reference
    print(
        f"10 s cut of stage 1's node {host}: noticed after {timing['noticed_s']:.1f} s, recovered in {timing['recovery_s']:.1f} s, "
        f"stage 1 now on {stage_hosts(server)[1]}"
    )
    # Healed: the node is a Ray node again, and the stage process cut off with it is gone, not wired back in.
    deadline = time.monotonic() + 30
    while not run_testbed("status")["nodes"][node]["ray_alive"] or pid_alive(pid):
        assert time.monotonic() < deadline, "the healed node did not rejoin Ray, or its old stage process lives on"
        time.sleep(0.5)
    assert stats(server)["stages"][1]["pid"] != pid


def test_a_node_cut_for_good_moves_its_stage_and_the_old_one_is_fenced_off(bed, server, reference):
    hosts = stage_hosts(server)
    node, pid = node_of(bed, hosts[1]), stats(server)["stages"][1]["pid"]
    out, timing = streams(server, lambda: run_testbed("cut", str(node)))
    assert texts(out) == reference
    moved = stage_hosts(server)
    print(
        f"stage 1's node {hosts[1]} cut for good: noticed after {timing['noticed_s']:.1f} s, recovered in {timing['recovery_s']:.1f} s "
        f"onto {moved[1]}"
    )
    assert moved[1] != hosts[1] and moved[0] == hosts[0] and moved[2] == hosts[2]
    run_testbed("heal", str(node))
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the old stage process outlived its node's return"
        time.sleep(0.5)
    assert stage_hosts(server) == moved
    out, _ = streams(server)
    assert texts(out) == reference


def test_with_no_node_to_move_to_requests_end_in_time_and_serving_resumes_after_the_heal(bed, server, reference):
    hosts = stage_hosts(server)
    free = [n["index"] for n in bed["nodes"] if n["address"] not in hosts]
    node = node_of(bed, hosts[1])
    for f in free:  # the only other node is unreachable too: nowhere to move
        run_testbed("cut", str(f))
    try:
        out, timing = streams(server, lambda: run_testbed("cut", str(node)))
        ended, cut_at = time.monotonic(), timing["fault_at"]
        for i in out:
            assert out[i][1][-1] == "[DONE]" and any('"error"' in e for e in out[i][1]), out[i][1][-3:]
        assert ended - cut_at < RECOVERY_TIMEOUT_S + 15, ended - cut_at
        status, body, headers = http(server.port, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4}, key=None)
        assert status == 503 and "Retry-After" in headers, (status, body, headers)
        print(
            f"stage 1's node cut with no spare: open streams ended {ended - cut_at:.1f} s after the cut (recovery_timeout_s "
            f"{RECOVERY_TIMEOUT_S:g}); new requests got 503 with Retry-After {headers['Retry-After']}"
        )
    finally:
        healed_at = time.monotonic()
        for n in [node, *free]:
            run_testbed("heal", str(n))
    deadline = time.monotonic() + 90
    while http(server.port, "/health", key=None)[0] != 200:
        assert time.monotonic() < deadline, "the server did not serve again after the heal"
        time.sleep(0.5)
    print(f"serving again {time.monotonic() - healed_at:.1f} s after the heal began")
    out, _ = streams(server)
    assert texts(out) == reference
