"""Link and Deliveries: microbatches on one long-lived gRPC stream per neighbour, large tensors in chunks, one ack each.

A unary call per microbatch would pay for a whole call each time (about 0.5 ms on a loaded core), and gRPC
assembles one 40 MiB message far slower than twenty of 2 MiB. A Link opens its stream once;
each microbatch is a header frame (its MicroBatch, the tensor's bytes inline when small) plus,
for a large tensor, chunk frames, and the receiver answers each microbatch with a LinkAck once
it is validated and queued. The last stage's deliveries to the coordinator travel the same way,
one Delivery a frame, on the coordinator's Deliveries stream.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from collections.abc import Callable

import grpc
import torch

from stagecoach.errors import PipelineError, WireError
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.codec import encode_microbatch, tensor_nbytes, tensor_payload

CHUNK_BYTES = 2 << 20  # measured on loopback: 1–8 MiB pieces move 40 MiB 3–4× faster than one message
LINK_METHOD = "/stagecoach.v1.Stage/Link"
DELIVERIES_METHOD = "/stagecoach.v1.Coordinator/Deliveries"
ACK_TIMEOUT_S = 60.0  # a receiver that does not acknowledge within this has failed


class LinkRefused(PipelineError):
    """The receiver answered a microbatch with an error code (it stays connected for the next one)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


_CODES = {c.value[0]: c for c in grpc.StatusCode}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache  # once per process: the setting is process-wide
def keep_freed_buffers() -> None:
    """Lets this process reuse freed large buffers (glibc only; elsewhere a no-op).

    By default glibc gives every block over 128 KiB (up to 32 MiB, adaptively) its own fresh mapping, and a fresh
    40 MiB buffer costs 10,000 page faults: here that took as long as moving the bytes over TCP.
    Serving large blocks from the heap, and not handing freed ones back, makes the activations'
    buffers (gRPC's, the assembled tensors, the outputs) reuse pages already mapped. A stage or
    coordinator process keeps its peak buffer memory mapped in exchange.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


class ChunkFrame:
    """A LinkFrame holding only a chunk (and maybe `last`), read without copying the chunk."""

    __slots__ = ("chunk", "last")

    def __init__(self, chunk: memoryview, last: bool) -> None:
        self.chunk, self.last = chunk, last

    def HasField(self, name: str) -> bool:
        return False


def parse_link_frame(data: bytes) -> pb.LinkFrame | ChunkFrame:
    """The Link's request deserializer: chunk frames (as encode_frames writes them) as views, anything else by protobuf."""
    if data[:1] == b"\x12":
        length, shift, i = 0, 0, 1
        while i < min(len(data), 11):
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                end = i + length
                if end <= len(data) and data[end:] in (b"", b"\x18\x01"):
                    return ChunkFrame(memoryview(data)[i:end], end < len(data))
                break
            shift += 7
    return pb.LinkFrame.FromString(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(tag: bytes, body_len: int) -> bytes:
    return tag + _varint(body_len)


def encode_frames(msg: pb.MicroBatch, payload: memoryview, chunk_bytes: int = CHUNK_BYTES) -> list[bytes]:
    """The serialized LinkFrames of one microbatch; msg.tensor has dtype and shape, payload its bytes.

    Written field by field around the tensor's bytes (protobuf's wire format: tag, length, bytes;
    fields in any order), so the bytes are copied once, not three times as building and
    serializing messages would. LinkFrame's own parser reads the result.
    """
    if len(payload) <= chunk_bytes:
        # LinkFrame{batch: MicroBatch{..., tensor: Tensor{dtype, shape, data}}, last: true}
        tensor_head = msg.tensor.SerializeToString() + _field(b"\x1a", len(payload))  # Tensor.data = 3
        msg.ClearField("tensor")
        batch_head = msg.SerializeToString() + _field(b"\x1a", len(tensor_head) + len(payload))  # MicroBatch.tensor = 3
        batch_len = len(batch_head) + len(tensor_head) + len(payload)
        return [
            b"".join((_field(b"\x0a", batch_len), batch_head, tensor_head, payload, b"\x18\x01"))
        ]  # LinkFrame.batch = 1, last = 3
    frames = [pb.LinkFrame(batch=msg).SerializeToString()]
    for start in range(0, len(payload), chunk_bytes):
        piece = payload[start : start + chunk_bytes]
        last = start + chunk_bytes >= len(payload)
        frames.append(
            b"".join((_field(b"\x12", len(piece)), piece, b"\x18\x01" if last else b""))
        )  # LinkFrame.chunk = 2
    return frames


class LinkAssembler:
    """The receiving end's state: collects one microbatch's frames; add() returns it once complete."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # the largest tensor a chunked microbatch may announce
        self._reset()

    def _reset(self) -> None:
        self._msg: pb.MicroBatch | None = None
        self._buf: memoryview | None = None  # the tensor's bytes as they arrive, in memory torch allocated
        self._filled = 0
        self._error: str | None = None

    def add(
        self, frame: pb.LinkFrame | ChunkFrame
    ) -> tuple[pb.MicroBatch | None, memoryview | None, str | None] | None:
        """None while frames are due; then (the MicroBatch, its chunked tensor bytes or None if inline, an error or None)."""
        if frame.HasField("batch"):
            unfinished = self._msg
            self._reset()
            self._msg = frame.batch
            if unfinished is not None:
                self._error = f"microbatch {unfinished.batch_id} ended without its last chunk"
            elif not frame.last:  # chunks follow: room for exactly the bytes its dtype and shape call for
                t = frame.batch.tensor
                try:
                    size = tensor_nbytes(t)[1]
                except WireError:
                    size = -1
                if size < 0 or t.data or size > self.max_bytes:
                    self._error = f"tensor: dtype {t.dtype} and shape {list(t.shape)} cannot be sent in chunks (at most {self.max_bytes} bytes)"
                else:
                    # torch.empty: no zero-fill, every byte is about to be written (bytearray would memset 40 MiB first)
                    self._buf = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
        elif self._msg is None:
            self._error = self._error or "a chunk arrived before its microbatch's header frame"
        elif self._buf is not None:
            chunk = frame.chunk  # (a protobuf message would copy it on every access)
            end = self._filled + len(chunk)
            if end > len(self._buf):
                self._error = (
                    self._error
                    or f"tensor: more chunk bytes ({end}) than its dtype and shape call for ({len(self._buf)})"
                )
            else:
                self._buf[self._filled : end] = chunk
                self._filled = end
        if not frame.last:
            return None
        msg, buf, error = self._msg, self._buf, self._error
        if error is None and buf is not None and self._filled != len(buf):
            error = f"tensor: {self._filled} chunk bytes arrived, its dtype and shape call for {len(buf)}"
        self._reset()
        return msg, buf, error


class StreamSender:
    """The sending end of one long-lived stream on `channel`, opened on first use and again after a failure.

    send() returns once an item is queued on the stream: the caller goes on while it travels.
    Its frames are encoded (the tensor's bytes copied into them) by gRPC's own sending thread as
    it takes them, so no thread of ours sits between a caller and the socket. Acknowledgements
    come back in order on a reader thread, which calls on_ack(key, hop_ns, error) for each:
    hop_ns from send() until the receiver acknowledged; error None, a LinkRefused, or the stream's
    failure (then for every item still unacknowledged). At most `window` items are unacknowledged;
    a watchdog cancels the stream when the oldest is more than ack_timeout_s late, so a hung
    receiver surfaces as an error.
    """

    def __init__(
        self, channel: grpc.Channel, method: str, on_ack=None, ack_timeout_s: float = ACK_TIMEOUT_S, window: int = 8
    ) -> None:
        self.on_ack = on_ack or (lambda key, hop_ns, error: None)
        self._method = channel.stream_stream(
            method, request_serializer=lambda frame: frame, response_deserializer=pb.LinkAck.FromString
        )
        self._ack_timeout_s = ack_timeout_s
        self._window = threading.BoundedSemaphore(window)
        self._lock = threading.Lock()
        self._stream: tuple | None = None  # (requests queue, response iterator) of the open stream
        # (key, send start ns), oldest first
        self._outstanding: collections.deque[tuple[int, int]] = collections.deque()
        self._idle = threading.Condition(self._lock)
        self._closed = False
        threading.Thread(target=self._watch, name="link-watchdog", daemon=True).start()

    def _send(self, key: int, frames: Callable[[], list[bytes]]) -> None:
        """Queues one item; frames() gives its serialized frames, called on gRPC's sending thread."""
        if not self._window.acquire(timeout=self._ack_timeout_s):
            raise TimeoutError(
                f"the receiver has not acknowledged {len(self._outstanding)} items for {self._ack_timeout_s:g} s"
            )
        with self._lock:
            if self._closed:
                self._window.release()
                raise ConnectionError("the link is closed")
            if self._stream is None:
                requests = queue.SimpleQueue()
                self._stream = (requests, self._method(_expand(requests)))
                threading.Thread(target=self._read, args=(self._stream,), name="link-acks", daemon=True).start()
            self._outstanding.append((key, time.monotonic_ns()))
            self._stream[0].put(frames)

    def _read(self, stream) -> None:
        requests, responses = stream
        failure: Exception | None = None
        try:
            for ack in responses:
                with self._lock:
                    key, start = self._outstanding.popleft()
                    self._idle.notify_all()
                self._window.release()
                error = None
                if ack.batch_id != key:
                    error = ConnectionError(f"link out of step: {key} was answered for {ack.batch_id}")
                elif ack.code:
                    error = LinkRefused(_CODES.get(ack.code, grpc.StatusCode.UNKNOWN), ack.error)
                self.on_ack(key, time.monotonic_ns() - start, error)
            failure = ConnectionError("the receiver closed the link")
        except grpc.RpcError as e:
            failure = e
        with self._lock:
            if self._stream is stream:
                self._stream = None
            lost = list(self._outstanding)
            self._outstanding.clear()
            self._idle.notify_all()
        requests.put(None)
        for key, start in lost:
            self._window.release()
            if not self._closed:
                self.on_ack(key, time.monotonic_ns() - start, failure)

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every sent item is acknowledged; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._outstanding, timeout)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            with self._lock:
                late = self._outstanding and time.monotonic_ns() - self._outstanding[0][1] > self._ack_timeout_s * 1e9
                stream = self._stream
            if late and stream is not None:
                stream[1].cancel()  # the reader sees CANCELLED and fails what is outstanding

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream[0].put(None)
            stream[1].cancel()


def _expand(requests: queue.SimpleQueue):
    """The request iterator gRPC's sending thread consumes: each queued item's frames, encoded as they are taken."""
    while (frames := requests.get()) is not None:
        yield from frames()


class LinkSender(StreamSender):
    """Microbatches to the next stage (or from the coordinator to stage 0) on its Link; on_ack(batch_id, hop_ns, error)."""

    def __init__(
        self,
        channel: grpc.Channel,
        on_ack=None,
        ack_timeout_s: float = ACK_TIMEOUT_S,
        chunk_bytes: int = CHUNK_BYTES,
        window: int = 8,
    ) -> None:
        super().__init__(channel, LINK_METHOD, on_ack, ack_timeout_s, window)
        self.chunk_bytes = chunk_bytes

    def send(self, msg: pb.MicroBatch, payload: memoryview) -> None:
        """Queues one microbatch on the stream (msg.tensor: dtype and shape; payload: its bytes)."""
        self._send(msg.batch_id, functools.partial(encode_frames, msg, payload, self.chunk_bytes))


class DeliverySender(StreamSender):
    """Deliveries (sampled tokens, or a stage's error) to the coordinator on its Deliveries stream; on_ack(batch_id, hop_ns, error)."""

    def __init__(
        self, channel: grpc.Channel, on_ack=None, ack_timeout_s: float = ACK_TIMEOUT_S, window: int = 64
    ) -> None:
        super().__init__(channel, DELIVERIES_METHOD, on_ack, ack_timeout_s, window)

    def send(self, delivery: pb.Delivery) -> None:
        self._send(delivery.batch_id, lambda: [delivery.SerializeToString()])


def link_message(batch, tensor: torch.Tensor | None, timings=()) -> tuple[pb.MicroBatch, memoryview]:
    """A MicroBatch header for a Link and its tensor's bytes (tensor None: stage 0's token ids)."""
    if tensor is None:
        tensor = torch.tensor(batch.token_ids, dtype=torch.int64)
    meta, payload = tensor_payload(tensor)
    return encode_microbatch(batch, meta, timings), payload
