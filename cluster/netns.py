"""Linux network namespaces, veth links and queueing disciplines, as the testbed (cluster/testbed.py) uses them: every
name it makes starts with PREFIX, so that what a killed run left can be found and removed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from stagecoach.errors import ConfigError

PREFIX = "sctb"


class TestbedError(ConfigError):
    """The testbed cannot be made or changed here (not root, not Linux, no `ip`, no such node)."""

    __test__ = False


def require_root() -> None:
    if sys.platform != "linux":
        raise TestbedError(f"the testbed needs Linux network namespaces; this is {sys.platform}")
    if os.geteuid() != 0:
        raise TestbedError("the testbed makes network namespaces and links: run it as root")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise TestbedError("the testbed needs iproute2's `ip` and `tc` (apt-get install iproute2)")


def run_cmd(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise TestbedError(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def veth(index: int | str) -> str:
    return f"{PREFIX}-v{index}"  # the machine's end; the namespace's end is its eth0


def namespaces() -> list[str]:
    names = [
        line.split()[0] for line in run_cmd("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()
    ]
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def kill_namespace_processes(namespace: str) -> None:
    """Every process whose network namespace is this one (Ray daemonises its own: they stay inside)."""
    for _ in range(50):
        pids = [int(p) for p in run_cmd("ip", "netns", "pids", namespace, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def no_ipv6(link: str) -> None:
    Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1")
