"""Every way to run the stages behind the engine's `Pipeline` interface, and the one way from a config to running stages
(`open_pipeline`): in this process (local_pipeline.py), on threads over gRPC (`ThreadPipeline`), as Ray actors
(ray_pipeline.py).

A pipeline takes microbatches with `submit` and hands back finished ones with `wait`, in the
order they complete. The gRPC backends share one wiring and one way to change running stages
(grpc_pipeline.py: `GrpcPipeline._bring_up`, `_wire`, `reconfigure`); a backend that starts stages
gives one `StageControl` per stage (`controls`) and says how to replace a dead one (`_replace`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from pathlib import Path

import torch

from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.grpc_pipeline import GrpcPipeline
from stagecoach.cluster.local_pipeline import LocalPipeline
from stagecoach.cluster.partition import partition_layers
from stagecoach.errors import ConfigError
from stagecoach.proto.model_config import ModelConfig
from stagecoach.proto.security import LinkSecurity
from stagecoach.proto.types import LayerRange
from stagecoach.stage.compiled import compile_enabled, compiled_batch_sizes
from stagecoach.stage.kv_cache import cpu_num_blocks
from stagecoach.stage.loader import DTYPES, layer_weight_bytes, stage_weight_bytes
from stagecoach.stage.testing_knobs import StageTesting
from stagecoach.stage.worker import StagePlan, StageWorker

log = logging.getLogger(__name__)


def plan_layers(config: ClusterConfig, model: ModelConfig) -> list[LayerRange]:
    """The layer ranges of the config's split, or its balanced default (balanced_split)."""
    p = config.pipeline
    return balanced_split(model, config.model.path, p.num_stages, p.layers, DTYPES[config.model.dtype])


def balanced_split(
    model: ModelConfig, path, num_stages: int, layer_counts: list[int] | None = None, dtype=torch.float32
) -> list[LayerRange]:
    """`layer_counts`, or num_stages ranges of balanced bytes where the last stage also pays for lm_head, in layers'
    worth of the bytes it reads as loaded in dtype (a GGUF file's or GPTQ/AWQ checkpoint's layers in their formats,
    lm_head in its format or dtype)."""
    layers = layer_weight_bytes(model, 0, model.num_hidden_layers, dtype, path)
    end = stage_weight_bytes(model, model.num_hidden_layers - 1, model.num_hidden_layers, dtype, path)
    lm_head_cost = (end - layers[-1]) / (sum(layers) / len(layers))
    return partition_layers(
        model.num_hidden_layers, num_stages, last_stage_extra=lm_head_cost, layer_counts=layer_counts
    )


def stage_testing(config: ClusterConfig, index: int) -> StageTesting | None:
    """The config's testing: knobs that apply to stage `index`; None when none does (the stage then pays nothing)."""
    t = config.testing
    knobs = StageTesting(
        delay_ms=t.stage_delay_ms[index] if t.stage_delay_ms else 0.0,
        layer_delay_ms=t.layer_delay_ms or 0.0,
        slowdown=t.stage_slowdown[index] if t.stage_slowdown else 1.0,
        poison_prefill_tokens=t.poison.prefill_tokens if t.poison and t.poison.stage == index else None,
        crash_in_rebalance=t.rebalance_crash_stage == index,
    )
    return None if knobs.is_idle else knobs


def stage_plans(config: ClusterConfig, ranges: list[LayerRange], link_token: str) -> list[StagePlan]:
    """One plan per stage. Every StagePlan field that a config section has under the same name comes from it,
    so a stage's settings are written once, in cluster/config.py."""
    per_stage = {"index", "model_dir", "layer_start", "layer_end", "port", "testing", "link_token"}
    names = {f.name for f in dataclasses.fields(StagePlan)} - per_stage
    shared = {}
    for section in (config.model, config.pipeline, config.cache, config.transport):
        shared |= {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
    assert set(shared) == names, f"StagePlan fields without a config setting: {sorted(names - set(shared))}"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    shared["cpu_threads"] = shared["cpu_threads"] or (int(omp) if omp.isdigit() and int(omp) > 0 else None)
    port = config.transport.port
    return [
        StagePlan(
            index=i,
            model_dir=str(config.model.path),
            layer_start=start,
            layer_end=end,
            port=port + i if port else 0,
            testing=stage_testing(config, i),
            link_token=link_token,
            **shared,
        )
        for i, (start, end) in enumerate(ranges)
    ]


def link_security(config: ClusterConfig) -> LinkSecurity:
    """The pipeline's link token (transport.token_env's, or a fresh random one) and TLS files."""
    t = config.transport
    if t.token_env and not os.environ.get(t.token_env):
        raise ConfigError(f"transport.token_env names {t.token_env}, but that environment variable is empty or unset")
    return LinkSecurity(
        os.environ[t.token_env] if t.token_env else secrets.token_hex(32), t.tls_cert, t.tls_key, t.tls_ca
    )


def open_pipeline(config: ClusterConfig):
    """The one way from a config to running stages: partitions the layers and starts the config's backend."""
    model = ModelConfig.from_pretrained(config.model.path)
    ranges = plan_layers(config, model)
    if config.pipeline.backend == "local":
        c = config.cache
        device = "cpu" if config.pipeline.device == "auto" else config.pipeline.device
        p = config.pipeline
        sizes = (
            compiled_batch_sizes(p.compile_batch_sizes, p.max_num_seqs)
            if compile_enabled(p.compile, device.split(":")[0])
            else None
        )
        pipeline = LocalPipeline.load(
            config.model.path,
            ranges,
            config.model.dtype,
            device,
            num_blocks=cpu_num_blocks(c.num_blocks, c.max_tokens, c.block_size),
            block_size=c.block_size,
            compile_batch_sizes=sizes,
        )
        for i, runner in enumerate(pipeline.runners):
            runner.testing = stage_testing(config, i)
        return pipeline
    if config.pipeline.backend == "thread":
        return ThreadPipeline(config.model.path, ranges, config.transport.host or "127.0.0.1", config)
    from stagecoach.cluster.ray_cluster import connect_ray
    from stagecoach.cluster.ray_pipeline import RayPipeline

    p = config.pipeline
    # A new local Ray gets enough logical CPUs for one share per stage, even on a small machine.
    connect_ray(
        p.ray_address,
        num_cpus=max(os.cpu_count() or 1, int(p.num_stages * p.cpus_per_stage)),
        host=config.transport.host,
    )
    return RayPipeline(config, ranges)


class ThreadPipeline(GrpcPipeline):
    """Every stage in this process, each behind its own gRPC server on host: transport without Ray.

    The stages' plans come from `config` (default: ClusterConfig's defaults with transport.host = host);
    `plan_overrides` replaces plan fields by name (tests: num_blocks, block_size, TLS files, …).
    """

    def __init__(
        self,
        model_dir: str | Path,
        ranges: list[LayerRange],
        host: str = "127.0.0.1",
        config: ClusterConfig | None = None,
        **plan_overrides,
    ) -> None:
        config = config or ClusterConfig.from_dict({"transport": {"host": host}})
        token = plan_overrides.pop("link_token", None) or link_security(config).token
        plans = [
            dataclasses.replace(p, model_dir=str(model_dir), **plan_overrides)
            for p in stage_plans(config, ranges, token)
        ]
        super().__init__(host, 0, plans[0].max_message_bytes, plans[0].security(), config.pipeline.heartbeat_timeout_s)
        self.workers = self.controls = [StageWorker(plan) for plan in plans]
        try:
            self._bring_up(self._each({i: lambda c: c.load() for i in range(len(plans))}))
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        for w in self.workers:
            w.stop()
        super().shutdown()
