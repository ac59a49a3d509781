"""The composition root's shared part: a cluster config and a started pipeline become an engine (generate and serve)."""

from __future__ import annotations

import logging

from stagecoach.cluster.config import ClusterConfig
from stagecoach.coordinator.engine import Engine, Pipeline
from stagecoach.coordinator.rebalancer import RebalancePolicy
from stagecoach.coordinator.scheduler import SchedulerConfig
from stagecoach.coordinator.speculative import Speculation
from stagecoach.proto.model_config import ModelConfig

log = logging.getLogger(__name__)


def max_model_len(config: ClusterConfig, model: ModelConfig, pipeline: Pipeline) -> int:
    """The longest sequence the engine admits, for serve and generate alike: the model's limit, server.max_model_len
    where lower, and never more than the KV cache holds (a longer request could never run)."""
    capacity = pipeline.num_blocks * pipeline.block_size
    wanted = config.server.max_model_len
    limit = min(model.max_position_embeddings, wanted or model.max_position_embeddings, capacity)
    if wanted and wanted > limit:
        log.warning("--max-model-len %d lowered to %d: the KV cache holds %d tokens", wanted, limit, capacity)
    return limit


def build_engine(
    pipeline: Pipeline, config: ClusterConfig, stop_token_ids: list[int], max_model_len: int, vocab_size: int
) -> Engine:
    """The engine over a started pipeline, sized from the config: one microbatch in flight per stage by default."""
    p = config.pipeline
    scheduler = SchedulerConfig(
        num_blocks=pipeline.num_blocks,
        block_size=pipeline.block_size,
        max_num_batched_tokens=p.max_batch_tokens,
        max_num_seqs=p.max_num_seqs,
        max_model_len=max_model_len,
        max_running=config.server.max_running,
        vocab_size=vocab_size,
        prefix_caching=config.cache.prefix_caching,
    )
    # In-process stages run one after another: a second microbatch in flight would only wait.
    return Engine(
        pipeline,
        scheduler,
        stop_token_ids,
        max_inflight=1 if p.backend == "local" else (p.max_inflight or len(pipeline.stages)),
        heartbeat_interval_s=p.heartbeat_interval_s,
        recovery_timeout_s=p.recovery_timeout_s,
        crash_token_id=config.testing.engine_crash_token_id,
        rebalance=RebalancePolicy(p.rebalance, p.rebalance_min_gain, p.rebalance_cooldown_s),
        speculation=Speculation(config.speculative) if config.speculative.method != "off" else None,
    )
