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
import time
from concurrent.futures import Future
from dataclasses import dataclass

from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.pipeline import PipelineError
from stagecoach.coordinator.sequence import Sequence
from stagecoach.stage.batch import SamplingParams

log = logging.getLogger(__name__)

POLL_S = 0.5  # how long the engine thread waits on an idle pipe before re-checking its queue
RETRY_S = 2.0  # between recovery attempts


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
    def __init__(self, engine: Engine, recovery_timeout_s: float = 60.0, on_recovery=None) -> None:
        self.engine = engine
        self.recovery_timeout_s = recovery_timeout_s  # requests waiting longer than this for a recovery get 503
        self.on_recovery = on_recovery  # called with the seconds each successful recovery took
        self.recovering = False
        self._last_stats: dict = {}
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
        future: Future = Future()
        updates: asyncio.Queue = asyncio.Queue()
        self._control.put(("add", prompt_token_ids, sampling, asyncio.get_running_loop(), updates, future))
        self.engine.pipeline.wake()
        seq = await asyncio.wrap_future(future)
        return seq, updates

    def report_failure(self, reason: str) -> None:
        """A missed heartbeat while the pipe may be idle: have the engine thread recover."""
        if not self.recovering:
            self._control.put(("fail", reason))
            self.engine.pipeline.wake()

    def abort(self, seq_id: int) -> None:
        self._control.put(("abort", seq_id))
        self.engine.pipeline.wake()

    def stats(self, with_timings: bool = True) -> dict:
        """A snapshot for /v1/stats and /metrics; during a recovery (which holds the lock) the last one.

        with_timings=False skips the per-stage percentiles (the /metrics gauges need only counters).
        """
        if not self._lock.acquire(timeout=0.05):
            return self._last_stats | {"recovering": self.recovering}
        try:
            s = self.engine.scheduler
            self._last_stats = {
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
                "recoveries": len(self.engine.recoveries),
                "recovery_seconds": [round(t, 3) for t in self.engine.recoveries],
                "recovering": self.recovering,
            }
            if with_timings:
                self._last_stats |= {"timings": self.engine.timings.rows(), "coordinator_hop_ms": self.engine.timings.coordinator_hop()}
            return dict(self._last_stats)
        finally:
            self._lock.release()

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
            elif item[0] == "fail":
                raise PipelineError(item[1])
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
        """Ends every open request with the error (their sequences are aborted and freed)."""
        for seq_id, (loop, updates, _) in self._streams.items():
            loop.call_soon_threadsafe(updates.put_nowait, TokenUpdate([], [], [], True, None, message))
            self.engine.scheduler.abort(seq_id)
        self._streams.clear()

    def _recover(self, cause: Exception) -> None:
        """Brings the pipeline back; past the deadline, open requests end with 503 and new ones get 503
        until it is whole again. Streams that survive see a pause, not an error."""
        log.warning("the pipeline failed (%s): recovering", cause)
        self.recovering = True
        self.fatal_error = f"the pipeline is recovering from: {cause}"
        deadline = time.monotonic() + self.recovery_timeout_s
        failed_open_requests = False
        while not self._stopping.is_set():
            try:
                with self._lock:
                    took = self.engine.recover()
                log.warning("recovered in %.2f s; re-prefilling %d sequences", took, len(self.engine.scheduler.waiting))
                if self.on_recovery is not None:
                    self.on_recovery(took)
                self.recovering = False
                self.fatal_error = None
                return
            except Exception as e:
                log.warning("recovery attempt failed: %s", e)
                if time.monotonic() > deadline and not failed_open_requests:
                    with self._lock:
                        self._fail_all(f"stage failure: the pipeline did not recover within {self.recovery_timeout_s:g} s ({e})")
                    failed_open_requests = True
                self._stopping.wait(RETRY_S)

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
            except PipelineError as e:  # a stage failed: recover, and carry on
                self._recover(e)
            except Exception as e:  # a bug: every open request gets the error, and the engine stops
                log.exception("engine loop failed")
                self.fatal_error = f"the engine failed: {e}"
                with self._lock:
                    self._fail_all(self.fatal_error)
                return
