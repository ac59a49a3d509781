"""Ways to run microbatches through the stages: in this process, or over gRPC to stage servers.

A pipeline takes microbatches with `submit` and hands back finished ones with `wait`, in the
order they complete. The engine keeps several in flight; the pipeline never reorders stages.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from stagecoach.coordinator.partition import LayerRange
from stagecoach.errors import StagecoachError
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc
from stagecoach.stage.batch import MicroBatch, SampleResult


class PipelineError(StagecoachError):
    """A stage failed a microbatch or cannot be reached."""


@dataclass(slots=True)
class StageInfo:
    index: int
    layers: LayerRange
    node_id: str = ""
    address: str = ""
    pid: int = 0
    device: str = "cpu"
    num_kv_blocks: int = 0
    weight_bytes: int = 0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    errors: int = 0  # from its latest health check

    def as_json(self) -> dict:
        out = {"index": self.index, "layers": list(self.layers)}
        if self.address:
            out |= {"node_id": self.node_id, "address": self.address, "pid": self.pid, "device": self.device}
        return out


@dataclass(slots=True)
class Delivered:
    batch_id: int
    samples: list[SampleResult]
    timings: list = field(default_factory=list)  # pb.StageTiming per stage, each on its stage's own clock
    error: str = ""
    submit_ns: int = 0  # the coordinator's send to stage 0, until stage 0 acknowledged it


class Pipeline(Protocol):
    stages: list[StageInfo]
    num_blocks: int
    block_size: int

    def submit(self, batch: MicroBatch) -> None: ...

    def wait(self, timeout: float | None = None) -> Delivered | None: ...

    def wake(self) -> None: ...

    def check_health(self) -> None: ...

    def recover(self, min_batch_id: int) -> None: ...

    def shutdown(self) -> None: ...


_WAKE = object()


class _Inbox:
    """Finished microbatches in the order they come back; `wake` interrupts a waiting engine."""

    def __init__(self) -> None:
        self._inbox: queue.Queue = queue.Queue()

    def wait(self, timeout: float | None = None) -> Delivered | None:
        """The next finished microbatch; None after timeout seconds or when woken."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if item is _WAKE else item

    def wake(self) -> None:
        self._inbox.put(_WAKE)

    def check_health(self) -> None:
        """Raises PipelineError if a stage is gone; in-process stages cannot be."""


class LocalPipeline(_Inbox):
    """All stages in this process, run one after another when submitted: the reference backend."""

    def __init__(self, runners: list, ranges: list[LayerRange]) -> None:
        super().__init__()
        self.runners = runners
        self.stages = [StageInfo(i, r) for i, r in enumerate(ranges)]
        self.num_blocks = runners[0].kv_cache.num_blocks
        self.block_size = runners[0].kv_cache.block_size
        self.last_logits = None  # the last stage's full logits when a batch asked for them

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        ranges: list[LayerRange],
        dtype: str = "float32",
        device: str = "cpu",
        num_blocks: int = 256,
        block_size: int = 16,
    ) -> LocalPipeline:
        from stagecoach.stage.kv_cache import KVCache
        from stagecoach.stage.loader import DTYPES, load_stage_model
        from stagecoach.stage.model import ModelConfig
        from stagecoach.stage.runner import StageRunner

        config = ModelConfig.from_pretrained(model_dir)
        runners = []
        for start, end in ranges:
            model = load_stage_model(model_dir, start, end, DTYPES[dtype], device, config)
            cache = KVCache(end - start, num_blocks, block_size, config.num_key_value_heads, config.head_dim, DTYPES[dtype], device)
            runners.append(StageRunner(model, cache))
        return cls(runners, ranges)

    def execute(self, batch: MicroBatch, timings: list | None = None) -> list[SampleResult]:
        hidden = None
        for index, runner in enumerate(self.runners):
            start = time.monotonic_ns()
            out = runner.execute(batch, hidden)
            hidden = out.hidden_states
            if timings is not None:
                timings.append(pb.StageTiming(stage_index=index, received_ns=start, compute_start_ns=start, compute_end_ns=time.monotonic_ns()))
        self.last_logits = out.logits
        return out.samples

    def submit(self, batch: MicroBatch) -> None:
        timings: list = []
        samples = self.execute(batch, timings)
        self._inbox.put(Delivered(batch.batch_id, samples, timings))

    def health(self) -> list:
        return [pb.HealthReply(serving=True) for _ in self.runners]

    def recover(self, min_batch_id: int) -> None:
        for runner in self.runners:
            if runner.sampler is not None:
                runner.sampler.reset()

    def shutdown(self) -> None:
        self.runners.clear()


class _CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, inbox: queue.Queue, submit_times: dict[int, int]) -> None:
        self.inbox = inbox
        self.submit_times = submit_times

    def Deliver(self, request: pb.Delivery, context: grpc.ServicerContext) -> pb.DeliverReply:
        from stagecoach.stage.codec import decode_samples

        submit_ns = self.submit_times.pop(request.batch_id, 0)
        self.inbox.put(Delivered(request.batch_id, decode_samples(request.samples), list(request.timings), request.error, submit_ns))
        return pb.DeliverReply()


class GrpcPipeline(_Inbox):
    """Stage servers somewhere on the network: microbatches go to stage 0, tokens come back by Deliver.

    Owns the coordinator's gRPC server. Whoever started the stages (threads, Ray actors) wires
    them with `connect_stages`, passing this pipeline's `address` to the last one.
    """

    def __init__(self, host: str, port: int = 0, max_message_bytes: int = 1 << 30, security=None) -> None:
        from stagecoach.stage.link import keep_freed_buffers
        from stagecoach.stage.server import channel_options, start_server

        super().__init__()
        keep_freed_buffers()  # activations' and gRPC's buffers reuse mapped pages
        self.security = security  # LinkSecurity shared with the stages (None: an unauthenticated test rig)
        self.heartbeat_timeout_s = 2.0  # a stage that does not answer Health within this has failed
        self._submit_times: dict[int, int] = {}  # batch id → ns from its send to stage 0's acknowledgement
        self.server, self.address = start_server(_CoordinatorServicer(self._inbox, self._submit_times), host, port, max_message_bytes, security)
        self.max_message_bytes = max_message_bytes
        self._channel_options = channel_options(max_message_bytes)
        self.stages: list[StageInfo] = []
        self.num_blocks = 0
        self.block_size = 0
        self._channels: list[grpc.Channel] = []
        self._first = None  # a LinkSender to stage 0
        self.stubs: list[pb_grpc.StageStub] = []

    def attach(self, addresses: list[str]) -> list[pb.StageInfo]:
        """Opens channels to the stages and reads their Info; refuses stages that disagree."""
        from stagecoach.stage.codec import SCHEMA_VERSION
        from stagecoach.stage.link import LinkSender
        from stagecoach.stage.security import open_channel

        self._close_channels()
        self._channels = [open_channel(a, self._channel_options, self.security) for a in addresses]
        self.stubs = [pb_grpc.StageStub(ch) for ch in self._channels]
        infos = [stub.Info(pb.InfoRequest(), timeout=30) for stub in self.stubs]
        for info in infos:
            if info.schema_version != SCHEMA_VERSION:
                raise PipelineError(f"stage {info.index} at {info.address} speaks wire schema {info.schema_version}; this coordinator speaks {SCHEMA_VERSION}")
        fingerprints = {info.checkpoint_fingerprint for info in infos}
        if len(fingerprints) > 1:
            listing = ", ".join(f"stage {i.index}: {i.checkpoint_fingerprint}" for i in infos)
            raise PipelineError(f"the stages loaded different checkpoints ({listing}); give every stage the same model")
        blocks = {(i.num_kv_blocks, i.block_size) for i in infos}
        if len(blocks) > 1:
            raise PipelineError(f"the stages' KV caches differ: {sorted(blocks)}")
        self.num_blocks, self.block_size = next(iter(blocks))
        self.stages = [
            StageInfo(i.index, (i.layer_start, i.layer_end), i.node_id, i.address, i.pid, i.device, i.num_kv_blocks, i.weight_bytes,
                      i.memory_used_bytes, i.memory_total_bytes)
            for i in infos
        ]
        self._first = LinkSender(self._channels[0], on_ack=self._on_submit_ack)
        return infos

    def _on_submit_ack(self, batch_id: int, hop_ns: int, error: Exception | None) -> None:
        """Stage 0's answer to a submitted microbatch; a refusal or a broken link fails it like a stage's error."""
        if error is None:
            self._submit_times[batch_id] = hop_ns
        else:
            self._inbox.put(Delivered(batch_id, [], [], f"stage 0 did not accept microbatch {batch_id}: {error}"))

    def _close_channels(self) -> None:
        if self._first is not None:
            self._first.close()
            self._first = None
        for ch in self._channels:
            ch.close()
        self._channels.clear()

    def submit(self, batch: MicroBatch) -> None:
        """Queues the microbatch on the Link to stage 0; its acknowledgement (or refusal) comes back by _on_submit_ack."""
        from stagecoach.stage.link import link_message

        try:
            self._first.send(*link_message(batch, None))
        except (grpc.RpcError, ConnectionError, TimeoutError) as e:
            raise PipelineError(f"stage 0 cannot take microbatch {batch.batch_id}: {e}") from None

    def check_health(self) -> None:
        for stage, reply in zip(self.stages, self.health()):
            if isinstance(reply, Exception):
                raise PipelineError(f"stage {stage.index} at {stage.address} does not answer: {reply}")

    def health(self) -> list:
        """Each stage's HealthReply, or the error that came instead; updates each StageInfo's error count."""
        replies: list = []
        for stage, stub in zip(self.stages, self.stubs):
            try:
                reply = stub.Health(pb.HealthRequest(), timeout=self.heartbeat_timeout_s)
                stage.errors = reply.errors
                replies.append(reply)
            except grpc.RpcError as e:
                replies.append(PipelineError(e.code().name))
        return replies

    def recover(self, min_batch_id: int) -> None:
        raise PipelineError("this pipeline cannot restart stages it did not start")

    def shutdown(self) -> None:
        self._close_channels()
        self.server.stop(grace=1).wait()


def connect_stages(workers, coordinator_address: str) -> None:
    """Wires stage i to stage i+1 and the last stage (and every stage, for errors) to the coordinator.

    workers: objects with `address` and `connect(next_address, coordinator_address)`.
    """
    for i, w in enumerate(workers):
        w.connect(workers[i + 1].address if i + 1 < len(workers) else None, coordinator_address)


class ThreadPipeline(GrpcPipeline):
    """Every stage in this process, each behind its own gRPC server on host: transport without Ray."""

    def __init__(self, model_dir: str | Path, ranges: list[LayerRange], host: str = "127.0.0.1", **plan_kwargs) -> None:
        import secrets

        from stagecoach.stage.security import LinkSecurity
        from stagecoach.stage.worker import StagePlan, StageWorker

        plan_kwargs.setdefault("link_token", secrets.token_hex(32))
        tls = {k: plan_kwargs.get(k) for k in ("tls_cert", "tls_key", "tls_ca")}
        super().__init__(host, security=LinkSecurity(plan_kwargs["link_token"], **tls))
        self.workers = [StageWorker(StagePlan(i, str(model_dir), s, e, host=host, **plan_kwargs)) for i, (s, e) in enumerate(ranges)]
        try:
            capacity = min(w.load()["kv_blocks"] for w in self.workers)
            for w in self.workers:
                w.start(capacity)
            connect_stages(self.workers, self.address)
            self.attach([w.address for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

    def recover(self, min_batch_id: int) -> None:
        """In-process stages do not die; a recovery fences off old microbatches and rewires."""
        for w in self.workers:
            w.reset(min_batch_id)
        connect_stages(self.workers, self.address)

    def shutdown(self) -> None:
        for w in self.workers:
            w.stop()
        super().shutdown()
