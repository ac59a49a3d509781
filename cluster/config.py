"""Deployment configuration: slotted dataclasses that YAML maps onto one to one (unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from stagecoach.errors import ConfigError

PLACEMENTS = ("auto", "strict_spread", "spread", "pack")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(slots=True)
class ModelSection:
    path: str = ""  # Hugging Face checkpoint folder, readable on every stage's node
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"model.dtype {self.dtype!r}: use one of {', '.join(DTYPE_NAMES)}")


@dataclass(slots=True)
class PipelineSection:
    num_stages: int = 1
    layers: list[int] | None = None  # explicit layer counts per stage, e.g. [17, 16, 16, 15]
    gpus_per_stage: float | None = None  # None: 1 when the Ray cluster has GPUs, else 0
    cpus_per_stage: float = 1.0  # the CPU share of each stage's placement bundle
    placement: str = "auto"  # auto | strict_spread | spread | pack
    device: str = "auto"  # auto | cpu | cuda
    max_inflight: int | None = None  # microbatches in flight; None: the number of stages
    max_batch_tokens: int = 512  # token budget of one microbatch (longer prompts are chunked)
    max_num_seqs: int = 64  # sequences in one microbatch at most
    memory_limit_mb: int | None = None  # per-stage memory budget; None: the device's (GPU × fraction, or free RAM)
    ready_timeout_s: float = 300.0  # how long stages may take to be placed and loaded
    recovery_timeout_s: float = 60.0  # a failed stage must be back within this, or its requests end with 503
    heartbeat_interval_s: float = 2.0  # how often stages are asked whether they are alive (also: how late a microbatch may be before they are)
    heartbeat_timeout_s: float = 2.0  # a stage that does not answer within this has failed
    stage_delay_ms: list[float] | None = None  # testing only: extra time added to each stage's every forward

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.num_stages = len(self.layers)
        if self.num_stages < 1:
            raise ConfigError(f"pipeline.num_stages must be at least 1, got {self.num_stages}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"pipeline.placement {self.placement!r}: use one of {', '.join(PLACEMENTS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"pipeline.device {self.device!r}: use one of {', '.join(DEVICES)}")
        if self.gpus_per_stage is not None and self.gpus_per_stage < 0:
            raise ConfigError(f"pipeline.gpus_per_stage must be >= 0, got {self.gpus_per_stage}")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ConfigError(f"pipeline.max_inflight must be at least 1, got {self.max_inflight}")
        if self.stage_delay_ms is not None and (len(self.stage_delay_ms) != self.num_stages or min(self.stage_delay_ms) < 0):
            raise ConfigError(f"pipeline.stage_delay_ms needs one non-negative value per stage ({self.num_stages}), got {self.stage_delay_ms}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_timeout_s <= 0 or self.recovery_timeout_s <= 0:
            raise ConfigError("pipeline.heartbeat_interval_s, heartbeat_timeout_s and recovery_timeout_s must be positive")
        if self.max_batch_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("pipeline.max_batch_tokens and pipeline.max_num_seqs must be at least 1")


@dataclass(slots=True)
class CacheSection:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # CPU stages: blocks per stage (else from max_tokens)
    max_tokens: int = 8192  # CPU stages: KV capacity in tokens when num_blocks is unset
    gpu_memory_fraction: float = 0.9  # GPU stages: share of device memory for weights + activations + KV

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"cache.block_size must be at least 1, got {self.block_size}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"cache.gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")


@dataclass(slots=True)
class TransportSection:
    host: str | None = None  # address stage and coordinator servers bind; None: the node's address
    port: int = 0  # 0: any free port; else stage i listens on port + i
    max_message_mb: int = 1024  # largest gRPC message (a 4k-token float32 prefill of Qwen1.5-32B is 80 MiB)
    token_env: str | None = None  # environment variable holding the stage-link token; None: a fresh random one per pipeline
    tls_cert: str | None = None  # mutual TLS between stages and coordinator: this party's certificate (PEM) …
    tls_key: str | None = None  # … its private key …
    tls_ca: str | None = None  # … and the CA that signed every party's certificate (covering their addresses)


@dataclass(slots=True)
class ServerSection:
    host: str = "127.0.0.1"  # HTTP API bind address
    port: int = 8000


@dataclass(slots=True)
class ClusterConfig:
    model: ModelSection = field(default_factory=ModelSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    cache: CacheSection = field(default_factory=CacheSection)
    transport: TransportSection = field(default_factory=TransportSection)
    server: ServerSection = field(default_factory=ServerSection)

    @classmethod
    def from_dict(cls, data: dict | None) -> ClusterConfig:
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        config = cls.from_dict(data)
        # `~` and $VARS expand; a relative path is taken from the working directory, as on the command line.
        config.model.path = os.path.expanduser(os.path.expandvars(config.model.path))
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return value
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _check_type(value, others[0], where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}; known in this section: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)
