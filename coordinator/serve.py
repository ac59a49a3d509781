"""`stagecoach serve`: the HTTP API up at once, the pipeline behind it when its stages are ready, a draining shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from stagecoach.coordinator.api import ServerState, build_app
from stagecoach.coordinator.async_engine import AsyncEngine
from stagecoach.coordinator.engine import sampling_defaults
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ConfigError

log = logging.getLogger("stagecoach.serve")


@dataclass(slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "ray"
    ray_address: str | None = None
    api_key_env: str | None = None  # name of the environment variable holding the key
    max_running: int | None = None
    max_queue: int | None = None
    max_model_len: int | None = None
    served_model_name: str | None = None
    drain_timeout_s: float = 30.0
    request_timeout_s: float = 600.0


async def _start_pipeline(config, options: ServeOptions, state: ServerState, tokenizer: Tokenizer) -> tuple:
    from stagecoach.coordinator.cli import build_engine, build_pipeline

    loop = asyncio.get_running_loop()
    pipeline, model = await loop.run_in_executor(None, build_pipeline, config, options.backend, options.ray_address)
    capacity = pipeline.num_blocks * pipeline.block_size
    max_model_len = min(model.max_position_embeddings, options.max_model_len or model.max_position_embeddings, capacity)
    if options.max_model_len and options.max_model_len > max_model_len:
        log.warning("--max-model-len %d lowered to %d: the KV cache holds %d tokens", options.max_model_len, max_model_len, capacity)
    engine = build_engine(pipeline, config, options.backend, tokenizer.stop_token_ids, max_model_len, options.max_running)
    state.max_model_len = max_model_len
    state.stages = pipeline.stages
    state.stage_states = ["ready"] * len(pipeline.stages)
    engine.timings.observer = state.metrics.observe_timing
    def recovered(seconds: float) -> None:
        state.stages = pipeline.stages  # restarted stages have new addresses and pids
        state.metrics.recoveries.inc()
        state.metrics.recovery_seconds.observe(seconds)

    state.engine = AsyncEngine(engine, config.pipeline.recovery_timeout_s, on_recovery=recovered)
    log.warning("ready: %d stages, max_model_len %d, serving %s", len(pipeline.stages), max_model_len, state.model_name)
    return pipeline


async def _poll_health(pipeline, state: ServerState, interval_s: float) -> None:
    """Heartbeats: keeps each stage's state and error count fresh, and starts a recovery when one stops answering."""
    loop = asyncio.get_running_loop()
    while True:
        if not state.engine.recovering:
            replies = await loop.run_in_executor(None, pipeline.health)
            state.stage_states = ["failed" if isinstance(r, Exception) else "ready" for r in replies]
            for stage, s in zip(pipeline.stages, state.stage_states):
                state.metrics.stage_up.labels(str(stage.index)).set(1 if s == "ready" else 0)
            dead = [str(stage.index) for stage, s in zip(pipeline.stages, state.stage_states) if s != "ready"]
            if dead:
                state.engine.report_failure(f"stage {', '.join(dead)} missed its heartbeat")
        await asyncio.sleep(interval_s)


async def serve(config, options: ServeOptions) -> int:
    model_dir = Path(config.model.path)
    tokenizer = Tokenizer(model_dir)
    api_key = None
    if options.api_key_env:
        api_key = os.environ.get(options.api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {options.api_key_env}: that environment variable is empty or unset")
    max_active = None
    if options.max_queue is not None:
        max_active = (options.max_running or 0) + options.max_queue if options.max_running else options.max_queue
    from stagecoach.stage.model import ModelConfig

    state = ServerState(
        tokenizer=tokenizer,
        model_name=options.served_model_name or model_dir.name,
        max_model_len=ModelConfig.from_pretrained(model_dir).max_position_embeddings,
        sampling_defaults=sampling_defaults(model_dir),
        api_key=api_key,
        max_active=max_active,
        request_timeout_s=options.request_timeout_s,
    )
    runner = web.AppRunner(build_app(state), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port)
    await site.start()
    log.warning("listening on http://%s:%d (model %s; /health is 503 until the stages are ready)", options.host, options.port, state.model_name)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pipeline = None
    starter = asyncio.ensure_future(_start_pipeline(config, options, state, tokenizer))
    exit_code = 0
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({starter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    poller = None
    if starter in done:
        try:
            pipeline = starter.result()
            poller = asyncio.ensure_future(_poll_health(pipeline, state, config.pipeline.heartbeat_interval_s))
        except Exception as e:
            state.startup_error = str(e)
            log.error("the pipeline did not start: %s", e)
            exit_code = 2
            stop.set()
        await stop.wait()
    if poller is not None:
        poller.cancel()
    # Drain: refuse new work (503), let running requests finish, then release the stages.
    state.draining = True
    log.warning("draining: %d requests in flight, up to %.0f s", state.active, options.drain_timeout_s)
    deadline = loop.time() + options.drain_timeout_s
    while state.active and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if not starter.done():
        starter.cancel()
    await runner.cleanup()
    if state.engine is not None:
        state.engine.stop()
    if pipeline is not None:
        await loop.run_in_executor(None, pipeline.shutdown)
    log.warning("stopped")
    return exit_code
