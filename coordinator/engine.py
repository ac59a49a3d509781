"""The engine: continuous batching over a pipeline, its one loop, and its API (add, abort, stats, recover, health).

Up to `max_inflight` microbatches travel at once (one per stage keeps every stage busy); each
holds about 1/max_inflight of the running sequences, so their sizes stay even. The loop runs on
one thread, which alone touches the scheduler; other threads call `submit_request`, `abort`,
`report_failure`, `stats` and `check_stages`, which are safe from anywhere (coordinator/stage_health.py orders
heartbeats against the engine's reconfigurations).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from stagecoach.coordinator.commands import Abort, AddRequests, Command, Rebalance, StageFailed
from stagecoach.coordinator.pipeline import Pipeline
from stagecoach.coordinator.planner import StageRates
from stagecoach.coordinator.rebalancer import RebalancePolicy, Rebalancer
from stagecoach.coordinator.scheduler import Scheduler, SchedulerConfig
from stagecoach.coordinator.sequence import Listener, Sequence, TokenUpdate
from stagecoach.coordinator.speculative import Speculation
from stagecoach.coordinator.stage_health import RESULT_TIMEOUT_S, StageHealth
from stagecoach.coordinator.timings import TimingStats
from stagecoach.errors import PipelineError, StagecoachError, StageComputeError
from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.types import Delivered, LayerRange, SamplingParams

log = logging.getLogger(__name__)

POLL_S = 0.5  # how long a serving loop waits on an idle pipe before it looks at its calls again


class Engine:
    """Continuous batching over a pipeline: requests join and leave between microbatches."""

    def __init__(
        self,
        pipeline: Pipeline,
        scheduler_config: SchedulerConfig,
        stop_token_ids: list[int] | None = None,
        max_inflight: int = 1,
        heartbeat_interval_s: float | None = None,
        recovery_timeout_s: float | None = None,
        crash_token_id: int | None = None,
        rebalance: RebalancePolicy | None = None,
        speculation: Speculation | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.scheduler = Scheduler(scheduler_config, speculation)
        self.stop_token_ids = list(stop_token_ids or [])
        self.max_inflight = max_inflight
        self.recovery_timeout_s = recovery_timeout_s  # requests waiting longer than this for a recovery end with 503
        self.crash_token_id = crash_token_id  # testing.engine_crash_token_id
        self.inflight: dict[int, tuple[MicroBatch, float]] = {}  # batch id → (batch, monotonic send time)
        self.peak_inflight = 0
        self.num_batches = 0
        self.timings = TimingStats()
        self.rates = StageRates()  # each stage's measured speed, for the rebalancing proposal
        self.rebalancer = Rebalancer(self, rebalance or RebalancePolicy())
        self.recoveries: list[float] = []  # seconds each recovery took
        self.on_recovery: Callable[[float], None] | None = None
        self.microbatch_failures = 0  # microbatches a stage failed while staying up
        self.failed_requests: dict[str, int] = {"stage_error": 0}  # sequences ended with an error, by reason
        # (stage, the errors it ended sequences with)
        self.on_microbatch_failure: Callable[[int | None, list[StagecoachError]], None] | None = None
        self.failure: str | None = None  # why the pipeline cannot serve now (it is recovering); None when whole
        self.health = StageHealth(pipeline, heartbeat_interval_s)  # heartbeats, ordered against reconfigurations
        self._listeners: dict[int, tuple[Listener, int]] = {}  # seq id → (listener, tokens sent)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._calls_lock = threading.Lock()  # orders submit_request against close
        self._closed: StagecoachError | None = None  # set once the loop has ended for good
        self._lock = threading.Lock()  # held while the loop mutates what stats() reads
        self._last_stats: dict = {}

    # -- the API, from any thread -------------------------------------------------------------
    def submit_request(
        self, requests: list[tuple[list[int], SamplingParams]], listener: Callable[[int], Listener]
    ) -> Future:
        """Queues requests for the loop; the future gets their Sequences, or the RequestError of the first that can
        never run (then none is added). listener(seq_id) gives the callback for that sequence's TokenUpdates."""
        future: Future = Future()
        with self._calls_lock:
            if self._closed is not None:
                future.set_exception(self._closed)
                return future
            self._calls.put(AddRequests(requests, listener, future))
        self.pipeline.wake()
        return future

    def abort(self, seq_id: int) -> None:
        self.queue_call(Abort(seq_id))

    def queue_call(self, call: Command) -> None:
        """For the loop's thread to carry out between microbatches (see _apply_calls)."""
        self._calls.put(call)
        self.pipeline.wake()

    @property
    def recovering(self) -> bool:
        return self.failure is not None

    def report_failure(self, reason: str, reconfigurations: int) -> None:
        """A missed heartbeat while the pipe may be idle: have the loop recover. `reconfigurations`: how many had
        begun when the stages were asked (the loop drops the report if one has begun since: it answers it already)."""
        if not self.recovering:
            self.queue_call(StageFailed(reason, reconfigurations))

    def check_stages(self) -> list[str] | None:
        """Asks every stage whether it is alive: 'ready' or 'failed' per stage; a failed one starts a recovery.
        None when a reconfiguration was under way or began meanwhile: the answers may be those of stages it replaced."""
        heard = self.health.heartbeat()
        if heard is None:
            return None
        states, begun = heard
        failed = [str(i) for i, state in enumerate(states) if state == "failed"]
        if failed:
            self.report_failure(f"stage {', '.join(failed)} missed its heartbeat", begun)
        return states

    def stats(self, with_timings: bool = True) -> dict:
        """A snapshot for /v1/stats and /metrics; during a recovery (which holds the lock) the last one.

        with_timings=False skips the per-stage percentiles (the /metrics gauges need only counters).
        """
        if not self._lock.acquire(timeout=0.05):
            return self._last_stats | {"recovering": self.recovering, "rebalancing": self.rebalancer.applying}
        try:
            self._last_stats = self.scheduler.stats() | {
                "inflight": len(self.inflight),
                "peak_inflight": self.peak_inflight,
                "max_inflight": self.max_inflight,
                "microbatches": self.num_batches,
                "recoveries": len(self.recoveries),
                "recovery_seconds": [round(t, 3) for t in self.recoveries],
                "recovering": self.recovering,
                "rebalancing": self.rebalancer.applying,
                "microbatch_failures": self.microbatch_failures,
                "requests_failed": dict(self.failed_requests),
            }
            self._last_stats["rebalance"] = self.rebalancer.stats()
            spec = self.scheduler.speculation
            self._last_stats["speculative"] = spec.stats() if spec is not None else Speculation.stats_off()
            if with_timings:
                self._last_stats |= {
                    "timings": self.timings.rows(),
                    "coordinator_hop_ms": self.timings.coordinator_hop(),
                }
            return dict(self._last_stats)
        finally:
            self._lock.release()

    # -- the API, on the loop's thread (or before the loop runs) ------------------------------
    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        return self.add_requests([(prompt_token_ids, sampling)])[0]

    def add_requests(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
        """All or none: RequestError for the first request that can never run, and then none is added. The caller's
        SamplingParams are left as they are: each sequence gets its own, completed."""
        completed = []
        for prompt, sampling in requests:
            # Every draw is seeded from (seed, position): a request without a seed gets a random
            # one, so that recomputing it after a preemption or a fault gives the same tokens.
            seed = random.getrandbits(63) if sampling.seed is None else sampling.seed
            stops = list(sampling.stop_token_ids or self.stop_token_ids)
            completed.append((prompt, dataclasses.replace(sampling, seed=seed, stop_token_ids=stops)))
        return self.scheduler.add_requests(completed)

    def generate(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> list[Sequence]:
        """Runs the prompts to their end on this thread; a stage failure raises (`supervisor.run_engine` recovers it)."""
        seqs = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        self.run()
        return seqs

    def reconfigure(self, target: list[LayerRange] | None = None) -> tuple[float, int]:
        """The one place that changes running stages (a recovery: target None; a rebalance: its split): voids what is in
        flight, sends every running sequence back to be re-prefilled from its prompt plus the tokens it has, has the
        pipeline whole again on `target`, and sizes the block manager to the stages' caches. (seconds, sequences sent
        back). A rebalance that fails raises PipelineError: the recovery that follows goes back to the old split."""
        start = time.monotonic()
        with self.health.reconfiguring():
            self.inflight.clear()
            requeued = self.scheduler.recompute_all()
            try:
                self.pipeline.reconfigure(self.scheduler.next_batch_id, target, self.min_blocks)
            except Exception as e:
                if target is None:
                    raise
                raise PipelineError(
                    f"the rebalance onto layers {list(target)} failed ({e}); going back to "
                    f"{[s.layers for s in self.pipeline.stages]}"
                ) from None
            if self.pipeline.num_blocks != self.scheduler.block_manager.num_blocks:  # a stage started again holds fewer
                self.scheduler.resize_blocks(self.pipeline.num_blocks)
        return time.monotonic() - start, requeued

    def recover(self) -> float:
        """One recovery attempt (supervisor.recover_until_whole retries): the pipeline whole again on its split, every
        running sequence re-prefilled. The seconds it took, also kept in `recoveries`."""
        with self._lock:
            took, _ = self.reconfigure()
            self.recoveries.append(took)
        return took

    @property
    def min_blocks(self) -> int:
        """The KV blocks of the longest request the engine admits: no reconfiguration may leave a stage with fewer."""
        bm = self.scheduler.block_manager
        return -(-min(self.scheduler.config.max_model_len, bm.num_blocks * bm.block_size) // bm.block_size)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """The engine loop: serving until `stop` is set, or (without one) until every request has finished. A stage
        failure raises PipelineError (`supervisor.run_engine` recovers the pipeline and runs the loop again)."""
        while not stop.is_set() if stop is not None else self.scheduler.has_unfinished:
            with self._lock:
                self._apply_calls()
                self.rebalancer.maybe_auto()
            self.step(POLL_S if stop is not None else RESULT_TIMEOUT_S)

    def step(self, timeout: float) -> list[Sequence]:
        """Tops up the pipe, then applies the next microbatch that comes back within timeout seconds.

        Returns the sequences that got a token (none on a timeout or a wake-up), each published to its listener.
        """
        with self._lock:
            self.fill()
        done = self.pipeline.wait(timeout=timeout)  # outside the lock: stats() stays responsive
        with self._lock:
            if done is None:
                self.check_stall()
                return []
            updated = self.apply(done)
            for seq in updated:
                self._publish(seq)
            return updated

    def fill(self) -> None:
        """Submits microbatches until max_inflight are in the pipe or nothing more can run."""
        while len(self.inflight) < self.max_inflight:
            unfinished = len(self.scheduler.running) + len(self.scheduler.waiting)
            batch = self.scheduler.schedule(max_seqs=max(1, -(-unfinished // self.max_inflight)))
            if batch is None:
                assert self.inflight or not self.scheduler.has_unfinished, (
                    "unfinished sequences but nothing schedulable or in flight"
                )
                return
            if self.crash_token_id is not None and self.crash_token_id in batch.token_ids:
                raise RuntimeError(
                    f"testing.engine_crash_token_id: microbatch {batch.batch_id} holds token {self.crash_token_id}"
                )
            self.pipeline.submit(batch)
            self.inflight[batch.batch_id] = (batch, time.monotonic())
            self.num_batches += 1
            self.peak_inflight = max(self.peak_inflight, len(self.inflight))

    def apply(self, done: Delivered) -> list[Sequence]:
        """Applies a returned microbatch: appends tokens, finishes sequences, frees their blocks."""
        if done.batch_id not in self.inflight:
            return []  # from before a recovery: its sequences have been re-prefilled since
        batch, _ = self.inflight.pop(done.batch_id)
        if done.error:
            with self.health.reconfiguring():
                self._microbatch_failed(batch, done)
            return []
        self.timings.add(done)
        self.rates.add(batch, done.timings, self.layer_counts)
        if self.scheduler.speculation is not None:
            self.scheduler.speculation.observe(batch, done.timings)
        return self.scheduler.process_results(batch, done.samples)

    @property
    def layer_counts(self) -> list[int]:
        return [end - start for start, end in (s.layers for s in self.pipeline.stages)]

    def _microbatch_failed(self, batch: MicroBatch, done: Delivered) -> None:
        """A failed microbatch: a stage that does not answer starts a recovery (PipelineError); a stage that is
        up failed this microbatch only. Then its sequences are retried, each alone, and a sequence that fails
        again ends with StageComputeError (500) while every other goes on."""
        where = "before stage 0" if done.error_stage is None else f"at stage {done.error_stage}"
        dead = self.health.unanswered()
        if dead:
            listing = ", ".join(f"stage {stage.index} ({error})" for stage, error in dead)
            raise PipelineError(
                f"microbatch {done.batch_id} failed {where} ({done.error}), and {listing} does not answer"
            )
        self.microbatch_failures += 1
        others = [b for b, _ in self.inflight.values()]
        ended, void = self.scheduler.microbatch_failed(batch, others)
        for batch_id in void:
            self.inflight.pop(batch_id, None)
        log.warning(
            "microbatch %d (sequences %s) failed %s while every stage stayed up: %s; retrying them alone%s",
            done.batch_id,
            [c.seq_id for c in batch.seqs],
            where,
            done.error,
            f" (void too: microbatches {sorted(void)})" if len(void) > 1 else "",
        )
        errors = [
            StageComputeError(
                f"this request's microbatch failed {seq.num_failures} times, the last time on its own and {where}, "
                f"while every stage stayed up: {done.error}"
            )
            for seq in ended
        ]
        for seq, error in zip(ended, errors, strict=False):
            log.error("sequence %d ends after %d failed microbatches: %s", seq.seq_id, seq.num_failures, done.error)
            self.failed_requests["stage_error"] += 1
            self._publish(seq, error)
        if self.on_microbatch_failure is not None:
            self.on_microbatch_failure(done.error_stage, errors)

    def check_stall(self) -> None:
        """Raises PipelineError when a microbatch is overdue or, once one is late, a stage stops answering."""
        if self.inflight:
            self.health.check_late(min(sent for _, sent in self.inflight.values()))

    def close(self, error: StagecoachError) -> None:
        """The loop has ended for good: every open request, queued or running, and every later one gets the error."""
        with self._calls_lock:
            self._closed = error
            for call in self._take_calls():
                if isinstance(call, (AddRequests, Rebalance)):
                    call.future.set_exception(error)
        self.fail_all(error)

    def fail_all(self, error: StagecoachError) -> None:
        """Ends every open request with the error (their sequences are aborted and freed)."""
        with self._lock:
            for seq_id, (listener, _) in self._listeners.items():
                listener(TokenUpdate([], [], [], True, None, error))
                self.scheduler.abort(seq_id)
            self._listeners.clear()

    def _take_calls(self):
        """The calls queued so far, oldest first."""
        while True:
            try:
                yield self._calls.get_nowait()
            except queue.Empty:
                return

    def _apply_calls(self) -> None:
        for call in self._take_calls():
            match call:
                case AddRequests(requests, listener, future):
                    self._add_all(requests, listener, future)
                case Abort(seq_id):
                    seq = self.scheduler.sequences.get(seq_id)
                    if seq is not None and not seq.is_finished:
                        self.scheduler.abort(seq_id)
                        self._publish(seq)
                case Rebalance(layers, future):
                    self.rebalancer.run_call(layers, future)
                case StageFailed(reason, reconfigurations):
                    if reconfigurations == self.health.reconfigurations:  # else one since the report has answered it
                        raise PipelineError(reason)
                case _:
                    raise AssertionError(f"unknown engine command {call!r}")

    def _add_all(self, requests: list, listener: Callable[[int], Listener], future: Future) -> None:
        try:
            seqs = self.add_requests(requests)
        except StagecoachError as e:
            future.set_exception(e)
            return
        for seq in seqs:
            self._listeners[seq.seq_id] = (listener(seq.seq_id), 0)
        future.set_result(seqs)

    def _publish(self, seq: Sequence, error: StagecoachError | None = None) -> None:
        """The tokens its listener has not seen yet; a finished sequence's last update (with `error`, if it failed)."""
        entry = self._listeners.get(seq.seq_id)
        if entry is None:
            return
        listener, sent = entry
        n = len(seq.output_token_ids)
        update = TokenUpdate(
            seq.output_token_ids[sent:n],
            seq.output_logprobs[sent:n],
            seq.output_top_logprobs[sent:n],
            seq.is_finished,
            None if error else seq.finish_reason,
            error,
            seq.num_cached_tokens or 0,
        )
        if seq.is_finished:
            del self._listeners[seq.seq_id]
        else:
            self._listeners[seq.seq_id] = (listener, n)
        listener(update)
