"""Session fixtures: one torch thread for parity, random checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import (  # noqa: F401
    GOLDEN_DIR,
    QWEN_DIR,
    SHARED,
    free_port,
    make_gguf_checkpoint,
    make_hf_checkpoint,
    make_packed_checkpoint,
    require_shared,
)

# Parity needs the same kernels on both sides: one thread, so reductions run in one order.
torch.set_num_threads(1)
# The same for every stage the tests start (their plans take the coordinator's OMP_NUM_THREADS: pipeline.cpu_threads).
os.environ["OMP_NUM_THREADS"] = "1"


def pytest_addoption(parser):
    parser.addoption(
        "--compile",
        choices=("auto", "on", "off"),
        default=None,
        help="pipeline.compile for the Ray pipelines and `stagecoach serve` servers the tests start (e.g. the exactness, "
        "chaos and recovery tests compiled)",
    )
    parser.addoption(
        "--compile-batch-sizes", default=None, help="with --compile: pipeline.compile_batch_sizes, e.g. 1,4,8"
    )


def pytest_configure(config):
    import os

    # Read by test_serve.Server and test_ray_pipeline.make_config.
    if config.getoption("--compile"):
        os.environ["STAGECOACH_TEST_COMPILE"] = config.getoption("--compile")
    if config.getoption("compile_batch_sizes"):
        os.environ["STAGECOACH_TEST_COMPILE_BATCH_SIZES"] = config.getoption("compile_batch_sizes")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (key, **config) → (folder, HF model); each distinct key is built once per session. A key starting with
    "gguf" gives a GGUF file in every served type (helpers.make_gguf_checkpoint) and HF on its dequantized values;
    "gptq…" and "awq…" a packed checkpoint (helpers.make_packed_checkpoint, its `packing` argument)."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(key: str, **kwargs):
        if key not in cache:
            path = tmp_path_factory.mktemp(key)
            if key.startswith(("gptq", "awq")):  # a GPTQ or AWQ checkpoint, HF on its dequantized values
                cache[key] = path, make_packed_checkpoint(path, key.split("_")[0], **kwargs)
                return cache[key]
            make = make_gguf_checkpoint if key.startswith("gguf") else lambda p, **kw: (p, make_hf_checkpoint(p, **kw))
            cache[key] = make(path, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ray_cluster():
    """One multi-node Ray cluster for the whole session, every node on 127.0.0.1 with one logical GPU.

    Started on first use (about 15 s), shut down at the end; nothing else is stopped.
    """
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # seen to make Ray honour 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1", object_store_memory=80 * 2**20)
    # Free ports instead of Ray's fixed defaults, so a Ray already running here (or a second test run) does not clash.
    head = node | {
        "dashboard_host": "127.0.0.1",
        "include_dashboard": True,
        "dashboard_port": free_port(),
        "ray_client_server_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):
        cluster.add_node(**node, dashboard_agent_listen_port=free_port())
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_head_cluster(tmp_path_factory):
    """A real `ray start --head` for the job-API tests (`ray job submit`, `stagecoach submit`): (address, env)."""
    from helpers import ray_head

    with ray_head(tmp_path_factory.mktemp("ray_head")) as head:
        yield head
