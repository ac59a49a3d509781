"""Per-stage and per-hop timing, from the records every microbatch carries back; rolling windows and rates.

A stage's records hold its own monotonic clock only: queue wait and compute are differences on
that clock, and the hop onward is the duration of its send (send start to the receiver's
acknowledgement) timed by the sender. The coordinator's hop to stage 0 is timed by the
coordinator. No two machines' clocks are ever subtracted.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW = 1000  # samples kept per series for percentiles
RATE_WINDOW_S = 10.0  # seconds over which rates are taken


def percentiles(values) -> dict | None:
    """p50/p95/p99 and mean of a series (None when empty)."""
    if not values:
        return None
    data = sorted(values)

    def pick(q: float) -> float:
        return data[min(len(data) - 1, int(round(q * (len(data) - 1))))]

    return {
        "p50": round(pick(0.50), 3),
        "p95": round(pick(0.95), 3),
        "p99": round(pick(0.99), 3),
        "mean": round(statistics.fmean(data), 3),
    }


class Rate:
    """Events per second over the last RATE_WINDOW_S seconds."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, float]] = deque()

    def add(self, amount: float = 1.0, now: float | None = None) -> None:
        self._events.append((now if now is not None else time.monotonic(), amount))

    def per_second(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        while self._events and self._events[0][0] < now - RATE_WINDOW_S:
            self._events.popleft()
        if not self._events:
            return 0.0
        return sum(a for _, a in self._events) / RATE_WINDOW_S


class _Stage:
    def __init__(self) -> None:
        self.compute_ms: deque = deque(maxlen=WINDOW)
        self.queue_ms: deque = deque(maxlen=WINDOW)
        self.hop_ms: deque = deque(maxlen=WINDOW)  # this stage's send onward
        self.compute_s_total = 0.0
        self.microbatches = 0
        self.rate = Rate()
        self.busy = Rate()  # compute seconds, for utilisation


# observer(kind, label, seconds): kind is "compute" | "queue" | "hop"; label the stage (or "coordinator").
Observer = Callable[[str, str, float], None]


class TimingStats:
    """Thread-safe: the engine thread adds, HTTP handlers read."""

    def __init__(self, observer: Observer | None = None) -> None:
        self._stages: dict[int, _Stage] = {}
        self._coordinator_hop_ms: deque = deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self.observer = observer

    def add(self, delivered) -> None:
        """delivered: a pipeline's Delivered (its timings and the coordinator's submit duration)."""
        now = time.monotonic()
        with self._lock:
            if delivered.submit_ns:
                self._coordinator_hop_ms.append(delivered.submit_ns / 1e6)
                self._observe("hop", "coordinator", delivered.submit_ns / 1e9)
            for t in delivered.timings:
                s = self._stages.setdefault(t.stage_index, _Stage())
                compute = (t.compute_end_ns - t.compute_start_ns) / 1e9
                s.microbatches += 1
                s.compute_s_total += compute
                s.compute_ms.append(compute * 1e3)
                s.rate.add(1.0, now)
                s.busy.add(compute, now)
                self._observe("compute", str(t.stage_index), compute)
                if t.received_ns:
                    queued = (t.compute_start_ns - t.received_ns) / 1e9
                    s.queue_ms.append(queued * 1e3)
                    self._observe("queue", str(t.stage_index), queued)
                if t.prev_send_ns:
                    s.hop_ms.append(t.prev_send_ns / 1e6)
                    self._observe("hop", str(t.stage_index), t.prev_send_ns / 1e9)

    def _observe(self, kind: str, label: str, seconds: float) -> None:
        if self.observer is not None:
            self.observer(kind, label, seconds)

    def rows(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "stage": index,
                    "microbatches": s.microbatches,
                    "microbatches_per_s": round(s.rate.per_second(now), 3),
                    "utilisation": round(min(1.0, s.busy.per_second(now)), 3),
                    "compute_seconds_total": round(s.compute_s_total, 6),
                    "compute_ms": percentiles(s.compute_ms),
                    "queue_ms": percentiles(s.queue_ms),
                    "hop_ms": percentiles(s.hop_ms),
                }
                for index, s in sorted(self._stages.items())
            ]

    def coordinator_hop(self) -> dict | None:
        with self._lock:
            return percentiles(self._coordinator_hop_ms)
