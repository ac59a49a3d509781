"""What the HTTP server knows of itself: its engine, stages and their states, heartbeats, limits and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.server_metrics import Metrics
from stagecoach.coordinator.tokenizer import Tokenizer


@dataclass
class ServerState:
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    sampling_defaults: dict
    api_key: str | None = None
    max_active: int | None = None  # requests running + queued; beyond this: 429
    request_timeout_s: float = 600.0  # a generation request taking longer ends with 408
    engine: AsyncEngine | None = None  # set once every stage is ready
    stages: list = field(default_factory=list)
    draining: bool = False
    active: int = 0
    startup_error: str | None = None
    gave_up: str | None = None  # the engine failed too often: /live answers 503 so that the pod is restarted
    metrics: Metrics | None = None
    stage_states: list[str] = field(default_factory=list)  # per stage: ready | failed (recovering comes with recovery)
    health_polls: int = 0  # heartbeat rounds completed (a round while the engine is starting or recovering asks nobody)
    health_poll_errors: int = 0  # rounds that ended with an error (logged; the next round runs)
    last_health_poll: float | None = None  # Unix time the last round completed
    started_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.core.stats(with_timings=False) if self.engine else {})

    def unavailable(self) -> str | None:
        """Why no generation can be served now (draining aside), or None."""
        if self.startup_error or self.gave_up:
            return self.startup_error or self.gave_up
        if self.engine is None:
            return "the pipeline's stages are still starting"
        return self.engine.unavailable
