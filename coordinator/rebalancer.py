"""Rebalancing while serving: the admin call, auto mode's trigger, the pause, and what /v1/stats shows of them (policy,
proposal and history; `Engine.reconfigure` does the change).

A rebalance is a recovery onto another split: the pipe is emptied (what is in flight is fenced
off), every running sequence goes back to waiting to be re-prefilled from its prompt and tokens so
far, and the stages change layers (each reads only the tensors of the layers it gains). Streams
see a pause; their tokens are recomputed exactly, since every draw is seeded by position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stagecoach.coordinator.commands import Rebalance
from stagecoach.coordinator.planner import StageMemory
from stagecoach.errors import ConfigError, ConflictError, PipelineError, RequestError, StagecoachError

if TYPE_CHECKING:
    from stagecoach.coordinator.engine import Engine

log = logging.getLogger(__name__)

HISTORY = 16  # rebalances kept for /v1/stats


@dataclass(slots=True)
class RebalancePolicy:
    """pipeline.rebalance, rebalance_min_gain and rebalance_cooldown_s (cluster/config.py says what each means)."""

    mode: str = "suggest"  # off | suggest | auto
    min_gain: float = 0.10
    cooldown_s: float = 300.0


class Rebalancer:
    """The engine's rebalances: `request` from any thread (the admin endpoint); `run_call` and `maybe_auto` on the loop's."""

    def __init__(self, engine: Engine, policy: RebalancePolicy) -> None:
        self.engine = engine
        self.policy = policy
        self.history: list[dict] = []  # the latest rebalances, applied or failed
        self.applied = 0
        self.failed = 0
        self.busy = False  # one queued or being applied
        self.applying = False  # the stages are changing layers now (the pause)
        self.on_applied: Callable[[dict], None] | None = None  # the server refreshes its stage list and metrics
        self._busy_lock = threading.Lock()
        self._since = time.monotonic()  # auto's cooldown runs from the start and from each rebalance

    # -- from any thread ----------------------------------------------------------------------
    def request(self, layers: list[int] | None) -> Future:
        """Queues a rebalance onto `layers` (None: the current proposal); the future gets its record.
        ConflictError while a recovery or another rebalance is under way."""
        with self._busy_lock:
            if self.engine.recovering:
                raise ConflictError(
                    f"a recovery is under way ({self.engine.failure}); rebalance once the pipeline is whole"
                )
            if self.busy:
                raise ConflictError("a rebalance is already under way")
            self.busy = True
        future: Future = Future()
        self.engine.queue_call(Rebalance(layers, future))
        return future

    def proposal(self) -> dict | None:
        """The planner's proposal for the measured speeds, within each stage's memory (None before enough microbatches)."""
        e = self.engine
        if self.policy.mode == "off":
            return None
        memory = StageMemory.of(e.pipeline.stages, e.scheduler.block_manager.num_blocks)
        return e.rates.proposal(e.layer_counts, memory)

    def stats(self) -> dict | None:
        """/v1/stats' `rebalance` object: the proposal and the mode, the rebalances so far and their pauses."""
        proposal = self.proposal()
        if proposal is None and not self.history:
            return None
        return (proposal or {"layers": self.engine.layer_counts}) | {
            "mode": self.policy.mode,
            "min_gain": self.policy.min_gain,
            "applying": self.applying,
            "applied": self.applied,
            "failed": self.failed,
            "history": list(self.history),
        }

    # -- on the loop's thread -----------------------------------------------------------------
    def run_call(self, layers: list[int] | None, future: Future) -> None:
        """The admin call: applies `layers` or the proposal. A failure while applying raises PipelineError on (a recovery).
        The rebalance stops counting as under way before its caller hears back, so that the caller's next request
        never finds it still busy."""
        outcome, error = None, None
        try:
            gain = None
            if layers is None:
                proposal = self.proposal()
                if proposal is None:
                    raise RequestError(
                        f"no proposal yet: the planner needs 32 measured microbatches, it has {len(self.engine.rates)}; "
                        f'or send {{"layers": [...]}}',
                        param="layers",
                    )
                layers, gain = proposal["proposed"], proposal["predicted_gain"]
            outcome = self.apply(layers, "admin", gain)
        except StagecoachError as e:  # PipelineError among them
            error = e
        finally:
            self.busy = False
        if error is None:
            future.set_result(outcome)
            return
        future.set_exception(error)
        if isinstance(error, PipelineError):
            raise error

    def maybe_auto(self) -> None:
        """auto: applies the proposal when its predicted gain reaches min_gain and the cooldown has passed."""
        p = self.policy
        if p.mode != "auto" or self.busy or self.engine.recovering or time.monotonic() - self._since < p.cooldown_s:
            return
        proposal = self.proposal()
        if proposal is None or proposal["predicted_gain"] < p.min_gain or proposal["proposed"] == proposal["layers"]:
            return
        with self._busy_lock:
            if self.busy:
                return
            self.busy = True
        try:
            self.apply(proposal["proposed"], "auto", proposal["predicted_gain"])
        except RequestError as e:  # the stages' memory refused it: not tried again before the cooldown
            log.warning("auto rebalance onto %s refused: %s", proposal["proposed"], e)
        finally:
            self.busy = False

    def apply(self, counts: list[int], trigger: str, predicted_gain: float | None) -> dict:
        """Moves the stages onto `counts` layers each. RequestError (nothing changed) when the split is not one of this
        pipeline's or a stage cannot hold it; PipelineError when a stage failed while applying (the recovery that
        follows brings every stage back onto the old split)."""
        e = self.engine
        current = e.layer_counts
        self._check(counts, current)
        self._since = time.monotonic()
        if counts == current:
            return self._record(current, counts, trigger, predicted_gain, 0.0, "unchanged")
        ranges = [(sum(counts[:i]), sum(counts[: i + 1])) for i in range(len(counts))]
        try:
            e.pipeline.check_layers(ranges, e.min_blocks)
        except ConfigError as err:
            raise RequestError(f"the split {counts} does not fit the stages' memory: {err}", param="layers") from None
        log.warning(
            "rebalancing (%s): layers %s → %s, predicted gain %s; running sequences are re-prefilled",
            trigger,
            current,
            counts,
            "unknown" if predicted_gain is None else f"{100 * predicted_gain:+.1f} %",
        )
        start, self.applying = time.monotonic(), True
        try:
            pause, requeued = e.reconfigure(ranges)
        except PipelineError as err:
            self.failed += 1
            self._record(current, counts, trigger, predicted_gain, time.monotonic() - start, f"failed: {err}")
            raise
        finally:
            self.applying = False
            self._since = time.monotonic()
        self.applied += 1
        record = self._record(current, counts, trigger, predicted_gain, pause, "applied", requeued)
        log.warning(
            "rebalanced in %.2f s: layers %s, %d KV blocks; re-prefilling %d sequences",
            pause,
            counts,
            e.pipeline.num_blocks,
            requeued,
        )
        if self.on_applied is not None:
            self.on_applied(record)
        return record

    def _check(self, counts, current: list[int]) -> None:
        n, total = len(current), sum(current)
        if (
            not isinstance(counts, list)
            or len(counts) != n
            or sum(c if isinstance(c, int) else 0 for c in counts) != total
            or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts)
        ):
            raise RequestError(
                f"layers must give each of the {n} stages at least one layer, {total} in all (now {current}); got {counts!r}",
                param="layers",
            )

    def _record(
        self,
        before: list[int],
        after: list[int],
        trigger: str,
        gain: float | None,
        pause_s: float,
        outcome: str,
        requeued: int = 0,
    ) -> dict:
        record = {
            "at": round(time.time(), 3),
            "trigger": trigger,
            "from": before,
            "to": after,
            "outcome": outcome,
            "predicted_gain": gain,
            "pause_s": round(pause_s, 3),
            "reprefilled": requeued,
        }
        self.history = (self.history + [record])[-HISTORY:]
        return record
