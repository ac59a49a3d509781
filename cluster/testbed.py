"""Many hosts on one Linux machine: network namespaces on a bridge, a Ray node in each, silent link cuts and shaping.

A developer tool (root only). Everything it makes is named `sctb-...`, so that `down` (and every
`up`, first) removes what a killed earlier run left: the namespaces with every process inside
them, their veth links, the bridge. The machine's own namespace gets one address, the bridge's
(`coordinator_address`), where `stagecoach serve` reaches the nodes; nothing the testbed starts
listens there: the Ray head sits in a namespace of its own and drivers join it as Ray clients.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stagecoach.cluster.netns import (
    PREFIX,
    TestbedError,
    kill_namespace_processes,
    namespaces,
    no_ipv6,
    require_root,
    run_cmd,
    veth,
)

BRIDGE = f"{PREFIX}-br"
HEAD_NS = f"{PREFIX}-head"
STATE_DIR = Path("/tmp/stagecoach-testbed")  # short: Ray's socket paths live under it
GCS_PORT = 6379
CLIENT_PORT = 10001
FIRST_NODE_HOST = 10  # node i gets <subnet>.(10 + i); .1 is the bridge (the machine's side), .2 the head
# Ray's node-death detection on the testbed: the GCS pings each raylet every second and declares a node
# dead after `--node-death-s` misses (default 5; Ray's own defaults take 15 s or more).
NODE_DEATH_S = 5
UP_TIMEOUT_S = 120.0
BIN_DIR = Path(sys.executable).parent  # this venv's `ray`, also on the PATH of Ray's workers


@dataclass(slots=True)
class Node:
    index: int
    namespace: str
    address: str
    spare: bool
    cut: bool = False
    limit: str | None = None  # tbf rate on the node's egress, e.g. "20mbit"


@dataclass(slots=True)
class Testbed:
    subnet: str  # the /24, e.g. 10.213.7.0/24
    bridge_address: str
    head_address: str
    nodes: list[Node] = field(default_factory=list)
    node_death_s: int = NODE_DEATH_S
    heal_timers: dict[str, int] = field(default_factory=dict)  # node index → pid of a `heal --after` waiting

    @property
    def ray_address(self) -> str:
        return f"ray://{self.head_address}:{CLIENT_PORT}"

    @property
    def env(self) -> dict[str, str]:
        """What a Ray client of the testbed (`stagecoach serve --ray-address ...`) needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(STATE_DIR / "auth_token")}

    def summary(self) -> dict:
        alive = _alive_addresses(self)
        return {
            "ray_address": self.ray_address,
            "coordinator_address": self.bridge_address,
            "env": self.env,
            "nodes": [asdict(n) | {"ray_alive": n.address in alive} for n in self.nodes],
        }

    def node(self, index: int) -> Node:
        if not 0 <= index < len(self.nodes):
            raise TestbedError(f"node {index}: the testbed has nodes 0-{len(self.nodes) - 1}")
        return self.nodes[index]

    def save(self) -> None:
        (STATE_DIR / "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls) -> Testbed:
        try:
            data = json.loads((STATE_DIR / "state.json").read_text())
        except FileNotFoundError:
            raise TestbedError("no testbed is up: run `stagecoach testbed up --nodes N` first") from None
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(**data)


# -- plumbing -------------------------------------------------------------------------------------
def _ray_env(bed: Testbed) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # "0" (set for single-machine clusters on 127.0.0.1) makes `ray start` refuse to join nodes together.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    health = {
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": str(bed.node_death_s),
    }
    return env | health | bed.env | {"PATH": f"{BIN_DIR}:{env.get('PATH', '')}"}


def _ray_start(bed: Testbed, namespace: str, args: list[str]) -> None:
    cmd = ["ip", "netns", "exec", namespace, str(BIN_DIR / "ray"), "start", "--disable-usage-stats", *args]
    # Ray's daemons inherit these: a log file and no stdin, never a pipe of this short-lived command.
    log = STATE_DIR / f"ray-start-{namespace}.log"
    with open(log, "w") as out:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_ray_env(bed),
            cwd="/",
            timeout=UP_TIMEOUT_S,
            start_new_session=True,
        )
    if done.returncode != 0:
        raise TestbedError(f"`ray start` in {namespace} failed: {log.read_text()[-2000:]}")


def _start_worker(bed: Testbed, node: Node) -> None:
    _ray_start(
        bed,
        node.namespace,
        [
            f"--address={bed.head_address}:{GCS_PORT}",
            f"--node-ip-address={node.address}",
            "--num-cpus=1",
            "--num-gpus=1",
            "--object-store-memory=80000000",
        ],
    )


def _gcs_nodes(bed: Testbed) -> list:
    os.environ.update(bed.env)  # before Ray is imported: it reads its token once
    from ray._raylet import GcsClient

    return list(GcsClient(address=f"{bed.head_address}:{GCS_PORT}").get_all_node_info(timeout=5).values())


def _alive_addresses(bed: Testbed) -> set[str]:
    try:
        return {n.node_manager_address for n in _gcs_nodes(bed) if n.state == 0}  # 0: ALIVE
    except Exception:  # the head is gone or unreachable: no node counts as alive
        return set()


def _wait_alive(bed: Testbed, addresses: set[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not addresses <= (alive := _alive_addresses(bed)):
        if time.monotonic() > deadline:
            raise TestbedError(f"Ray nodes {sorted(addresses - alive)} did not join within {timeout:g} s")
        time.sleep(0.3)


def _shape(node: Node) -> None:
    """The node's egress qdisc from its state: blackhole while cut, tbf while limited, else the default."""
    ns_side = ("ip", "netns", "exec", node.namespace, "tc", "qdisc")
    if node.cut:
        # Both ends: what the node sends and what is sent to it vanish, with no reset and no error.
        run_cmd(*ns_side, "replace", "dev", "eth0", "root", "blackhole")
        run_cmd("tc", "qdisc", "replace", "dev", veth(node.index), "root", "blackhole")
        return
    run_cmd("tc", "qdisc", "del", "dev", veth(node.index), "root", check=False)
    if node.limit:
        run_cmd(*ns_side, "replace", "dev", "eth0", "root", "tbf", "rate", node.limit, "burst", "32kb", "latency", "1s")
    else:
        run_cmd(*ns_side, "del", "dev", "eth0", "root", check=False)


# -- commands -------------------------------------------------------------------------------------
def up(
    nodes: int,
    spare: int = 0,
    bandwidth: str | None = None,
    subnet: str = "10.213.7.0/24",
    node_death_s: int = NODE_DEATH_S,
) -> Testbed:
    require_root()
    if nodes < 1 or spare < 0 or nodes + spare > 200:
        raise TestbedError(
            f"--nodes must be at least 1 and --spare at least 0, with at most 200 in all; got {nodes} and {spare}"
        )
    net = ipaddress.ip_network(subnet)
    if net.prefixlen != 24 or not net.is_private:
        raise TestbedError(f"--subnet must be a private /24, got {subnet}")
    if node_death_s < 1:
        raise TestbedError(f"--node-death-s must be at least 1, got {node_death_s}")
    down()
    try:
        return _make(net, nodes, spare, bandwidth, node_death_s)
    except BaseException:
        down()  # nothing half-made stays behind
        raise


def _make(net, nodes: int, spare: int, bandwidth: str | None, node_death_s: int) -> Testbed:
    hosts = list(net.hosts())
    bed = Testbed(str(net), str(hosts[0]), str(hosts[1]), node_death_s)
    bed.nodes = [
        Node(i, f"{PREFIX}-{i}", str(hosts[FIRST_NODE_HOST - 1 + i]), i >= nodes, limit=bandwidth)
        for i in range(nodes + spare)
    ]
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / "auth_token").write_text(secrets.token_hex(32))
    (STATE_DIR / "auth_token").chmod(0o600)
    bed.save()
    run_cmd("ip", "link", "add", BRIDGE, "type", "bridge")
    run_cmd("ip", "addr", "add", f"{bed.bridge_address}/24", "dev", BRIDGE)
    no_ipv6(BRIDGE)
    run_cmd("ip", "link", "set", BRIDGE, "up")
    for name, link, address in [(HEAD_NS, veth("h"), bed.head_address)] + [
        (n.namespace, veth(n.index), n.address) for n in bed.nodes
    ]:
        run_cmd("ip", "netns", "add", name)
        run_cmd("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        run_cmd("ip", "link", "set", link, "master", BRIDGE, "up")
        run_cmd("ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        run_cmd("ip", "-n", name, "link", "set", "eth0", "up")
        run_cmd("ip", "-n", name, "link", "set", "lo", "up")
        # IPv4 only: no link-local IPv6 address appears that a wildcard listener would also cover.
        ipv6 = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        run_cmd("ip", "netns", "exec", name, "sysctl", "-qw", *ipv6)
        no_ipv6(link)
    for n in bed.nodes:
        _shape(n)
    # The head holds no GPU, like the chart's head pod: stages land on the nodes.
    _ray_start(
        bed,
        HEAD_NS,
        [
            "--head",
            f"--node-ip-address={bed.head_address}",
            f"--port={GCS_PORT}",
            f"--ray-client-server-port={CLIENT_PORT}",
            "--num-cpus=1",
            "--num-gpus=0",
            "--include-dashboard=false",
            f"--temp-dir={STATE_DIR / 'ray'}",
            "--object-store-memory=80000000",
        ],
    )
    for n in bed.nodes:  # one at a time: raylets started together on a small machine miss Ray's start-up deadline
        _start_worker(bed, n)
    _wait_alive(bed, {bed.head_address} | {n.address for n in bed.nodes}, UP_TIMEOUT_S)
    return bed


def cut(index: int, for_s: float | None = None) -> Testbed:
    require_root()
    bed = Testbed.load()
    node = bed.node(index)
    node.cut = True
    _shape(node)
    if for_s is not None:
        # A detached `heal --after`, so that this command returns now; `down` ends it if it is still waiting.
        timer = subprocess.Popen(
            [sys.executable, "-m", "stagecoach.coordinator.cli", "testbed", "heal", str(index), "--after", str(for_s)],
            stdout=subprocess.DEVNULL,
            stderr=open(STATE_DIR / f"heal-{index}.log", "w"),
            start_new_session=True,
        )
        bed.heal_timers[str(index)] = timer.pid
    bed.save()
    return bed


def heal(index: int, after_s: float = 0.0) -> Testbed:
    """Restores the node's link; a node Ray declared dead meanwhile gets a fresh Ray worker (its raylet exits on return)."""
    require_root()
    time.sleep(after_s)
    bed = Testbed.load()
    node = bed.node(index)
    node.cut = False
    _shape(node)
    bed.heal_timers.pop(str(index), None)
    bed.save()
    # Give the raylet a moment to hear from the GCS: alive, or told it was declared dead and exiting.
    time.sleep(1.5)
    if node.address not in _alive_addresses(bed):
        kill_namespace_processes(node.namespace)
        _start_worker(bed, node)
        _wait_alive(bed, {node.address}, UP_TIMEOUT_S)
    return bed


def limit(index: int, rate: str) -> Testbed:
    """Shapes what the node sends (tbf on its egress) to `rate` (tc's units: 20mbit, 500kbit); `off` removes it."""
    require_root()
    bed = Testbed.load()
    node = bed.node(index)
    node.limit = None if rate == "off" else rate
    _shape(node)
    bed.save()
    return bed


def down() -> None:
    """Removes every namespace (and each process inside it), link and bridge the testbed made; safe to run twice."""
    require_root()
    try:
        timers = Testbed.load().heal_timers.values()
    except (TestbedError, ValueError, TypeError):
        timers = []
    for pid in timers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for name in namespaces():
        kill_namespace_processes(name)
        run_cmd("ip", "netns", "del", name, check=False)
    links = run_cmd("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}-"):
            run_cmd("ip", "link", "del", name, check=False)
    shutil.rmtree(STATE_DIR, ignore_errors=True)
