"""A stage's lifecycle as the coordinator's side drives it: one typed interface, `StageControl`, for every backend.

`stage.worker.StageWorker` implements it in the stage's process; `cluster.ray_pipeline.RayStage` gives a Ray actor
handle the same interface (and the calls' deadlines); the thread backend calls workers directly. What crosses
(Ray's control plane, or nothing at all) is these dataclasses and plain values. Health is not here: it is asked
over the stage's gRPC link, the path the microbatches take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from stagecoach.proto.types import LayerRange


@dataclass(slots=True, frozen=True)
class Loaded:
    """A stage that holds its layers' weights: how many bytes, and how many KV blocks fit beside them."""

    weight_bytes: int
    kv_blocks: int
    device: str
    formats: dict[str, int] = field(default_factory=dict)  # weight_bytes by format (float32, int8/32, …)


@dataclass(slots=True, frozen=True)
class Wiring:
    """Where a stage sends what it computed: the next stage (None on the last one) and the coordinator."""

    next_address: str | None
    coordinator_address: str


class StageControl(Protocol):
    def load(self) -> Loaded:
        """Checks the plan fits its memory and loads its layers' weights."""

    def load_progress(self) -> tuple[int, int]:
        """(bytes loaded so far, bytes to load)."""

    def start(self, num_blocks: int) -> str:
        """Allocates a KV cache of num_blocks blocks and starts the gRPC server; returns host:port."""

    def connect(self, wiring: Wiring) -> None:
        """Points the stage at the next one and at the coordinator."""

    def fence(self, min_batch_id: int) -> None:
        """Drops microbatches before min_batch_id (queued or arriving later) and forgets every sequence."""

    def check_layers(self, layers: LayerRange, min_blocks: int) -> None:
        """ConfigError, with the numbers, when `layers` and a KV cache of min_blocks blocks do not fit; changes nothing."""

    def set_layers(self, layers: LayerRange, min_batch_id: int) -> Loaded:
        """Fences, frees the KV cache and the layers it loses, reads only those it gains; serves nothing until `resize`."""

    def resize(self, num_blocks: int, min_batch_id: int) -> None:
        """A fresh KV cache of num_blocks blocks for the layers it holds (fenced first)."""

    def stop(self) -> None:
        """Stops serving and releases the stage."""
