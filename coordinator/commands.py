"""What other threads ask of the engine's loop: one dataclass per call, queued and carried out between microbatches by
`Engine._apply_calls`' one `match`."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from stagecoach.coordinator.sequence import Listener
from stagecoach.proto.types import SamplingParams


@dataclass(slots=True)
class AddRequests:
    """Requests to admit, all or none; the future gets their Sequences (or the RequestError of one that can never run)."""

    requests: list[tuple[list[int], SamplingParams]]
    listener: Callable[[int], Listener]  # seq id → the callback for that sequence's TokenUpdates
    future: Future


@dataclass(slots=True)
class Abort:
    """The client went away, or the request timed out: end the sequence and free its blocks."""

    seq_id: int


@dataclass(slots=True)
class Rebalance:
    """Move the stages onto `layers` (one count per stage; None: the planner's proposal); the future gets the record."""

    layers: list[int] | None
    future: Future


@dataclass(slots=True)
class StageFailed:
    """A heartbeat found a stage that does not answer. `reconfigurations`: how many had begun when the stages were
    asked; one begun since answers the report already."""

    reason: str
    reconfigurations: int


Command = AddRequests | Abort | Rebalance | StageFailed
