"""Keeps the engine serving: recovers the pipeline after a stage failure (retried until the deadline), polls the stages'
health, and starts a new engine loop on a fresh pipeline when one dies on a bug (at most 3 times in 10 minutes).

The engine itself only raises PipelineError when a stage failed; what to do then, how often and for how long, is
decided here. Health checks run beside the engine's thread and are ordered against its reconfigurations (see
`Engine.check_stages` and `GrpcPipeline.health`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from stagecoach.cluster.backends import open_pipeline
from stagecoach.cluster.config import ClusterConfig
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.compose import build_engine, max_model_len
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.server_state import ServerState
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import PipelineError
from stagecoach.proto.model_config import ModelConfig

log = logging.getLogger("stagecoach.serve")

RETRY_S = 2.0  # between recovery attempts
MAX_RESTARTS = 3  # engine loops started anew within RESTART_WINDOW_S; one more failure and /live answers 503
RESTART_WINDOW_S = 600.0


def run_engine(engine: Engine, stop: threading.Event | None = None) -> None:
    """The engine's loop, kept serving: after a stage failure the pipeline is recovered in place and the loop goes on;
    any other exception ends it (the caller decides what then)."""
    while True:
        try:
            engine.run(stop)
            return
        except PipelineError as e:
            recover_until_whole(engine, e, stop)
            if stop is not None and stop.is_set():
                return


def recover_until_whole(engine: Engine, cause: Exception, stop: threading.Event | None) -> None:
    """Brings the pipeline back, an attempt every RETRY_S; past engine.recovery_timeout_s, open requests end with
    PipelineError (503) and new ones are refused until it is whole again (without `stop`: the error is raised). Requests
    that survive see a pause, not an error."""
    log.warning("the pipeline failed (%s): recovering", cause)
    engine.failure = f"the pipeline is recovering from: {cause}"
    deadline = time.monotonic() + (engine.recovery_timeout_s or 0.0)
    failed_open_requests, took = False, None
    with engine.health.reconfiguring():
        while stop is None or not stop.is_set():
            try:
                took = engine.recover()
                log.warning("recovered in %.2f s; re-prefilling %d sequences", took, len(engine.scheduler.waiting))
                engine.failure = None
                break
            except Exception as e:  # Ray, gRPC and load errors alike: try again until the deadline
                log.warning("recovery attempt failed: %s", e)
                if time.monotonic() > deadline and not failed_open_requests:
                    error = PipelineError(
                        f"stage failure: the pipeline did not recover within {engine.recovery_timeout_s or 0:g} s ({e})"
                    )
                    if stop is None:
                        raise error from None
                    engine.fail_all(error)
                    failed_open_requests = True
            if stop is None:
                time.sleep(RETRY_S)
            elif stop.wait(RETRY_S):
                return
    # Once the mark is off: the server's fresh state is for good.
    if took is not None and engine.on_recovery is not None:
        engine.on_recovery(took)


class EngineSupervisor:
    """Starts the pipeline and its engine loop; when the loop dies on an unexpected error, starts both anew."""

    def __init__(self, config: ClusterConfig, state: ServerState, tokenizer: Tokenizer, model: ModelConfig) -> None:
        self.config, self.state, self.tokenizer, self.model = config, state, tokenizer, model
        self.pipeline = None
        self.restarts: deque[float] = deque()
        self._loop = asyncio.get_running_loop()
        self._restarting: asyncio.Task | None = None

    async def start(self) -> None:
        state, config = self.state, self.config
        self.pipeline = pipeline = await self._loop.run_in_executor(None, open_pipeline, config)
        limit = max_model_len(config, self.model, pipeline)
        engine = build_engine(pipeline, config, self.tokenizer.stop_token_ids, limit, self.model.vocab_size)
        engine.timings.observer = state.metrics.observe_timing

        def recovered(seconds: float) -> None:
            state.stages = pipeline.stages  # restarted stages have new addresses and pids
            self._all_ready()  # every stage answered the recovery: no poll needed to say so
            state.metrics.recoveries.inc()
            state.metrics.recovery_seconds.observe(seconds)

        engine.on_recovery = recovered

        def microbatch_failed(stage: int | None, errors: list) -> None:
            state.metrics.microbatch_failures.labels("unknown" if stage is None else str(stage)).inc()
            if errors:
                state.metrics.requests_failed.labels("stage_error").inc(len(errors))

        engine.on_microbatch_failure = microbatch_failed

        def rebalanced(record: dict) -> None:
            state.stages = pipeline.stages  # new layer ranges and KV block counts
            self._all_ready()
            state.metrics.rebalances.labels(record["trigger"]).inc()
            state.metrics.rebalance_pause.observe(record["pause_s"])

        engine.rebalancer.on_applied = rebalanced
        state.max_model_len = limit
        state.stages = pipeline.stages
        self._all_ready()
        state.engine = AsyncEngine(
            engine, on_crash=lambda e: self._loop.call_soon_threadsafe(self._crashed, e), run=run_engine
        )
        log.warning("ready: %d stages, max_model_len %d, serving %s", len(pipeline.stages), limit, state.model_name)

    def _all_ready(self) -> None:
        self._set_stage_states(["ready"] * len(self.state.stages))

    def _set_stage_states(self, states: list[str]) -> None:
        self.state.stage_states = states
        for stage, s in zip(self.state.stages, states, strict=False):
            self.state.metrics.stage_up.labels(str(stage.index)).set(1 if s == "ready" else 0)

    def _crashed(self, error: BaseException) -> None:
        """On the event loop, after the engine thread has ended every open request with a 500."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            self.state.gave_up = (
                f"the engine loop failed again after {len(self.restarts)} restarts within {RESTART_WINDOW_S / 60:g} "
                f"minutes ({type(error).__name__}: {error}); not restarting it"
            )
            log.error("%s; /live answers 503", self.state.gave_up)
            return
        self.restarts.append(now)
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        log.warning("starting a new engine loop on a fresh pipeline (restart %d)", len(self.restarts))
        old = self.state.engine
        self.state.engine = None  # /health is 503 until the new pipeline is up
        await self._loop.run_in_executor(None, self._release, old)
        try:
            await self.start()
            self.state.metrics.engine_restarts.inc()
        except Exception as e:
            log.exception("the new pipeline did not start")
            self.state.gave_up = f"the engine failed and its pipeline did not start again: {e}"

    def _release(self, engine: AsyncEngine | None) -> None:
        if engine is not None:
            engine.stop()
        if self.pipeline is not None:
            self.pipeline.shutdown()
            self.pipeline = None

    async def poll_health(self, interval_s: float) -> None:
        """Heartbeats: keeps each stage's state fresh; the engine starts a recovery when one stops answering.
        No error ends it: one poll's is logged with its traceback and counted, and the next poll runs."""
        while True:
            try:
                await self.poll_once()
            except Exception:
                self.state.health_poll_errors += 1
                self.state.metrics.health_poll_errors.inc()
                log.exception("a health poll failed (%d so far); polling goes on", self.state.health_poll_errors)
            await asyncio.sleep(interval_s)

    async def poll_once(self) -> None:
        """One heartbeat. Its answers are dropped when the engine was replaced (a restart) or reconfigured meanwhile."""
        engine = self.state.engine
        if engine is not None and engine.unavailable is None:
            states = await self._loop.run_in_executor(None, engine.core.check_stages)
            if states is not None and self.state.engine is engine:
                self._set_stage_states(states)
        self.state.health_polls += 1
        self.state.last_health_poll = time.time()
        self.state.metrics.last_health_poll.set(self.state.last_health_poll)

    async def stop(self) -> None:
        if self._restarting is not None:
            await asyncio.gather(self._restarting, return_exceptions=True)
        await self._loop.run_in_executor(None, self._release, self.state.engine)
