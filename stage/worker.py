"""One stage's life: check that its plan fits, load its weights, size its KV cache, serve, stop."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from stagecoach.errors import ConfigError
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.codec import SCHEMA_VERSION
from stagecoach.proto.control import Loaded, Wiring
from stagecoach.proto.model_config import ModelConfig
from stagecoach.proto.security import LinkSecurity
from stagecoach.proto.server import start_server
from stagecoach.proto.types import LayerRange
from stagecoach.stage.compiled import compile_enabled, compiled_batch_sizes
from stagecoach.stage.kv_cache import KVCache, cpu_num_blocks
from stagecoach.stage.loader import (
    DTYPES,
    change_layers,
    checkpoint_fingerprint,
    layer_weight_bytes,
    load_stage_model,
    stage_weight_bytes,
    weight_formats,
)
from stagecoach.stage.loop import StageLoop
from stagecoach.stage.model import AttentionMetadata
from stagecoach.stage.runner import StageRunner
from stagecoach.stage.servicer import StageServicer
from stagecoach.stage.testing_knobs import StageTesting

MIB = 2**20
log = logging.getLogger(__name__)


@dataclass(slots=True)
class StagePlan:
    """Everything a stage is told by the coordinator before it loads.

    No defaults here: the fields named like a config setting come from it (cluster.backends.stage_plans).
    """

    index: int
    model_dir: str
    layer_start: int
    layer_end: int
    dtype: str  # float32 | bfloat16 | float16
    device: str  # auto | cpu | cuda
    block_size: int  # tokens per KV block
    num_blocks: int | None  # CPU: fixed count (else from max_tokens)
    max_tokens: int  # CPU: KV capacity in tokens when num_blocks is unset
    gpu_memory_fraction: float  # GPU: share of device memory for weights + activations + KV
    memory_limit_mb: int | None  # overrides the device's budget (tests, shared machines)
    max_batch_tokens: int  # the largest microbatch: sizes activation profiling and the minimal cache
    max_num_seqs: int  # sequences in one microbatch at most: caps the compiled batch sizes
    cpu_threads: int | None  # torch threads on a CPU stage; None: host_cores()
    compile: str  # auto | on | off: the decode step compiled at start (stage/compiled.py)
    compile_batch_sizes: list[int]
    host: str | None  # bind address; None: this node's address
    port: int  # 0: any free port
    max_message_mb: int
    testing: StageTesting | None  # the config's testing: knobs that apply to this stage; None in production
    link_token: str  # shared by the pipeline's stages and coordinator; "" only where no link is exposed
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    def security(self) -> LinkSecurity | None:
        if not self.link_token:
            return None
        return LinkSecurity(self.link_token, self.tls_cert, self.tls_key, self.tls_ca)


def node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def host_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return cores if quota == "max" else max(1, min(cores, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        return cores


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class StageWorker:
    """One stage in its own process (or thread): its layers, KV cache and gRPC server; a `StageControl`."""

    def __init__(self, plan: StagePlan, node_id: str = "") -> None:
        self.plan = plan
        self.node_id = node_id
        self.config = ModelConfig.from_pretrained(plan.model_dir)
        if plan.dtype not in DTYPES:
            raise ConfigError(f"dtype {plan.dtype!r}: use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[plan.dtype]
        device = plan.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"stage {plan.index}: device {device} asked for, but this node has no usable CUDA device")
        self.device = torch.device(device)
        self.model = None
        self.runner: StageRunner | None = None
        self.service: StageLoop | None = None
        self.server = None
        self.servicer: StageServicer | None = None
        self.address = ""
        self.weight_bytes = stage_weight_bytes(
            self.config, plan.layer_start, plan.layer_end, self.dtype, plan.model_dir
        )
        self.loaded_bytes = 0  # grows while load() reads the weights
        self.fingerprint = checkpoint_fingerprint(plan.model_dir)

    # -- sizing -----------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        c = self.config
        return KVCache.bytes_per_block(
            self.plan.layer_end - self.plan.layer_start,
            self.plan.block_size,
            c.num_key_value_heads,
            c.head_dim,
            self.dtype,
        )

    def memory_budget(self) -> int:
        if self.plan.memory_limit_mb is not None:
            return self.plan.memory_limit_mb * MIB
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * self.plan.gpu_memory_fraction)
        return _available_ram()

    def check_fits(self, layer_start: int | None = None, layer_end: int | None = None, min_blocks: int = 0) -> None:
        """Refuses, with the numbers, a stage whose weights and a minimal KV cache (at least min_blocks) exceed its budget;
        by default for the plan's layers, else for [layer_start, layer_end) (a rebalance's check)."""
        p, c = self.plan, self.config
        start, end = (p.layer_start, p.layer_end) if layer_start is None else (layer_start, layer_end)
        weights = stage_weight_bytes(c, start, end, self.dtype, p.model_dir)
        blocks = max(min_blocks, -(-p.max_batch_tokens // p.block_size))
        kv = blocks * KVCache.bytes_per_block(end - start, p.block_size, c.num_key_value_heads, c.head_dim, self.dtype)
        budget = self.memory_budget()
        if weights + kv > budget:
            raise ConfigError(
                f"stage {p.index} (layers [{start}, {end}), {p.dtype}) needs {weights / MIB:.1f} MiB of weights + {kv / MIB:.1f} MiB "
                f"for a KV cache of {blocks} blocks = {(weights + kv) / MIB:.1f} MiB, but its memory budget on {self.device.type} is "
                f"{budget / MIB:.1f} MiB; use more stages, a smaller dtype, or a larger budget"
            )

    def load(self) -> Loaded:
        """Checks the plan fits, loads the weights, and says how many KV blocks this stage can hold."""
        self.check_fits()
        p = self.plan
        if self.device.type == "cpu":  # stages that share a host share its cores (a GPU stage keeps Ray's setting)
            torch.set_num_threads(p.cpu_threads or host_cores())
        self.model = load_stage_model(
            p.model_dir, p.layer_start, p.layer_end, self.dtype, self.device, self.config, progress=self._loaded
        )
        return Loaded(self.weight_bytes, self.kv_capacity(), str(self.device), self.weight_formats())

    def weight_formats(self) -> dict[str, int]:
        p = self.plan
        return weight_formats(self.config, p.layer_start, p.layer_end, self.dtype, p.model_dir)

    def _loaded(self, nbytes: int) -> None:
        self.loaded_bytes += nbytes

    def load_progress(self) -> tuple[int, int]:
        return self.loaded_bytes, self.weight_bytes

    def kv_capacity(self) -> int:
        p = self.plan
        if self.device.type != "cuda":
            return cpu_num_blocks(p.num_blocks, p.max_tokens, p.block_size)
        # Measured, not guessed: run the largest microbatch once and see what weights and activations take.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        blocks = -(-p.max_batch_tokens // p.block_size)
        probe = KVCache.for_model(self.model, blocks, p.block_size, self.dtype, self.device)
        meta = AttentionMetadata.build([(0, p.max_batch_tokens, list(range(blocks)))], p.block_size, self.device)
        with torch.inference_mode():
            if self.model.is_first:
                x = torch.zeros(p.max_batch_tokens, dtype=torch.long, device=self.device)
            else:
                x = torch.zeros(p.max_batch_tokens, self.config.hidden_size, dtype=self.dtype, device=self.device)
            self.model(x, meta, probe, logits_rows=torch.tensor([p.max_batch_tokens - 1], device=self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - blocks * self.bytes_per_block
        del probe
        torch.cuda.empty_cache()
        free = self.memory_budget() - peak
        return max(0, free // self.bytes_per_block)

    # -- serving ----------------------------------------------------------------------------
    def start(self, num_blocks: int) -> str:
        """Allocates the KV cache and starts the gRPC server; returns host:port."""
        p = self.plan
        self.runner = self._new_runner(num_blocks)
        security = p.security()
        self.service = StageLoop(self.runner, p.index, p.max_message_bytes, security=security, testing=p.testing)
        host = p.host or node_address()
        self.servicer = StageServicer(self.service, self.info_message(num_blocks))
        self.server, self.address = start_server(self.servicer, host, p.port, p.max_message_bytes, security)
        self.servicer.info.address = self.address
        return self.address

    def _new_runner(self, num_blocks: int) -> StageRunner:
        """The KV cache of num_blocks blocks and a runner over it (its decode step compiled, where that is on)."""
        p = self.plan
        runner = StageRunner(
            self.model, KVCache.for_model(self.model, num_blocks, p.block_size, self.dtype, self.device)
        )
        runner.testing = p.testing
        if compile_enabled(p.compile, self.device.type):
            sizes = compiled_batch_sizes(p.compile_batch_sizes, p.max_num_seqs)
            seconds = runner.compile(sizes, progress=lambda line: log.warning("stage %d: %s", p.index, line))
            log.warning("stage %d: decode step compiled for batch sizes %s in %.1f s", p.index, sizes, seconds)
        return runner

    # -- rebalancing: check, change layers, size the KV cache again -----------------------------
    def check_layers(self, layers: LayerRange, min_blocks: int) -> None:
        """A rebalance's check before anything changes: ConfigError, with the numbers, when the new layers do not fit."""
        self.check_fits(*layers, min_blocks)

    def set_layers(self, layers: LayerRange, min_batch_id: int) -> Loaded:
        """Takes layers [start, end): fences off older microbatches, frees the KV cache and the layers it loses, then
        reads only the tensors of the layers it gains (free first, then load: the peak is the larger of the two splits'
        weights, with no KV cache). Serves nothing until `resize`; says its KV capacity."""
        p = self.plan
        layer_start, layer_end = layers
        self.service.fence(min_batch_id)
        self.service.runner = self.runner = None  # the KV cache goes with it
        self.servicer.info.num_kv_blocks = 0  # no cache until `resize` (a recovery asks for it)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if p.testing is not None and p.testing.crash_in_rebalance:
            log.error("stage %d: testing.rebalance_crash_stage: exiting while changing layers", p.index)
            os._exit(1)
        self.model = change_layers(self.model, layer_start, layer_end, p.model_dir, self.dtype, self.device)
        p.layer_start, p.layer_end = layer_start, layer_end
        self.servicer.info.layer_start, self.servicer.info.layer_end = layer_start, layer_end
        self.weight_bytes = stage_weight_bytes(self.config, layer_start, layer_end, self.dtype, p.model_dir)
        return Loaded(self.weight_bytes, self.kv_capacity(), str(self.device), self.weight_formats())

    def resize(self, num_blocks: int, min_batch_id: int) -> None:
        """A KV cache of num_blocks blocks for the layers it holds (after `set_layers`, or when the pipeline's block count fell)."""
        if self.runner is not None:
            self.service.fence(min_batch_id)
            self.service.runner = self.runner = None
        self.runner = self._new_runner(num_blocks)
        info = self.info_message(num_blocks)
        info.address = self.address
        self.servicer.info = info
        self.service.runner = self.runner

    def connect(self, wiring: Wiring) -> None:
        self.service.connect(wiring.next_address, wiring.coordinator_address)

    def fence(self, min_batch_id: int) -> None:
        self.service.fence(min_batch_id)

    def info_message(self, num_blocks: int) -> pb.StageInfo:
        mem_total = self.memory_budget()
        mem_used = (
            torch.cuda.memory_allocated(self.device)
            if self.device.type == "cuda"
            else self.weight_bytes + num_blocks * self.bytes_per_block
        )
        return pb.StageInfo(
            index=self.plan.index,
            layer_start=self.plan.layer_start,
            layer_end=self.plan.layer_end,
            device=str(self.device),
            weight_bytes=self.weight_bytes,
            weight_formats=self.weight_formats(),
            memory_total_bytes=mem_total,
            memory_used_bytes=mem_used,
            num_kv_blocks=num_blocks,
            block_size=self.plan.block_size,
            address=self.address,
            pid=os.getpid(),
            schema_version=SCHEMA_VERSION,
            checkpoint_fingerprint=self.fingerprint,
            node_id=self.node_id,
            dtype=self.plan.dtype,
            kv_block_layer_bytes=KVCache.bytes_per_block(
                1, self.plan.block_size, self.config.num_key_value_heads, self.config.head_dim, self.dtype
            ),
            layer_weight_bytes=layer_weight_bytes(
                self.config, self.plan.layer_start, self.plan.layer_end, self.dtype, self.plan.model_dir
            ),
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=1).wait()
        if self.service is not None:
            self.service.stop()
