"""The engine's loop on its own thread, called from asyncio: this module only moves calls and updates between the two.

HTTP handlers call in through the engine's thread-safe API; each sequence's TokenUpdates come
back to its asyncio queue with call_soon_threadsafe. When the loop dies on an unexpected error,
every open request ends with EngineFailure (500) and `on_crash` is told, from the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.sequence import Sequence, TokenUpdate
from stagecoach.errors import EngineFailure
from stagecoach.proto.types import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        on_crash: Callable[[BaseException], None] | None = None,
        run: Callable[[Engine, threading.Event], None] = Engine.run,
    ) -> None:
        """run: the loop to run on the thread (`supervisor.run_engine` recovers stage failures; the default does not)."""
        self.core = engine  # the Engine: its loop runs on this object's thread
        self.on_crash = on_crash
        self._run_loop = run
        self.crashed: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def add_requests(
        self, requests: list[tuple[list[int], SamplingParams]]
    ) -> list[tuple[Sequence, asyncio.Queue]]:
        """Queues requests (all or none); raises the RequestError of one that can never run."""
        loop = asyncio.get_running_loop()
        queues: dict[int, asyncio.Queue] = {}

        def listener(seq_id: int) -> Callable[[TokenUpdate], None]:
            updates = queues[seq_id] = asyncio.Queue()
            return lambda update: loop.call_soon_threadsafe(updates.put_nowait, update)

        seqs = await asyncio.wrap_future(self.core.submit_request(requests, listener))
        return [(seq, queues[seq.seq_id]) for seq in seqs]

    def abort(self, seq_id: int) -> None:
        self.core.abort(seq_id)

    @property
    def unavailable(self) -> str | None:
        """Why no request can be served now (recovering, or the loop died), or None."""
        if self.crashed is not None:
            return f"the engine failed: {self.crashed}"
        return self.core.failure

    def stop(self) -> None:
        self._stop.set()
        self.core.pipeline.wake()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._run_loop(self.core, self._stop)
        except Exception as e:  # a bug: every open request gets a 500, and the server decides whether to start anew
            log.exception("the engine loop failed")
            self.crashed = e
            self.core.close(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
            if self.on_crash is not None:
                self.on_crash(e)
