"""Deployment configuration: slotted dataclasses that YAML, the command line and the chart's ConfigMap map onto.

Each setting and its default is written here once. A field's metadata may name its command-line
flag (`setting(..., flag="--block-size")`); `add_flags` derives the CLI from these fields and
`ClusterConfig.load` lays the given flags over the YAML (both through cluster/config_mapping.py), so a
flag, a YAML key and the chart's ConfigMap key always mean the same field. Unknown YAML keys are errors
that name them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from stagecoach.cluster import config_mapping
from stagecoach.cluster.config_mapping import choose as _choose
from stagecoach.cluster.config_mapping import setting
from stagecoach.cluster.config_speculative import SpeculativeSection
from stagecoach.errors import ConfigError

PLACEMENTS = ("auto", "strict_spread", "spread", "pack")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("ray", "thread", "local")
COMPILE_MODES = ("auto", "on", "off")
REBALANCE_MODES = ("off", "suggest", "auto")
SERVE_ONLY = "serve"  # a setting whose flag only `stagecoach serve` takes


@dataclass(slots=True)
class ModelSection:
    path: str = setting(
        "",
        "Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json), readable on every stage's node",
        "--model",
    )
    dtype: str = setting("float32", "weights, activations and KV cache", "--dtype", DTYPE_NAMES)

    def __post_init__(self) -> None:
        _choose("model.dtype", self.dtype, DTYPE_NAMES)


@dataclass(slots=True)
class PipelineSection:
    backend: str = setting(
        "ray",
        "ray: stages as Ray actors over gRPC; thread: every stage in this process behind its own gRPC server; "
        "local: every stage in this process, called directly",
        "--backend",
        BACKENDS,
    )
    ray_address: str | None = setting(
        None,
        "'local' starts a new Ray, 'auto' or host:port joins one; unset: a running one, else a new local one",
        "--ray-address",
    )
    num_stages: int = setting(
        1, "number of pipeline stages, balanced by time (the last one also runs lm_head)", "--stages", group="split"
    )
    layers: list[int] | None = setting(
        None, "explicit layer counts per stage, e.g. 17,16,16,15", "--layers", group="split"
    )
    gpus_per_stage: float | None = setting(
        None,
        "GPUs in each stage's placement bundle; unset: 1 when the Ray cluster has GPUs, else 0",
        "--gpus-per-stage",
    )
    cpus_per_stage: float = setting(1.0, "the CPU share of each stage's placement bundle")
    placement: str = setting(
        "auto", "auto: STRICT_SPREAD (a node per stage) when stages need a GPU, else PACK", "--placement", PLACEMENTS
    )
    device: str = setting("auto", "where stages run", "--device", DEVICES)
    max_inflight: int | None = setting(None, "microbatches in flight; unset: the number of stages", "--max-inflight")
    max_batch_tokens: int = setting(
        512, "token budget of one microbatch (longer prompts are chunked)", "--max-batch-tokens"
    )
    max_num_seqs: int = setting(64, "sequences in one microbatch at most")
    cpu_threads: int | None = setting(
        None,
        "torch threads in each CPU stage; unset: the coordinator's OMP_NUM_THREADS where its environment sets one, else "
        "every core of the stage's host (co-located stages share them; bench/stage_threads.py); GPU stages: Ray's",
        "--cpu-threads",
    )
    compile: str = setting(
        "auto",
        "compile each stage's decode step (torch.compile; CUDA graphs on GPUs) at load; auto: on for CUDA stages, off for CPU "
        "ones (bench/compiled.py measures both)",
        "--compile",
        COMPILE_MODES,
    )
    compile_batch_sizes: list[int] = setting(
        [1, 2, 4, 8, 16, 32, 64],
        "decode batch sizes compiled (a decode microbatch is padded up to the next; "
        "larger ones and prefills run eagerly); sizes above max_num_seqs are skipped",
        "--compile-batch-sizes",
    )
    memory_limit_mb: int | None = setting(
        None, "per-stage memory budget in MiB; unset: the device's (GPU × fraction, or free RAM)", "--memory-limit-mb"
    )
    ready_timeout_s: float = setting(300.0, "seconds stages may take to be placed and loaded")
    recovery_timeout_s: float = setting(
        60.0, "seconds a failed stage has to come back before its requests end with 503"
    )
    heartbeat_interval_s: float = setting(
        2.0, "seconds between health checks (also: how late a microbatch may be before the stages are asked)"
    )
    heartbeat_timeout_s: float = setting(2.0, "seconds a stage has to answer a health check")
    rebalance: str = setting(
        "suggest",
        "moving layers between stages by their measured speed: off; suggest (the proposal in /v1/stats, /metrics "
        "and stagecoach top); auto (applied while serving when its predicted gain is at least rebalance_min_gain)",
        "--rebalance",
        REBALANCE_MODES,
    )
    rebalance_min_gain: float = setting(
        0.10, "auto: the least predicted speed-up (0.10: 10 %) worth a rebalance's pause", "--rebalance-min-gain"
    )
    rebalance_cooldown_s: float = setting(
        300.0, "auto: seconds after the start or a rebalance before the next one", "--rebalance-cooldown-s"
    )

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.num_stages = len(self.layers)
        if self.num_stages < 1:
            raise ConfigError(f"pipeline.num_stages must be at least 1, got {self.num_stages}")
        _choose("pipeline.backend", self.backend, BACKENDS)
        _choose("pipeline.placement", self.placement, PLACEMENTS)
        _choose("pipeline.device", self.device, DEVICES)
        if self.gpus_per_stage is not None and self.gpus_per_stage < 0:
            raise ConfigError(f"pipeline.gpus_per_stage must be >= 0, got {self.gpus_per_stage}")
        for name in ("max_inflight", "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"pipeline.{name} must be at least 1 (or unset), got {getattr(self, name)}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_timeout_s <= 0 or self.recovery_timeout_s <= 0:
            raise ConfigError(
                "pipeline.heartbeat_interval_s, heartbeat_timeout_s and recovery_timeout_s must be positive"
            )
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("pipeline.max_batch_tokens and pipeline.max_num_seqs must be at least 1")
        _choose("pipeline.compile", self.compile, COMPILE_MODES)
        _choose("pipeline.rebalance", self.rebalance, REBALANCE_MODES)
        if self.rebalance_min_gain < 0 or self.rebalance_cooldown_s < 0:
            raise ConfigError(
                f"pipeline.rebalance_min_gain and rebalance_cooldown_s must be >= 0, got {self.rebalance_min_gain} and {self.rebalance_cooldown_s}"
            )
        if not self.compile_batch_sizes or min(self.compile_batch_sizes) < 1:
            raise ConfigError(
                f"pipeline.compile_batch_sizes must list batch sizes of at least 1, got {self.compile_batch_sizes}"
            )


@dataclass(slots=True)
class CacheSection:
    block_size: int = setting(16, "tokens per KV cache block", "--block-size")
    num_blocks: int | None = setting(
        None, "CPU stages: KV cache blocks per stage; unset: from cache.max_tokens", "--kv-blocks"
    )
    max_tokens: int = setting(8192, "CPU stages: KV capacity in tokens when num_blocks is unset")
    gpu_memory_fraction: float = setting(0.9, "GPU stages: share of device memory for weights + activations + KV cache")
    prefix_caching: bool = setting(
        True,
        "reuse the K/V of full blocks a request shares with an earlier one (a system prompt, a "
        "conversation's history): only the rest of its prompt is prefilled",
        "--prefix-caching",
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"cache.block_size must be at least 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"cache.num_blocks must be at least 1, got {self.num_blocks}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"cache.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")


@dataclass(slots=True)
class TransportSection:
    host: str | None = setting(
        None, "address the stage and coordinator gRPC servers bind; unset: each node's own", "--grpc-host"
    )
    port: int = setting(0, "0: any free port; else stage i listens on port + i")
    max_message_mb: int = setting(
        1024, "largest gRPC message in MiB (a 4k-token float32 prefill of Qwen1.5-32B is 80 MiB)"
    )
    token_env: str | None = setting(
        None, "environment variable holding the stage-link token; unset: a fresh random one per pipeline"
    )
    tls_cert: str | None = setting(None, "mutual TLS between stages and coordinator: this party's certificate (PEM)")
    tls_key: str | None = setting(None, "mutual TLS: its private key (PEM)")
    tls_ca: str | None = setting(
        None, "mutual TLS: the CA that signed every party's certificate (covering their addresses)"
    )


@dataclass(slots=True)
class ServerSection:
    host: str = setting("127.0.0.1", "HTTP bind address", "--host", command=SERVE_ONLY)
    port: int = setting(8000, "HTTP port", "--port", command=SERVE_ONLY)
    api_key_env: str | None = setting(
        None,
        "environment variable holding the API key; when set, requests need 'Authorization: Bearer <key>'",
        "--api-key-env",
        command=SERVE_ONLY,
    )
    max_running: int | None = setting(
        None, "sequences admitted at once; unset: as many as the KV cache holds", "--max-running", command=SERVE_ONLY
    )
    max_queue: int | None = setting(
        None, "requests waiting beyond max_running before 429; unset: unlimited", "--max-queue", command=SERVE_ONLY
    )
    max_model_len: int | None = setting(
        None,
        "prompt + completion tokens at most; unset: the model's, capped by the KV cache",
        "--max-model-len",
        command=SERVE_ONLY,
    )
    served_model_name: str | None = setting(
        None,
        "the model's name in the API; unset: the checkpoint folder's name",
        "--served-model-name",
        command=SERVE_ONLY,
    )
    drain_timeout_s: float = setting(
        30.0, "seconds requests in flight get to finish on SIGTERM", "--drain-timeout", command=SERVE_ONLY
    )
    request_timeout_s: float = setting(
        600.0, "seconds a generation request may take before it ends with 408", "--request-timeout", command=SERVE_ONLY
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if self.max_running is not None and self.max_running < 1:
            raise ConfigError(f"server.max_running must be at least 1, got {self.max_running}")
        if self.max_queue is not None and self.max_queue < 0:
            raise ConfigError(f"server.max_queue must be >= 0, got {self.max_queue}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"server.max_model_len must be at least 2, got {self.max_model_len}")
        if self.drain_timeout_s < 0 or self.request_timeout_s <= 0:
            raise ConfigError("server.drain_timeout_s must be >= 0 and server.request_timeout_s positive")


@dataclass(slots=True)
class PoisonSetting:
    """testing.poison: one stage raises in compute on every microbatch that holds a first prefill chunk of this many tokens."""

    __test__ = False  # not a pytest test class

    stage: int = setting(0, "the stage that raises (a stage started again in its place raises too)")
    prefill_tokens: int = setting(1, "the length of the prefill chunk, starting at position 0, that makes it raise")

    def __post_init__(self) -> None:
        if self.stage < 0 or self.prefill_tokens < 1:
            raise ConfigError(
                f"testing.poison needs stage >= 0 and prefill_tokens >= 1, got stage {self.stage}, prefill_tokens {self.prefill_tokens}"
            )


@dataclass(slots=True)
class TestingSection:
    """Knobs for tests and benchmarks only: each makes the system misbehave on purpose. Leave them unset in production."""

    __test__ = False  # not a pytest test class

    stage_delay_ms: list[float] | None = setting(
        None, "extra milliseconds added to each stage's every forward (one value per stage): a slow stage"
    )
    engine_crash_token_id: int | None = setting(
        None, "the engine loop raises an unexpected error when it schedules a prompt holding this token id"
    )
    layer_delay_ms: float | None = setting(
        None,
        "each decoder layer waits this many milliseconds per microbatch, inside its timed layers "
        "(a slower device, without using the CPU)",
    )
    stage_slowdown: list[float] | None = setting(
        None,
        "per stage, a factor >= 1: its compute takes that many times its measured time "
        "(a slower device), e.g. [1, 3, 1, 1]",
    )
    rebalance_crash_stage: int | None = setting(
        None,
        "this stage's process exits in the middle of a rebalance, after freeing what it "
        "loses (Ray backend): a stage killed while applying one",
    )
    poison: PoisonSetting | None = setting(
        None,
        "a poisoned request: {stage, prefill_tokens}; that stage fails every microbatch holding a "
        "prefill chunk from position 0 of exactly prefill_tokens tokens, staying alive",
    )


@dataclass(slots=True)
class ClusterConfig:
    model: ModelSection = field(default_factory=ModelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    cache: CacheSection = field(default_factory=CacheSection)
    transport: TransportSection = field(default_factory=TransportSection)
    server: ServerSection = field(default_factory=ServerSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)
    testing: TestingSection = field(default_factory=TestingSection)

    def __post_init__(self) -> None:
        delays = self.testing.stage_delay_ms
        if delays is not None and (len(delays) != self.pipeline.num_stages or min(delays) < 0):
            raise ConfigError(
                f"testing.stage_delay_ms needs one non-negative value per stage ({self.pipeline.num_stages}), got {delays}"
            )
        slowdown = self.testing.stage_slowdown
        if slowdown is not None and (len(slowdown) != self.pipeline.num_stages or min(slowdown) < 1):
            raise ConfigError(
                f"testing.stage_slowdown needs one factor >= 1 per stage ({self.pipeline.num_stages}), got {slowdown}"
            )
        if self.testing.layer_delay_ms is not None and self.testing.layer_delay_ms < 0:
            raise ConfigError(f"testing.layer_delay_ms must be >= 0, got {self.testing.layer_delay_ms}")
        crash = self.testing.rebalance_crash_stage
        if crash is not None and not 0 <= crash < self.pipeline.num_stages:
            raise ConfigError(
                f"testing.rebalance_crash_stage {crash} is not a stage of this pipeline (stages 0..{self.pipeline.num_stages - 1})"
            )
        poison = self.testing.poison
        if poison is not None and poison.stage >= self.pipeline.num_stages:
            raise ConfigError(
                f"testing.poison.stage {poison.stage} is not a stage of this pipeline (stages 0..{self.pipeline.num_stages - 1})"
            )
        # `~` and $VARS expand; a relative path is taken from the working directory, as on the command line.
        self.model.path = os.path.expanduser(os.path.expandvars(self.model.path))

    @classmethod
    def from_dict(cls, data: dict | None) -> ClusterConfig:
        return config_mapping.build(cls, data or {})

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        return cls.from_dict(config_mapping.read_yaml(path))

    @classmethod
    def load(cls, path: str | Path | None, args: argparse.Namespace | None = None) -> ClusterConfig:
        """The YAML file (if any) with every flag given in args laid over it, validated once."""
        data = config_mapping.read_yaml(path) if path else {}
        if args is not None:
            for section, f, _ in flag_fields():
                value = getattr(args, config_mapping.flag_dest(f), None)
                if value is not None:
                    data.setdefault(section, {})
                    data[section] = dict(data[section] or {}) | {f.name: value}
                    if f.name == "num_stages":  # --stages replaces a split the file may give
                        data[section]["layers"] = None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag_fields(command: str | None = None) -> list[tuple[str, dataclasses.Field, object]]:
    """(section name, field, its type) of every setting with a flag; for `command`, only the flags it takes."""
    return config_mapping.flag_fields(ClusterConfig, command)


def add_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds a flag for every setting that has one (defaults stay None: only given flags override the YAML)."""
    config_mapping.add_flags(parser, ClusterConfig, command)
