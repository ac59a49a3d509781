"""What the engine needs of a pipeline: cluster/pipelines.py has every backend (local, threads over gRPC, Ray)."""

from __future__ import annotations

from typing import Protocol

from stagecoach.proto.types import Delivered, LayerRange, MicroBatch, StageSummary


class Pipeline(Protocol):
    """Stages behind one interface: microbatches in, finished ones out in the order they complete."""

    stages: list[StageSummary]
    num_blocks: int
    block_size: int

    def submit(self, batch: MicroBatch) -> None: ...

    def wait(self, timeout: float | None = None) -> Delivered | None: ...

    def wake(self) -> None: ...

    def health(self) -> list: ...

    def recover(self, min_batch_id: int) -> None: ...

    def check_layers(self, ranges: list[LayerRange], min_blocks: int) -> None: ...

    def rebalance(self, ranges: list[LayerRange], min_batch_id: int, min_blocks: int) -> None: ...

    def shutdown(self) -> None: ...
