"""Stages somewhere on the network behind the engine's `Pipeline` interface: microbatches to stage 0 on a Link, tokens back
on Deliveries streams, health over each stage's gRPC link, and the one wiring and `reconfigure` of the backends that start
their stages (threads, Ray), which drive them through `StageControl`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from stagecoach.cluster.config import TransportSection
from stagecoach.cluster.local_pipeline import Inbox
from stagecoach.errors import ConfigError, PipelineError
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc
from stagecoach.proto.codec import SCHEMA_VERSION, decode_samples
from stagecoach.proto.control import Loaded, StageControl, Wiring
from stagecoach.proto.link import LinkSender, keep_freed_buffers, link_message
from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.security import LinkSecurity, open_channel
from stagecoach.proto.server import channel_options, start_server
from stagecoach.proto.types import Delivered, LayerRange, StageSummary

log = logging.getLogger(__name__)

T = TypeVar("T")


class _CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, inbox: queue.Queue, submit_times: dict[int, int]) -> None:
        self.inbox = inbox
        self.submit_times = submit_times

    def Deliveries(self, request_iterator, context: grpc.ServicerContext):
        """One stage's deliveries, each acknowledged once queued for the engine."""
        for request in request_iterator:
            submit_ns = self.submit_times.pop(request.batch_id, 0)
            error_stage = request.error_stage if request.error else None
            samples, timings = decode_samples(request.samples), list(request.timings)
            self.inbox.put(Delivered(request.batch_id, samples, timings, request.error, error_stage, submit_ns))
            yield pb.LinkAck(batch_id=request.batch_id)


@dataclasses.dataclass(slots=True, eq=False)
class _Links:
    """One attach's channels to the stages, their stubs and the stages' summaries, replaced together."""

    channels: list[grpc.Channel]
    stubs: list[pb_grpc.StageStub]
    stages: list[StageSummary]
    calls: int = 0  # calls holding these links now (GrpcPipeline._using_links)
    retired: bool = False  # replaced: closes when calls reaches 0

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


class GrpcPipeline(Inbox):
    """Stage servers somewhere on the network: microbatches go to stage 0 on a Link, tokens come back on Deliveries streams.

    Owns the coordinator's gRPC server. `attach` alone connects to stages someone else started;
    a subclass that starts its own stages gives their `controls` and gets the wiring and `reconfigure`.
    """

    def __init__(
        self,
        host: str,
        port: int = 0,
        max_message_bytes: int | None = None,
        security: LinkSecurity | None = None,
        heartbeat_timeout_s: float | None = None,
    ) -> None:
        """max_message_bytes: None is transport.max_message_mb's default; heartbeat_timeout_s: None waits for ever."""
        super().__init__()
        max_message_bytes = max_message_bytes or TransportSection().max_message_mb * 2**20
        keep_freed_buffers()  # activations' and gRPC's buffers reuse mapped pages
        self.security = security  # shared with the stages (None: an unauthenticated test rig)
        self.heartbeat_timeout_s = heartbeat_timeout_s  # a stage that does not answer Health within this has failed
        self._submit_times: dict[int, int] = {}  # batch id → ns from its send to stage 0's acknowledgement
        # Each stage's Deliveries stream holds a server thread for its lifetime: room for a long pipeline.
        servicer = _CoordinatorServicer(self._inbox, self._submit_times)
        self.server, self.address = start_server(servicer, host, port, max_message_bytes, security, max_workers=80)
        self._channel_options = channel_options(max_message_bytes)
        self.num_blocks = 0
        self.block_size = 0
        self.controls: list[StageControl] = []  # the stages this pipeline started (none: it only attaches)
        self._links = _Links([], [], [])  # the stages as last attached; replaced whole by `attach`
        self._links_lock = threading.Lock()  # guards _links and every _Links' count of calls
        self._first: LinkSender | None = None

    @property
    def stages(self) -> list[StageSummary]:
        return self._links.stages

    @property
    def stubs(self) -> list[pb_grpc.StageStub]:
        """The current stubs, for the thread that attaches (the engine's); any other thread calls through `_using_links`."""
        return self._links.stubs

    @contextlib.contextmanager
    def _using_links(self):
        """The current links, held open for the calls made inside: a concurrent `attach` replaces them, and the
        replaced channels close once the last such call has returned (closing a channel while another thread starts
        a call on it has crashed the process inside gRPC)."""
        with self._links_lock:
            links = self._links
            links.calls += 1
        try:
            yield links
        finally:
            with self._links_lock:
                links.calls -= 1
                close = links.retired and links.calls == 0
            if close:
                links.close()

    def _replace_links(self, links: _Links) -> None:
        """Makes `links` current; the old ones close now, or when the last call holding them returns."""
        with self._links_lock:
            old, self._links = self._links, links
            old.retired = True
            close = old.calls == 0
        if close:
            old.close()

    # -- stages this pipeline starts (subclasses) -------------------------------------------------
    def _each(self, calls: dict[int, Callable[[StageControl], T]]) -> list[T]:
        """Each stage's call on its control, all at once; the results in the order of `calls`, the first error raised."""
        if not self.controls:
            raise PipelineError("this pipeline cannot restart or change stages it did not start")
        if len(calls) <= 1:
            return [call(self.controls[i]) for i, call in calls.items()]
        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call, self.controls[i]) for i, call in calls.items()]
            return [f.result() for f in futures]

    def _bring_up(self, loads: list[Loaded]) -> None:
        """After every stage has loaded: all take the smallest KV capacity, start their servers, and are wired."""
        capacity = min(r.kv_blocks for r in loads)
        if capacity < 1:
            raise ConfigError(
                "a stage has no memory left for the KV cache after its weights; use more stages or a smaller dtype"
            )
        smallest = min(range(len(loads)), key=lambda i: loads[i].kv_blocks)
        log.warning("KV cache: %d blocks on every stage (stage %d holds the fewest)", capacity, smallest)
        self._wire(self._each({i: lambda c: c.start(capacity) for i in range(len(loads))}))

    def _wire(self, addresses: list[str]) -> None:
        """The one wiring: stage i to stage i+1, every stage to this coordinator (errors; the last one's tokens), then attach."""
        n = len(addresses)
        wirings = [Wiring(addresses[i + 1] if i + 1 < n else None, self.address) for i in range(n)]
        self._each({i: lambda c, w=w: c.connect(w) for i, w in enumerate(wirings)})
        self.attach(addresses)

    def reconfigure(self, min_batch_id: int, target: list[LayerRange] | None = None, min_blocks: int = 1) -> None:
        """The one way to change running stages: starts again every stage that does not answer, brings every stage onto
        `target` (None: the split of the last attach, so that a change that failed half-way is undone), sizes every KV
        cache to one block count (at least min_blocks, the longest request's), fences off microbatches before
        min_batch_id everywhere, and rewires. An error leaves the last attached split in force: call it again."""
        n = len(self.stages)
        target = list(target or [s.layers for s in self.stages])
        dead = [i for i, reply in enumerate(self.health()) if isinstance(reply, Exception)]
        # Asked, not remembered: a change that failed half-way left some stages on other layers, or without a KV cache.
        infos = {i: self.stubs[i].Info(pb.InfoRequest(), timeout=30) for i in range(n) if i not in dead}
        moved = [
            i
            for i, info in infos.items()
            if (info.layer_start, info.layer_end) != tuple(target[i]) or info.num_kv_blocks == 0
        ]
        addresses = [s.address for s in self.stages]
        capacity: dict[int, int] = {}
        if dead:
            log.warning("restarting stage(s) %s", ", ".join(map(str, dead)))
            self._replace(dead, target)
            loads = self._each({i: lambda c: c.load() for i in dead})
            capacity |= {i: r.kv_blocks for i, r in zip(dead, loads, strict=False)}
        if moved:
            was, now = [self.stages[i].layers for i in moved], [target[i] for i in moved]
            log.warning("stage(s) %s: layers %s → %s", ", ".join(map(str, moved)), was, now)
            loads = self._each({i: lambda c, r=tuple(target[i]): c.set_layers(r, min_batch_id) for i in moved})
            capacity |= {i: r.kv_blocks for i, r in zip(moved, loads, strict=False)}
        unchanged = [i for i in range(n) if i not in capacity]
        blocks = min([self.num_blocks] * bool(unchanged) + list(capacity.values()))
        if blocks < min_blocks:
            short = min(capacity, key=capacity.get)
            raise ConfigError(
                f"stage {short} holds {capacity[short]} KV blocks with layers {target[short]}, fewer than the {min_blocks} "
                f"the pipeline needs (its longest request)"
            )
        resize = moved + ([i for i in unchanged if blocks < self.num_blocks])
        if resize:
            self._each({i: lambda c: c.resize(blocks, min_batch_id) for i in resize})
        for i, address in zip(dead, self._each({i: lambda c: c.start(blocks) for i in dead}), strict=False):
            addresses[i] = address
        self._each({i: lambda c: c.fence(min_batch_id) for i in range(n)})
        self._wire(addresses)

    def check_layers(self, ranges: list[LayerRange], min_blocks: int) -> None:
        """A rebalance's check, before anything changes: ConfigError naming the stage and its numbers when one cannot hold
        its new layers with a KV cache of min_blocks blocks."""
        self._each({i: lambda c, r=tuple(r): c.check_layers(r, min_blocks) for i, r in enumerate(ranges)})

    def _replace(self, dead: list[int], layers: list[LayerRange]) -> None:
        """New stages for the dead ones, to load layers[i] (a backend that starts stages)."""
        raise PipelineError(f"stage(s) {dead} stopped answering, and this pipeline cannot replace them")

    # -- the coordinator's side -------------------------------------------------------------------
    def attach(self, addresses: list[str]) -> list[pb.StageInfo]:
        """Opens channels to the stages and reads their Info; refuses stages that disagree. Other threads' health
        checks go on over the old channels meanwhile; those close once the new ones are in place and the last such
        check has returned."""
        if self._first is not None:
            self._first.close()
            self._first = None
        channels = [open_channel(a, self._channel_options, self.security) for a in addresses]
        try:
            stubs = [pb_grpc.StageStub(ch) for ch in channels]
            infos = [stub.Info(pb.InfoRequest(), timeout=30) for stub in stubs]
            stages = self._check_infos(infos)
        except BaseException:
            for ch in channels:
                ch.close()
            raise
        self._replace_links(_Links(channels, stubs, stages))
        self._first = LinkSender(channels[0], on_ack=self._on_submit_ack)
        return infos

    def _check_infos(self, infos: list[pb.StageInfo]) -> list[StageSummary]:
        """The stages' summaries; PipelineError when they disagree (wire schema, checkpoint, KV cache layout)."""
        for info in infos:
            if info.schema_version != SCHEMA_VERSION:
                raise PipelineError(
                    f"stage {info.index} at {info.address} speaks wire schema {info.schema_version}; this coordinator speaks {SCHEMA_VERSION}"
                )
        fingerprints = {info.checkpoint_fingerprint for info in infos}
        if len(fingerprints) > 1:
            listing = ", ".join(f"stage {i.index}: {i.checkpoint_fingerprint}" for i in infos)
            raise PipelineError(f"the stages loaded different checkpoints ({listing}); give every stage the same model")
        blocks = {(i.num_kv_blocks, i.block_size) for i in infos}
        if len(blocks) > 1:
            raise PipelineError(f"the stages' KV caches differ: {sorted(blocks)}")
        self.num_blocks, self.block_size = next(iter(blocks))
        return [
            StageSummary(
                i.index,
                (i.layer_start, i.layer_end),
                i.node_id,
                i.address,
                i.pid,
                i.device,
                i.num_kv_blocks,
                i.weight_bytes,
                i.memory_used_bytes,
                i.memory_total_bytes,
                kv_block_layer_bytes=i.kv_block_layer_bytes,
                layer_weight_bytes=list(i.layer_weight_bytes),
                weight_formats=dict(i.weight_formats),
            )
            for i in infos
        ]

    def _on_submit_ack(self, batch_id: int, hop_ns: int, error: Exception | None) -> None:
        """Stage 0's answer to a submitted microbatch; a refusal or a broken link fails it like a stage's error."""
        if error is None:
            self._submit_times[batch_id] = hop_ns
        else:
            self._inbox.put(Delivered(batch_id, [], [], f"stage 0 did not accept microbatch {batch_id}: {error}", 0))

    def submit(self, batch: MicroBatch) -> None:
        """Queues the microbatch on the Link to stage 0; its acknowledgement (or refusal) comes back by _on_submit_ack."""
        try:
            self._first.send(*link_message(batch, None))
        except (grpc.RpcError, ConnectionError, TimeoutError) as e:
            raise PipelineError(f"stage 0 cannot take microbatch {batch.batch_id}: {e}") from None

    def health(self) -> list:
        """Each stage's HealthReply, or the error that came instead (one per stage of the links it asked, which a
        concurrent attach may have replaced since); updates each StageSummary's error count. Safe from any thread."""
        replies: list = []
        with self._using_links() as links:
            for stage, stub in zip(links.stages, links.stubs, strict=False):
                try:
                    reply = stub.Health(pb.HealthRequest(), timeout=self.heartbeat_timeout_s)
                    stage.errors = reply.errors
                    replies.append(reply)
                except grpc.RpcError as e:
                    replies.append(PipelineError(e.code().name))
        return replies

    def shutdown(self) -> None:
        if self._first is not None:
            self._first.close()
            self._first = None
        self._replace_links(_Links([], [], list(self.stages)))  # the stage list stays readable
        self.server.stop(grace=1).wait()
