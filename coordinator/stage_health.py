"""Whether the stages answer, as the engine sees it: heartbeats from any thread, ordered against the engine's
reconfigurations, and the check that a late microbatch sets off on the loop's thread.

Every reconfiguration (a recovery, a rebalance, a poisoned microbatch's isolation) runs inside `reconfiguring()`.
A heartbeat that overlaps one is dropped: it may have asked stages that the reconfiguration replaced, and the
reconfiguration checks them itself.
"""

from __future__ import annotations

import contextlib
import time

from stagecoach.coordinator.pipeline import Pipeline
from stagecoach.errors import PipelineError
from stagecoach.proto.types import StageSummary

RESULT_TIMEOUT_S = 300.0  # a microbatch not back within this has failed, whatever the stages say


class StageHealth:
    def __init__(self, pipeline: Pipeline, heartbeat_interval_s: float | None) -> None:
        self.pipeline = pipeline
        # A microbatch this late makes the engine ask every stage whether it is alive (None: only the timeout).
        self.heartbeat_interval_s = heartbeat_interval_s
        # Reconfigurations begun; a heartbeat that saw this number change is void.
        self.reconfigurations = 0
        self._under_way = 0  # reconfigurations under way now (a rebalance that fails is followed by a recovery)
        self._last_check = 0.0

    @contextlib.contextmanager
    def reconfiguring(self):
        """Marks a reconfiguration (on the engine loop's thread): heartbeats that overlap it are dropped."""
        self.reconfigurations += 1
        self._under_way += 1
        try:
            yield
        finally:
            self._under_way -= 1

    def heartbeat(self) -> tuple[list[str], int] | None:
        """From any thread: 'ready' or 'failed' per stage, and the reconfigurations begun before the stages were asked;
        None when a reconfiguration was under way or began meanwhile."""
        begun = self.reconfigurations
        if self._under_way:
            return None
        replies = self.pipeline.health()
        if self._under_way or self.reconfigurations != begun:
            return None
        return ["failed" if isinstance(r, Exception) else "ready" for r in replies], begun

    def unanswered(self) -> list[tuple[StageSummary, Exception]]:
        """The stages that do not answer their health check now, with the error that came instead."""
        replies = self.pipeline.health()
        return [
            (stage, reply)
            for stage, reply in zip(self.pipeline.stages, replies, strict=True)
            if isinstance(reply, Exception)
        ]

    def check_late(self, oldest_sent: float) -> None:
        """PipelineError when the oldest microbatch in flight (sent at monotonic oldest_sent) is overdue or, once it is
        late, a stage does not answer (asked at most once per heartbeat interval)."""
        now = time.monotonic()
        waited = now - oldest_sent
        if waited > RESULT_TIMEOUT_S:
            raise PipelineError(f"a microbatch has not come back within {RESULT_TIMEOUT_S:g} s")
        interval = self.heartbeat_interval_s
        if interval is not None and waited > interval and now - self._last_check > interval:
            self._last_check = now
            for stage, error in self.unanswered():
                raise PipelineError(f"stage {stage.index} at {stage.address} does not answer: {error}")
