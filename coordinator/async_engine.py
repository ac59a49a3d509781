"""The engine on its own thread, fed from asyncio: requests in, per-sequence token updates out.

The scheduler is plain, single-threaded Python: only the engine thread touches it. HTTP handlers
hand it work through a control queue (and wake it if it waits on the pipe); updates go back to
each request's asyncio queue with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.sequence import Sequence
from stagecoach.stage.batch import SamplingParams

log = logging.getLogger(__name__)

POLL_S = 0.5  # how long the engine thread waits on an idle pipe before re-checking its queue


@dataclass(slots=True)
class TokenUpdate:
    """New tokens of one sequence since the last update; finished=True carries its finish reason."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the pipeline failed: the request cannot finish


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._control: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}  # seq id → (loop, queue, tokens sent)
        self._lock = threading.Lock()  # held while the engine thread mutates state that stats() reads
        self._stopping = threading.Event()
        self.fatal_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- called from asyncio ------------------------------------------------------------------
    async def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> tuple[Sequence, asyncio.Queue]:
        """Queues a request; raises the scheduler's RequestError if it can never run."""
        if self.fatal_error:
            raise RuntimeError(self.fatal_error)
        future: Future = Future()
        updates: asyncio.Queue = asyncio.Queue()
        self._control.put(("add", prompt_token_ids, sampling, asyncio.get_running_loop(), updates, future))
        self.engine.pipeline.wake()
        seq = await asyncio.wrap_future(future)
        return seq, updates

    def abort(self, seq_id: int) -> None:
        self._control.put(("abort", seq_id))
        self.engine.pipeline.wake()

    def stats(self) -> dict:
        with self._lock:
            s = self.engine.scheduler
            return {
                "running": len(s.running),
                "waiting": len(s.waiting),
                "kv_blocks_total": s.block_manager.num_blocks,
                "kv_blocks_used": s.block_manager.num_blocks - s.block_manager.num_free_blocks,
                "block_size": s.block_manager.block_size,
                "inflight": len(self.engine.inflight),
                "peak_inflight": self.engine.peak_inflight,
                "max_inflight": self.engine.max_inflight,
                "microbatches": self.engine.num_batches,
                "preemptions": s.num_preemptions,
                "timings": self.engine.timings.rows(),
                "coordinator_hop_ms": self.engine.timings.coordinator_hop(),
            }

    def stop(self) -> None:
        self._stopping.set()
        self.engine.pipeline.wake()
        self._thread.join(timeout=10)

    # -- the engine thread --------------------------------------------------------------------
    def _apply_control(self) -> None:
        while True:
            try:
                item = self._control.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, prompt, sampling, loop, updates, future = item
                try:
                    seq = self.engine.add_request(prompt, sampling)
                except Exception as e:
                    future.set_exception(e)
                    continue
                self._streams[seq.seq_id] = (loop, updates, 0)
                future.set_result(seq)
            else:
                seq = self.engine.scheduler.sequences.get(item[1])
                if seq is not None and not seq.is_finished:
                    self.engine.scheduler.abort(seq.seq_id)
                    self._publish(seq)

    def _publish(self, seq: Sequence) -> None:
        entry = self._streams.get(seq.seq_id)
        if entry is None:
            return
        loop, updates, sent = entry
        n = len(seq.output_token_ids)
        update = TokenUpdate(
            seq.output_token_ids[sent:n], seq.output_logprobs[sent:n], seq.output_top_logprobs[sent:n],
            seq.is_finished, seq.finish_reason,
        )
        if seq.is_finished:
            del self._streams[seq.seq_id]
        else:
            self._streams[seq.seq_id] = (loop, updates, n)
        loop.call_soon_threadsafe(updates.put_nowait, update)

    def _fail_all(self, message: str) -> None:
        self.fatal_error = message
        for loop, updates, _ in self._streams.values():
            loop.call_soon_threadsafe(updates.put_nowait, TokenUpdate([], [], [], True, None, message))
        self._streams.clear()

    def _run(self) -> None:
        pipeline = self.engine.pipeline
        while not self._stopping.is_set():
            try:
                with self._lock:
                    self._apply_control()
                    self.engine.fill()
                    idle = not self.engine.inflight
                if idle:
                    # Nothing in the pipe: sleep until a request wakes us (add_request calls wake()).
                    pipeline.wait(timeout=POLL_S)
                    continue
                done = pipeline.wait(timeout=POLL_S)  # outside the lock: stats() stays responsive
                with self._lock:
                    if done is None:
                        self.engine.check_stall()
                        continue
                    for seq in self.engine.apply(done):
                        self._publish(seq)
            except Exception as e:  # the pipeline broke: every open request gets the error
                log.exception("engine loop failed")
                with self._lock:
                    self._fail_all(f"the pipeline failed: {e}")
                return
