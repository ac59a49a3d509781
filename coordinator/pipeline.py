"""What the engine needs of a pipeline: cluster/backends.py has every backend (local, threads over gRPC, Ray)."""

from __future__ import annotations

from typing import Protocol

from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.types import Delivered, LayerRange, StageSummary


class Pipeline(Protocol):
    """Stages behind one interface: microbatches in, finished ones out in the order they complete."""

    stages: list[StageSummary]
    num_blocks: int
    block_size: int

    def submit(self, batch: MicroBatch) -> None: ...

    def wait(self, timeout: float | None = None) -> Delivered | None: ...

    def wake(self) -> None: ...

    def health(self) -> list:
        """Each stage's HealthReply, or the error that came instead; safe from any thread."""

    def reconfigure(self, min_batch_id: int, target: list[LayerRange] | None = None, min_blocks: int = 1) -> None:
        """Whole again and on `target` (None: the split it had): dead stages started again, layers moved, every KV cache
        of one size (at least min_blocks), microbatches before min_batch_id fenced off, every stage's sequences forgotten."""

    def check_layers(self, ranges: list[LayerRange], min_blocks: int) -> None:
        """ConfigError when a stage cannot hold ranges[i] with min_blocks KV blocks; changes nothing."""

    def shutdown(self) -> None: ...
