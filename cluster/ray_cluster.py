"""The Ray cluster as stages need it: joining one, where the coordinator is reachable, whether it has room for the
stages, their placement bundles, and whether a node is reachable now."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

import ray

from stagecoach.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # a raylet that does not accept a connection within this is taken as unreachable
CLIENT_ATTEMPTS = 3  # Ray client connections (ray://) tried
STRATEGIES = {"strict_spread": "STRICT_SPREAD", "spread": "SPREAD", "pack": "PACK"}


def connect_ray(address: str | None = None, num_cpus: int | None = None, host: str | None = None) -> None:
    """Joins a Ray cluster: None (the one in RAY_ADDRESS or running here, else a new local one), 'local', 'auto' or an address."""
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address is None:
        try:  # an existing cluster: a Ray job's own, or one started with `ray start` on this machine
            ray.init(address="auto", **quiet)
            return
        except ConnectionError:
            address = "local"
    try:
        if address == "local":
            kwargs = {"address": "local", "include_dashboard": False, "num_cpus": num_cpus}
            if host:
                kwargs["_node_ip_address"] = host
                if host.startswith("127.") or host == "localhost":
                    # Without this Ray's servers listen on every interface even for a loopback node
                    # address; with it they bind the address given (checked with `ss -tlnp`).
                    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(**kwargs, **quiet)
        else:
            _init_remote(address, quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot connect to Ray at {address!r}: {e}") from None


def _init_remote(address: str, kwargs: dict) -> None:
    """ray.init of an address; a Ray client (ray://) tries again when the head's per-client server failed
    to start (it is forked while the proxy's gRPC threads run, and now and then dies at once)."""
    for attempt in range(CLIENT_ATTEMPTS):
        try:
            ray.init(address=address, **kwargs)
            return
        except (ConnectionError, RuntimeError) as e:
            if (
                not address.startswith("ray://")
                or "Initialization failure from server" not in str(e)
                or attempt == CLIENT_ATTEMPTS - 1
            ):
                raise
            log.warning("Ray client connection failed (%s); trying again", str(e).splitlines()[-1][:200])
            ray.shutdown()  # the half-made client connection


def coordinator_host(ray_address: str | None) -> str:
    """The address this coordinator's stages can reach it at: its Ray node's or, joined as a Ray client
    (ray://host:port, no Ray node here), the local address of the route to the Ray head."""
    if not (ray_address or "").startswith("ray://"):
        return ray.util.get_node_ip_address()
    head = urlsplit(ray_address).hostname
    family = socket.AF_INET6 if ":" in head else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((head, 9))  # a UDP connect picks the route and sends nothing
        return probe.getsockname()[0]


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def resolve_strategy(placement: str, gpus_per_stage: float) -> str:
    if placement == "auto":
        # One GPU node per stage when stages need GPUs; a CPU dev box packs them together.
        return "STRICT_SPREAD" if gpus_per_stage >= 1 else "PACK"
    return STRATEGIES[placement]


def placement_bundle(cpus: float, gpus: float) -> dict[str, float]:
    bundle = {"CPU": cpus}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


def check_resources(num_stages: int, cpus: float, gpus: float, strategy: str) -> None:
    """Fails fast, with the numbers, when the cluster cannot hold the stages at all."""
    total_gpus = cluster_gpus()
    if gpus * num_stages > total_gpus:
        raise ConfigError(
            f"{num_stages} stages with {gpus:g} GPU each need {gpus * num_stages:g} GPUs, but the Ray cluster has "
            f"{total_gpus:g}; use at most {int(total_gpus // gpus) if gpus else 0} stages or add GPU nodes"
        )
    if strategy == "STRICT_SPREAD":
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        fit = [n for n in nodes if n["Resources"].get("GPU", 0) >= gpus and n["Resources"].get("CPU", 0) >= cpus]
        if len(fit) < num_stages:
            raise ConfigError(
                f"STRICT_SPREAD puts each of {num_stages} stages on its own node, but only {len(fit)} of the "
                f"cluster's {len(nodes)} nodes have {gpus:g} GPU and {cpus:g} CPU free; "
                f"use fewer stages or --placement spread/pack"
            )


def reachable(node: dict | None) -> bool:
    """Whether Ray counts the node alive and its raylet's port accepts a connection now (a cut link does not)."""
    if not node or not node.get("Alive"):
        return False
    try:
        socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False
