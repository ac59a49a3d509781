"""A stage's executor: admits checked microbatches in order, runs them through the runner on its compute thread, and
passes each output on.

A compute thread runs the queue in arrival order and queues each output on the next stage's Link (or, from the
last stage, its sampled tokens on the coordinator's Deliveries stream); gRPC's sending thread encodes and sends it
while the compute thread goes on to the next microbatch. `fence` drops what came before a reconfiguration.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc
import torch

from stagecoach.errors import StaleBatchError
from stagecoach.proto import codec
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.link import DeliverySender, LinkSender, keep_freed_buffers, link_message
from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.security import LinkSecurity, open_channel
from stagecoach.proto.server import channel_options
from stagecoach.stage.runner import Prepared, StageRunner
from stagecoach.stage.testing_knobs import StageTesting

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 60.0


@dataclass
class _Work:
    prepared: Prepared
    timings: list
    timing: pb.StageTiming = field(default_factory=pb.StageTiming)

    @property
    def batch(self) -> MicroBatch:
        return self.prepared.batch


class StageLoop:
    """Runs queued microbatches through the runner and sends the results downstream."""

    def __init__(
        self,
        runner: StageRunner,
        index: int,
        max_message_bytes: int,
        security: LinkSecurity | None = None,
        testing: StageTesting | None = None,
    ) -> None:
        self.runner = runner
        self.security = security
        self.index = index
        self.max_message_bytes = max_message_bytes
        self.testing = testing  # the testing: knobs' delay and slowdown (None: none)
        self.batches_done = 0
        self.compute_ns_total = 0
        self.errors = 0
        self._last_send: tuple[int, int] = (0, 0)  # (batch id, duration ns) of the latest onward send
        self._unacked: dict[int, list] = {}  # batch id → timings of a microbatch sent on but not yet acknowledged
        self.min_batch_id = 0  # after a recovery, older microbatches are stale: never computed, never sent
        keep_freed_buffers()  # activations' buffers reuse mapped pages instead of faulting in fresh ones
        self._admit_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[_Work | threading.Event | None] = queue.SimpleQueue()
        self._next: LinkSender | None = None
        self._deliveries: DeliverySender | None = None
        self._channels: list[grpc.Channel] = []
        self._wired = threading.Event()
        self._thread = threading.Thread(target=self._compute_loop, name=f"stage{index}-compute", daemon=True)
        self._thread.start()

    # -- wiring -----------------------------------------------------------------------------
    def connect(self, next_address: str | None, coordinator_address: str) -> None:
        """Points this stage at the next one (None on the last stage) and at the coordinator."""
        self._close_links()
        opts = channel_options(self.max_message_bytes)
        coord = open_channel(coordinator_address, opts, self.security)
        self._channels = [coord]
        self._deliveries = DeliverySender(coord, on_ack=self._on_delivered)
        self._next = None
        if next_address is not None:
            nxt = open_channel(next_address, opts, self.security)
            self._channels.append(nxt)
            self._next = LinkSender(nxt, on_ack=self._on_ack)
        self._wired.set()

    def _close_links(self) -> None:
        for sender in (self._next, self._deliveries):
            if sender is not None:
                sender.close()
        for ch in self._channels:
            ch.close()

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize()

    def fence(self, min_batch_id: int) -> None:
        """Fences off everything from before a recovery: queued work older than min_batch_id is dropped,
        and the stage forgets its sequences (the re-prefill brings them again).

        The block tables belong to the admitting side and are cleared here; the last stage's histories
        belong to the compute thread, which may still be finishing an old microbatch: it clears them
        itself, in order, and this waits for it.
        """
        cleared = threading.Event()
        with self._admit_lock:
            self.min_batch_id = min_batch_id
            if self.runner is not None:  # None while a rebalance changes this stage's layers
                self.runner.sequences.clear()
            self._inbox.put(cleared)
        if not cleared.wait(SEND_TIMEOUT_S):
            log.error(
                "stage %d: the compute thread did not reach the recovery's fence within %g s",
                self.index,
                SEND_TIMEOUT_S,
            )

    def is_stale(self, batch_id: int) -> bool:
        return batch_id < self.min_batch_id

    def admit(self, batch: MicroBatch, inputs: torch.Tensor | None, timings, received_ns: int) -> None:
        """Checks one microbatch, applies it to this stage's sequences and queues it: a StagecoachError refuses it.

        One at a time, so the queue's order is the order in which the sequences' state changed.
        """
        with self._admit_lock:
            if self.is_stale(batch.batch_id):
                raise StaleBatchError(f"microbatch {batch.batch_id} is from before a recovery")
            if self.runner is None:
                raise StaleBatchError(
                    f"microbatch {batch.batch_id} came while this stage changes its layers (a rebalance)"
                )
            work = _Work(self.runner.prepare(batch, inputs), list(timings))
            work.timing.stage_index = self.index
            work.timing.received_ns = received_ns
            self._inbox.put(work)

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=5)
        self._close_links()

    # -- threads ----------------------------------------------------------------------------
    def _compute_loop(self) -> None:
        while (work := self._inbox.get()) is not None:
            self._compute(work)

    def _compute(self, work: _Work | threading.Event) -> None:
        if isinstance(work, threading.Event):  # a fence (see `fence`)
            if self.runner is not None and self.runner.sampler is not None:
                self.runner.sampler.forget_all()
            work.set()
            return
        if self.is_stale(work.batch.batch_id):
            return
        work.timing.compute_start_ns = time.monotonic_ns()
        try:
            out = self.runner.execute(work.prepared)
            work.timing.layers_ns = out.layers_ns
            if self.testing is not None:
                self._misbehave(work, out)
        except Exception as e:  # reported to the coordinator, which owns the requests
            log.exception("stage %d: microbatch %d failed", self.index, work.batch.batch_id)
            out = e
        work.timing.compute_end_ns = time.monotonic_ns()
        self.compute_ns_total += work.timing.compute_end_ns - work.timing.compute_start_ns
        if not self.is_stale(work.batch.batch_id):
            self._pass_on(work, out)
        self.batches_done += 1

    def _misbehave(self, work: _Work, out) -> None:
        """The testing: knobs' slower stage: a device as many times slower (its layers and its fixed work alike), then
        a fixed delay."""
        t = self.testing
        if t.slowdown > 1:
            time.sleep((t.slowdown - 1) * (time.monotonic_ns() - work.timing.compute_start_ns) / 1e9)
            work.timing.layers_ns = int(out.layers_ns * t.slowdown)
        if t.delay_ms:
            time.sleep(t.delay_ms / 1e3)

    def _pass_on(self, work: _Work, out) -> None:
        """Queues the output on the next stage's Link, or the last stage's tokens on the Deliveries stream."""
        batch_id = work.batch.batch_id
        if isinstance(out, Exception):
            self._failed(batch_id, work.timings, f"stage {self.index}: {type(out).__name__}: {out}")
            return
        work.timing.prev_send_batch_id, work.timing.prev_send_ns = self._last_send
        timings = work.timings + [work.timing]
        try:
            if not self._wired.wait(SEND_TIMEOUT_S):
                raise ConnectionError("this stage was never connected to its neighbours")
            if self._next is not None:
                self._unacked[batch_id] = work.timings
                self._next.send(*link_message(work.batch, out.hidden_states, timings))  # acknowledged later, in _on_ack
            else:
                self._deliveries.send(
                    pb.Delivery(batch_id=batch_id, samples=codec.encode_samples(out.samples), timings=timings)
                )
        except Exception as e:
            self._unacked.pop(batch_id, None)
            self._failed(batch_id, work.timings, f"stage {self.index} could not pass microbatch {batch_id} on: {e}")

    def _on_ack(self, batch_id: int, hop_ns: int, error: Exception | None) -> None:
        """The next stage's answer to a microbatch this stage sent on (on the link's reader thread)."""
        timings = self._unacked.pop(batch_id, [])
        if error is None:
            self._last_send = (batch_id, hop_ns)
        elif not self.is_stale(batch_id):
            self._failed(batch_id, timings, f"stage {self.index} could not pass microbatch {batch_id} on: {error}")

    def _on_delivered(self, batch_id: int, hop_ns: int, error: Exception | None) -> None:
        """The coordinator's answer to a delivery; one that did not arrive leaves its microbatch overdue there."""
        if error is None:
            if self._next is None:
                self._last_send = (batch_id, hop_ns)
        elif not self.is_stale(batch_id):
            self.errors += 1
            log.error(
                "stage %d: the coordinator did not take the delivery of microbatch %d: %s", self.index, batch_id, error
            )

    def _failed(self, batch_id: int, timings: list, error: str) -> None:
        self.errors += 1
        log.error("%s", error)
        if self._deliveries is None:
            log.error(
                "stage %d: not connected to the coordinator yet: microbatch %d's failure is not reported",
                self.index,
                batch_id,
            )
            return
        try:
            self._deliveries.send(pb.Delivery(batch_id=batch_id, error=error, error_stage=self.index, timings=timings))
        except Exception as e:
            log.error("stage %d: the coordinator is unreachable too: %s", self.index, e)
