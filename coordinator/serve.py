"""`stagecoach serve` (part of the composition root): the HTTP API up at once, the pipeline behind it when its stages are
ready, heartbeats that no error stops, an engine loop started anew when it dies on a bug (at most 3 times in 10 minutes),
and a draining shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path

from aiohttp import web

from stagecoach.cluster.config import ClusterConfig
from stagecoach.cluster.pipelines import open_pipeline
from stagecoach.coordinator.api import ServerState, build_runner
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.compose import build_engine
from stagecoach.coordinator.requests import sampling_defaults
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ConfigError
from stagecoach.proto.model_config import ModelConfig

log = logging.getLogger("stagecoach.serve")

MAX_RESTARTS = 3  # engine loops started anew within RESTART_WINDOW_S; one more failure and /live answers 503
RESTART_WINDOW_S = 600.0


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
        capacity = pipeline.num_blocks * pipeline.block_size
        wanted = config.server.max_model_len
        max_model_len = min(self.model.max_position_embeddings, wanted or self.model.max_position_embeddings, capacity)
        if wanted and wanted > max_model_len:
            log.warning("--max-model-len %d lowered to %d: the KV cache holds %d tokens", wanted, max_model_len, capacity)
        engine = build_engine(pipeline, config, self.tokenizer.stop_token_ids, max_model_len, self.model.vocab_size)
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
        state.max_model_len = max_model_len
        state.stages = pipeline.stages
        self._all_ready()
        state.engine = AsyncEngine(engine, on_crash=lambda e: self._loop.call_soon_threadsafe(self._crashed, e))
        log.warning("ready: %d stages, max_model_len %d, serving %s", len(pipeline.stages), max_model_len, state.model_name)

    def _all_ready(self) -> None:
        self._set_stage_states(["ready"] * len(self.state.stages))

    def _set_stage_states(self, states: list[str]) -> None:
        self.state.stage_states = states
        for stage, s in zip(self.state.stages, states):
            self.state.metrics.stage_up.labels(str(stage.index)).set(1 if s == "ready" else 0)

    def _crashed(self, error: BaseException) -> None:
        """On the event loop, after the engine thread has ended every open request with a 500."""
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            self.state.gave_up = (f"the engine loop failed again after {len(self.restarts)} restarts within {RESTART_WINDOW_S / 60:g} "
                                  f"minutes ({type(error).__name__}: {error}); not restarting it")
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
            states = await self._loop.run_in_executor(None, engine.engine.check_stages)
            if states is not None and self.state.engine is engine:
                self._set_stage_states(states)
        self.state.health_polls += 1
        self.state.last_health_poll = time.time()
        self.state.metrics.last_health_poll.set(self.state.last_health_poll)

    async def stop(self) -> None:
        if self._restarting is not None:
            await asyncio.gather(self._restarting, return_exceptions=True)
        await self._loop.run_in_executor(None, self._release, self.state.engine)


def server_state(config: ClusterConfig, tokenizer: Tokenizer, model: ModelConfig) -> ServerState:
    s, model_dir = config.server, Path(config.model.path)
    api_key = None
    if s.api_key_env:
        api_key = os.environ.get(s.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {s.api_key_env}: that environment variable is empty or unset")
    max_active = None
    if s.max_queue is not None:
        max_active = (s.max_running or 0) + s.max_queue if s.max_running else s.max_queue
    return ServerState(
        tokenizer=tokenizer,
        model_name=s.served_model_name or model_dir.name,
        max_model_len=model.max_position_embeddings,
        sampling_defaults=sampling_defaults(model_dir),
        api_key=api_key,
        max_active=max_active,
        request_timeout_s=s.request_timeout_s,
    )


async def serve(config: ClusterConfig) -> int:
    tokenizer, model = Tokenizer(Path(config.model.path)), ModelConfig.from_pretrained(config.model.path)
    state = server_state(config, tokenizer, model)
    runner = build_runner(state)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    log.warning("listening on http://%s:%d (model %s; /health is 503 until the stages are ready)", config.server.host, config.server.port, state.model_name)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    supervisor = EngineSupervisor(config, state, tokenizer, model)
    starter = asyncio.ensure_future(supervisor.start())
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({starter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    exit_code, poller = 0, None
    if starter in done:
        try:
            starter.result()
            poller = asyncio.ensure_future(supervisor.poll_health(config.pipeline.heartbeat_interval_s))
        except Exception as e:
            state.startup_error = str(e)
            log.error("the pipeline did not start: %s", e)
            exit_code = 2
            stop.set()
        await stop.wait()
    if poller is not None:
        poller.cancel()
    await _drain(state, config.server.drain_timeout_s)
    if not starter.done():
        starter.cancel()
    await runner.cleanup()
    await supervisor.stop()
    log.warning("stopped")
    return exit_code


async def _drain(state: ServerState, timeout_s: float) -> None:
    """Refuses new work (503) and lets running requests finish, up to timeout_s."""
    state.draining = True
    log.warning("draining: %d requests in flight, up to %.0f s", state.active, timeout_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.1)
