"""What the server measures: Prometheus metrics for /metrics, rolling windows, and the /v1/stats document (docs/stats.md)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stagecoach.coordinator.timings import WINDOW, Rate, percentiles

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FINE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class Metrics:
    """engine_stats() gives the engine's counters (an empty dict while there is no engine)."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self._requests(r)
        self._stages(r)
        self._faults(r)
        r.register(_EngineCollector(engine_stats))
        # Rolling views for /v1/stats and the terminal UI.
        self.ttft_window: deque = deque(maxlen=WINDOW)
        self.itl_window: deque = deque(maxlen=WINDOW)
        self.input_tokens = Rate()
        self.output_tokens = Rate()
        self.requests_rate = Rate()

        def stat(key):
            return lambda: engine_stats().get(key, 0)

        for name, key, doc in (
            ("stagecoach_requests_running", "running", "Sequences holding KV blocks"),
            ("stagecoach_requests_waiting", "waiting", "Sequences waiting for KV blocks or a slot"),
            (
                "stagecoach_kv_blocks_used",
                "kv_blocks_used",
                "KV cache blocks in use (per stage; every stage has the same layout)",
            ),
            ("stagecoach_kv_blocks_total", "kv_blocks_total", "KV cache blocks per stage"),
            ("stagecoach_microbatches_inflight", "inflight", "Microbatches in the pipeline now"),
            ("stagecoach_rebalancing", "rebalancing", "1 while a rebalance moves layers between stages"),
        ):
            Gauge(name, doc, registry=r).set_function(stat(key))

    def _requests(self, r: CollectorRegistry) -> None:
        """Requests and responses, tokens, and the latencies a client sees."""
        counter, histogram = partial(Counter, registry=r), partial(Histogram, registry=r, buckets=LATENCY_BUCKETS)
        self.requests = counter("stagecoach_requests", "Finished HTTP generation requests by status code", ["status"])
        self.responses = counter(
            "stagecoach_http_responses", "Every HTTP response, by status code and route", ["status", "route"]
        )
        self.prompt_tokens = counter("stagecoach_prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("stagecoach_generation_tokens", "Tokens generated")
        self.ttft = histogram("stagecoach_time_to_first_token_seconds", "Time from request to its first token")
        self.itl = histogram("stagecoach_inter_token_latency_seconds", "Time between consecutive tokens of a sequence")

    def _stages(self, r: CollectorRegistry) -> None:
        """Each stage's times and whether it answers."""
        histogram = partial(Histogram, registry=r, buckets=FINE_BUCKETS)
        self.stage_compute = histogram(
            "stagecoach_stage_compute_seconds", "A stage's compute time per microbatch", ["stage"]
        )
        self.stage_queue = histogram(
            "stagecoach_stage_queue_seconds", "Time a microbatch waited in a stage's queue", ["stage"]
        )
        self.hop = histogram(
            "stagecoach_hop_seconds",
            "Sending a microbatch onward, until the receiver acknowledged it, timed by the sender",
            ["sender"],
        )
        self.stage_up = Gauge("stagecoach_stage_up", "1 when the stage answers its health check", ["stage"], registry=r)
        self.health_poll_errors = Counter(
            "stagecoach_health_poll_errors",
            "Health-check rounds that ended with an error (logged; the next one runs)",
            registry=r,
        )
        self.last_health_poll = Gauge(
            "stagecoach_health_last_poll_timestamp_seconds",
            "Unix time the last health-check round completed (alert when it falls behind by several heartbeat intervals)",
            registry=r,
        )

    def _faults(self, r: CollectorRegistry) -> None:
        """Recoveries, failed microbatches and requests, rebalances and engine restarts."""
        counter, histogram = partial(Counter, registry=r), partial(Histogram, registry=r)
        self.recoveries = counter("stagecoach_recoveries", "Pipeline recoveries after a stage failure")
        self.recovery_seconds = histogram(
            "stagecoach_recovery_seconds", "How long each recovery took", buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300)
        )
        self.requests_failed = counter(
            "stagecoach_requests_failed",
            "Sequences ended with an error while the pipeline kept serving, by reason",
            ["reason"],
        )
        self.microbatch_failures = counter(
            "stagecoach_microbatch_failures", "Microbatches a stage failed while staying up, by stage", ["stage"]
        )
        self.requests_failed.labels("stage_error")  # shown at 0 before the first
        self.rebalances = counter(
            "stagecoach_rebalances", "Rebalances applied while serving, by trigger (auto or admin)", ["trigger"]
        )
        self.rebalance_pause = histogram(
            "stagecoach_rebalance_pause_seconds",
            "How long each rebalance paused the pipeline (before the re-prefill)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.engine_restarts = counter(
            "stagecoach_engine_restarts", "Engine loops started anew after an unexpected error"
        )

    def observe_timing(self, kind: str, label: str, seconds: float) -> None:
        """TimingStats' observer: every stage record lands in the labelled histograms."""
        if kind == "compute":
            self.stage_compute.labels(label).observe(seconds)
        elif kind == "queue":
            self.stage_queue.labels(label).observe(seconds)
        else:
            self.hop.labels(label).observe(seconds)


class _EngineCollector:
    """Read from the engine at each scrape: the prefix cache's counters, the rebalancing planner's proposal (the
    predicted gain and each stage's layers now and proposed), and speculative decoding's counts."""

    def __init__(self, engine_stats: Callable[[], dict]) -> None:
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        cache = stats.get("prefix_cache") or {}
        prompt = CounterMetricFamily(
            "stagecoach_prefix_cache_queries", "Prompt tokens of admitted requests, looked up in the prefix cache"
        )
        prompt.add_metric([], cache.get("prompt_tokens", 0))
        hits = CounterMetricFamily(
            "stagecoach_prefix_cache_hits", "Of them, tokens found cached: their K/V reused, not prefilled"
        )
        hits.add_metric([], cache.get("cached_tokens", 0))
        blocks = GaugeMetricFamily("stagecoach_prefix_cache_blocks", "KV blocks whose content a new request can reuse")
        blocks.add_metric([], cache.get("cached_blocks", 0))
        yield from (prompt, hits, blocks)
        proposal = stats.get("rebalance") or {}
        gain = GaugeMetricFamily(
            "stagecoach_rebalance_predicted_gain",
            "The planner's predicted speed-up of the pipeline's pace for its proposed "
            "split over the current one (0.25: 25 % faster); 0 while measuring or balanced",
        )
        gain.add_metric([], float(proposal.get("predicted_gain") or 0.0))
        layers = GaugeMetricFamily(
            "stagecoach_rebalance_layers",
            "Layers per stage: the current split and the planner's proposal",
            labels=["stage", "split"],
        )
        for split in ("layers", "proposed"):
            for i, n in enumerate(proposal.get(split) or []):
                layers.add_metric([str(i), "current" if split == "layers" else "proposed"], n)
        yield from (gain, layers)
        spec = stats.get("speculative") or {}
        counters = (
            ("verify_passes", "Speculative decoding: verify passes (a sequence's newest token and its drafts)"),
            ("draft_tokens", "Speculative decoding: draft tokens proposed and verified"),
            ("accepted_tokens", "Speculative decoding: of them, drafts accepted (each one token fewer passes)"),
            ("declined_by_cost", "Speculative decoding: sequences whose drafts the cost model expected not to pay"),
        )
        for key, doc in counters:
            family = CounterMetricFamily(f"stagecoach_speculative_{key}", doc)
            family.add_metric([], spec.get(key, 0))
            yield family
        for key, doc in (
            ("acceptance_rate", "Speculative decoding: accepted / proposed draft tokens since the start"),
            ("tokens_per_pass", "Speculative decoding: tokens a verify pass emitted on average (1 + accepted drafts)"),
        ):
            family = GaugeMetricFamily(f"stagecoach_speculative_{key}", doc)
            family.add_metric([], float(spec.get(key, 0.0)))
            yield family


def _stage_row(s, state: str, t: dict, kv_blocks_used: int) -> dict:
    return {
        "index": s.index,
        "state": state,
        "layers": list(s.layers),
        "node_id": s.node_id,
        "address": s.address,
        "pid": s.pid,
        "device": s.device,
        "weight_bytes": s.weight_bytes,
        "weight_formats": s.weight_formats,
        "memory_used_bytes": s.memory_used_bytes,
        "memory_total_bytes": s.memory_total_bytes,
        "kv_blocks_total": s.num_kv_blocks,
        "kv_blocks_used": kv_blocks_used,
        "microbatches": t.get("microbatches", 0),
        "microbatches_per_s": t.get("microbatches_per_s", 0.0),
        "utilisation": t.get("utilisation", 0.0),
        "compute_seconds_total": t.get("compute_seconds_total", 0.0),
        "compute_ms": t.get("compute_ms"),
        "queue_ms": t.get("queue_ms"),
        "hop_ms": t.get("hop_ms"),
        "errors": s.errors,
    }


def stats_document(state) -> dict:
    """The /v1/stats document (schema in docs/stats.md; the terminal UI reads it). state: the server's ServerState."""
    m = state.metrics
    engine_stats = state.engine.core.stats() if state.engine else {}
    timings = {row["stage"]: row for row in engine_stats.pop("timings", [])}
    coordinator_hop = engine_stats.pop("coordinator_hop_ms", None)
    rebalance = engine_stats.pop("rebalance", None)
    stages = []
    for i, s in enumerate(state.stages):
        stage_state = (
            "recovering"
            if engine_stats.get("recovering")
            else (state.stage_states[i] if i < len(state.stage_states) else "ready")
        )
        stages.append(_stage_row(s, stage_state, timings.get(s.index, {}), engine_stats.get("kv_blocks_used", 0)))
    busy = [s["utilisation"] for s in stages]
    return {
        "model": state.model_name,
        "ready": state.unavailable() is None,
        "draining": state.draining,
        "uptime_s": round(time.monotonic() - state.started_at, 3),
        "active_requests": state.active,
        "throughput": {
            "input_tokens_per_s": round(m.input_tokens.per_second(), 3),
            "output_tokens_per_s": round(m.output_tokens.per_second(), 3),
            "requests_per_s": round(m.requests_rate.per_second(), 3),
        },
        "latency": {
            "ttft_ms": percentiles(m.ttft_window),
            "itl_ms": percentiles(m.itl_window),
            "coordinator_hop_ms": coordinator_hop,
        },
        "pipeline_utilisation": round(sum(busy) / len(busy), 3) if busy else 0.0,
        "health": {
            "polls": state.health_polls,
            "poll_errors": state.health_poll_errors,
            "last_poll_at": None if state.last_health_poll is None else round(state.last_health_poll, 3),
            "last_poll_age_s": None
            if state.last_health_poll is None
            else round(max(0.0, time.time() - state.last_health_poll), 3),
        },
        "engine": engine_stats,
        "rebalance": rebalance,
        "stages": stages,
    }
