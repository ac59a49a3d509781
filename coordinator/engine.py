"""The engine loop: keep up to max_inflight microbatches in the pipe, apply sampled tokens as they return."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from stagecoach.coordinator.metrics import TimingStats
from stagecoach.coordinator.pipeline import Delivered, Pipeline, PipelineError
from stagecoach.coordinator.scheduler import Scheduler, SchedulerConfig
from stagecoach.coordinator.sequence import Sequence
from stagecoach.stage.batch import MicroBatch, SamplingParams


def sampling_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (HF semantics: do_sample false → greedy)."""
    path = Path(model_dir) / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if gen.get(k) is not None}
    if not gen.get("do_sample", False):
        defaults["temperature"] = 0.0
    return defaults


class Engine:
    """Continuous batching over a pipeline: requests join and leave between microbatches.

    Up to `max_inflight` microbatches travel at once (one per stage keeps every stage busy);
    each holds about 1/max_inflight of the running sequences, so their sizes stay even.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        scheduler_config: SchedulerConfig,
        stop_token_ids: list[int] | None = None,
        max_inflight: int = 1,
        result_timeout_s: float = 300.0,
        heartbeat_interval_s: float = 2.0,
    ) -> None:
        self.pipeline = pipeline
        self.scheduler = Scheduler(scheduler_config)
        self.stop_token_ids = list(stop_token_ids or [])
        self.max_inflight = max_inflight
        self.result_timeout_s = result_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s  # a microbatch this late makes the engine ask every stage whether it is alive
        self.inflight: dict[int, tuple[MicroBatch, float]] = {}  # batch id → (batch, monotonic send time)
        self.peak_inflight = 0
        self.num_batches = 0
        self.timings = TimingStats()
        self._last_health_check = 0.0
        self.recoveries: list[float] = []  # seconds each recovery took

    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        if sampling.seed is None:
            # Every draw is seeded from (seed, position): a request without a seed gets a random
            # one, so that recomputing it after a preemption or a fault gives the same tokens.
            sampling.seed = random.getrandbits(63)
        if not sampling.stop_token_ids:
            sampling.stop_token_ids = list(self.stop_token_ids)
        return self.scheduler.add_request(prompt_token_ids, sampling)

    def fill(self) -> None:
        """Submits microbatches until max_inflight are in the pipe or nothing more can run."""
        while len(self.inflight) < self.max_inflight:
            unfinished = len(self.scheduler.running) + len(self.scheduler.waiting)
            batch = self.scheduler.schedule(max_seqs=max(1, -(-unfinished // self.max_inflight)))
            if batch is None:
                return
            self.pipeline.submit(batch)
            self.inflight[batch.batch_id] = (batch, time.monotonic())
            self.num_batches += 1
            self.peak_inflight = max(self.peak_inflight, len(self.inflight))

    def step(self, timeout: float | None = None) -> list[Sequence]:
        """Tops up the pipe, then applies the next microbatch that comes back within timeout seconds.

        Returns the sequences that got a token (none on a timeout or a wake-up).
        """
        self.fill()
        if not self.inflight:
            assert not self.scheduler.has_unfinished, "unfinished sequences but nothing schedulable or in flight"
            return []
        done = self.pipeline.wait(timeout=self.result_timeout_s if timeout is None else timeout)
        if done is None:
            self.check_stall()
            return []
        return self.apply(done)

    def apply(self, done: Delivered) -> list[Sequence]:
        """Applies a returned microbatch: appends tokens, finishes sequences, frees their blocks."""
        if done.batch_id not in self.inflight:
            return []  # from before a recovery: its sequences have been re-prefilled since
        batch, _ = self.inflight.pop(done.batch_id)
        if done.error:
            raise PipelineError(f"microbatch {done.batch_id} failed: {done.error}")
        self.timings.add(done)
        return self.scheduler.process_results(batch, done.samples)

    def recover(self) -> float:
        """After a stage failure: restart what died, rewire, and re-prefill every running sequence from
        its prompt plus the tokens it already has. Returns the seconds it took."""
        start = time.monotonic()
        self.inflight.clear()
        self.scheduler.recompute_all()
        self.pipeline.recover(self.scheduler.next_batch_id)
        took = time.monotonic() - start
        self.recoveries.append(took)
        return took

    def check_stall(self) -> None:
        """Raises PipelineError when a microbatch is overdue or, once one is late, a stage stops answering."""
        if not self.inflight:
            return
        now = time.monotonic()
        waited = now - min(sent for _, sent in self.inflight.values())
        if waited > self.result_timeout_s:
            raise PipelineError(f"a microbatch has not come back within {self.result_timeout_s:g} s")
        if waited > self.heartbeat_interval_s and now - self._last_health_check > self.heartbeat_interval_s:
            self._last_health_check = now
            self.pipeline.check_health()

    def run(self) -> None:
        while self.scheduler.has_unfinished:
            self.step()

    def generate(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> list[Sequence]:
        seqs = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        self.run()
        return seqs
