"""Per-stage and per-hop timing, aggregated from the timing records every microbatch carries back."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _StageWindow:
    compute_ms: deque = field(default_factory=lambda: deque(maxlen=2000))
    queue_ms: deque = field(default_factory=lambda: deque(maxlen=2000))  # arrival → compute start
    hop_ms: deque = field(default_factory=lambda: deque(maxlen=2000))  # compute end → next stage (or coordinator) has it
    num_batches: int = 0


class TimingStats:
    """Keeps the most recent microbatches' records (StageTiming messages) per stage."""

    def __init__(self) -> None:
        self._stages: dict[int, _StageWindow] = {}

    def add(self, timings: list, delivered_ns: int = 0) -> None:
        for i, t in enumerate(timings):
            w = self._stages.setdefault(t.stage_index, _StageWindow())
            w.num_batches += 1
            w.compute_ms.append((t.compute_end_ns - t.compute_start_ns) / 1e6)
            if t.received_ns:
                w.queue_ms.append((t.compute_start_ns - t.received_ns) / 1e6)
            arrival = timings[i + 1].received_ns if i + 1 < len(timings) else delivered_ns
            if arrival:
                w.hop_ms.append((arrival - t.compute_end_ns) / 1e6)

    def rows(self) -> list[dict]:
        def mean(values):
            return round(statistics.fmean(values), 3) if values else None

        def p50(values):
            return round(statistics.median(values), 3) if values else None

        return [
            {
                "stage": index,
                "microbatches": w.num_batches,
                "compute_ms_mean": mean(w.compute_ms),
                "compute_ms_p50": p50(w.compute_ms),
                "queue_ms_mean": mean(w.queue_ms),
                "hop_ms_mean": mean(w.hop_ms),
            }
            for index, w in sorted(self._stages.items())
        ]
