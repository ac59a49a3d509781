"""`stagecoach serve` (part of the composition root): the HTTP API up at once, the pipeline behind it when its stages are
ready (kept serving by coordinator/supervisor.py), and a draining shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from stagecoach.cluster.config import ClusterConfig
from stagecoach.coordinator.api import build_runner
from stagecoach.coordinator.request_checks import sampling_defaults
from stagecoach.coordinator.server_state import ServerState
from stagecoach.coordinator.supervisor import EngineSupervisor
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.errors import ConfigError
from stagecoach.proto import gguf
from stagecoach.proto.model_config import ModelConfig

log = logging.getLogger("stagecoach.serve")


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
    if (found := gguf.find_gguf(config.model.path)) is not None:
        gguf.check_served(found)  # every stage's part, before listening
    state = server_state(config, tokenizer, model)
    runner = build_runner(state)
    await runner.setup()
    await web.TCPSite(runner, config.server.host, config.server.port).start()
    log.warning(
        "listening on http://%s:%d (model %s; /health is 503 until the stages are ready)",
        config.server.host,
        config.server.port,
        state.model_name,
    )

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
