"""One hop between two stage processes on 127.0.0.1 against a raw TCP socket moving the same bytes, in one run.

The receiver is a real stage gRPC server (StageServicer: decode, and queue into a sink instead
of a model) in its own process; the sender, in this process, encodes a real microbatch of
hidden states [tokens, 5120] bfloat16 and waits for the acknowledgement, by each path:
  raw     a TCP socket: 8-byte length, the tensor's bytes, a 1-byte ack (the floor);
  link    the Link stream (what stages use now): one long-lived stream, 2 MiB chunks;
  floor   a bare gRPC bidi stream of the tensor's bytes (identity serializers, no Stagecoach code):
          what gRPC's Python stack costs by itself, the floor under any gRPC transport here.
Each hop is timed two ways: one-way, from the sender starting to the receiver having the
microbatch decoded and queued (both processes read the same machine's monotonic clock), and
round trip, until the sender has the acknowledgement. "Added" latency is the one-way median
minus raw TCP's. Throughput is the tensor's bytes over the median round trip; its ratio is
against raw TCP's.

    python bench/transport.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

HIDDEN = 5120
SIZES = [(1, 3000), (32, 1000), (4096, 15)]  # (tokens, hops measured)
MAX_BYTES = 1 << 30


class _Sink:
    """Stands in for StageLoop: notes when each microbatch was queued, and drops it."""

    def __init__(self) -> None:
        self.index, self.max_message_bytes, self.received = 1, MAX_BYTES, []

    def is_stale(self, batch_id: int) -> bool:
        return False

    def admit(self, batch, inputs, timings, received_ns) -> None:
        self.received.append(time.monotonic_ns())


def receiver(conn) -> None:
    import torch

    torch.set_num_threads(1)
    from concurrent import futures

    import grpc

    from stagecoach.proto import stagecoach_pb2 as pb
    from stagecoach.proto.link import keep_freed_buffers
    from stagecoach.proto.server import channel_options, start_server
    from stagecoach.stage.servicer import StageServicer

    keep_freed_buffers()  # as a StageLoop does
    sink = _Sink()
    raw_received: list[int] = []
    server, address = start_server(StageServicer(sink, pb.StageInfo(index=1)), "127.0.0.1", 0, MAX_BYTES)
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send((address, listener.getsockname()[1]))

    def answer() -> None:  # hands over (and forgets) the arrival times noted so far
        while conn.recv() == "times":
            # Forgotten before the answer goes: once it has, the next hops' arrivals are already coming in.
            times = raw_received[:] + sink.received[:]
            raw_received.clear()
            sink.received.clear()
            conn.send(times)

    threading.Thread(target=answer, daemon=True).start()

    def echo(frames, context):  # the floor: bytes in, one byte back, nothing decoded
        for _ in frames:
            sink.received.append(time.monotonic_ns())
            yield b"k"

    floor = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=channel_options(MAX_BYTES),
        handlers=[
            grpc.method_handlers_generic_handler(
                "bench.Floor", {"Echo": grpc.stream_stream_rpc_method_handler(echo, lambda b: b, lambda b: b)}
            )
        ],
    )
    floor_port = floor.add_insecure_port("127.0.0.1:0")
    floor.start()
    conn.send(floor_port)
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    while True:
        header = sock.recv(8, socket.MSG_WAITALL)
        if len(header) < 8:
            break
        (n,) = struct.unpack("<Q", header)
        got = 0
        while got < n:
            got += sock.recv_into(view[got:n], n - got)
        raw_received.append(time.monotonic_ns())
        sock.sendall(b"k")
    server.stop(0)


def measure(hops_for: dict | None = None) -> list[dict]:
    import grpc
    import torch

    torch.set_num_threads(1)
    from stagecoach.proto.link import LinkSender, keep_freed_buffers, link_message
    from stagecoach.proto.microbatch import MicroBatch, SeqChunk
    from stagecoach.proto.server import channel_options
    from stagecoach.proto.types import SamplingParams

    keep_freed_buffers()  # as a StageLoop and the coordinator do

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child,), daemon=True)
    proc.start()
    address, tcp_port = parent.recv()
    floor_port = parent.recv()
    floor_channel = grpc.insecure_channel(f"127.0.0.1:{floor_port}", options=channel_options(MAX_BYTES))
    floor_requests = queue.SimpleQueue()
    floor_acks = floor_channel.stream_stream("/bench.Floor/Echo", lambda b: b, lambda b: b)(
        iter(floor_requests.get, None)
    )
    channel = grpc.insecure_channel(address, options=channel_options(MAX_BYTES))
    link = LinkSender(channel)  # sends return at once; wait_idle() waits for the acknowledgement
    sock = socket.create_connection(("127.0.0.1", tcp_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rows = []
    try:
        for tokens, hops in SIZES:
            hops = (hops_for or {}).get(tokens, hops)
            tensor = torch.randn(tokens, HIDDEN).to(torch.bfloat16)
            if tokens == 1 or tokens == 32:  # decode: one token per sequence
                seqs = [SeqChunk(i, 100, 1) for i in range(tokens)]  # decode steps: nothing but id and position
            else:  # a prefill chunk of one sequence
                seqs = [
                    SeqChunk(0, 0, tokens, list(range(-(-tokens // 16))), False, SamplingParams())
                ]  # a first chunk: its blocks
            batch = MicroBatch(0, seqs, [])
            payload = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
            nbytes = len(payload)

            def raw(nbytes: int = nbytes, payload: memoryview = payload) -> None:
                sock.sendall(struct.pack("<Q", nbytes))
                sock.sendall(payload)
                sock.recv(1)

            def via_link(batch: MicroBatch = batch, tensor: torch.Tensor = tensor) -> None:
                link.send(*link_message(batch, tensor))
                assert link.wait_idle(60)

            frame = bytes(payload)

            def bare_stream(frame: bytes = frame) -> None:
                floor_requests.put(frame)
                next(floor_acks)

            rtt, one_way = {}, {}
            for name, fn in (("raw", raw), ("floor", bare_stream), ("link", via_link)):
                n = max(3, hops)
                for _ in range(max(2, n // 10)):
                    fn()
                parent.send("times")
                parent.recv()  # forget the warm-up's arrivals
                starts, samples = [], []
                for _ in range(n):
                    starts.append(time.monotonic_ns())
                    t0 = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - t0)
                parent.send("times")
                arrivals = parent.recv()
                assert len(arrivals) == n, f"{name}: {len(arrivals)} arrivals for {n} hops"
                rtt[name] = statistics.median(samples)
                one_way[name] = statistics.median(b - a for a, b in zip(starts, arrivals, strict=False)) / 1e9
            row = {"shape": [tokens, HIDDEN], "dtype": "bfloat16", "bytes": nbytes}
            for name in rtt:
                row[name] = {
                    "one_way_p50_us": round(one_way[name] * 1e6, 1),
                    "round_trip_p50_us": round(rtt[name] * 1e6, 1),
                    "gb_per_s": round(nbytes / rtt[name] / 1e9, 3),
                }
                if name != "raw":
                    row[name]["added_one_way_us"] = round((one_way[name] - one_way["raw"]) * 1e6, 1)
                    row[name]["throughput_vs_raw"] = round(rtt["raw"] / rtt[name], 3)
            rows.append(row)
            print(
                f"  [{tokens}, {HIDDEN}] {nbytes / 1024:,.0f} KiB, one-way / round trip: raw {one_way['raw'] * 1e6:,.0f} / {rtt['raw'] * 1e6:,.0f} us, "
                f"link {one_way['link'] * 1e6:,.0f} / {rtt['link'] * 1e6:,.0f} us (throughput x{rtt['raw'] / rtt['link']:.2f}), "
                f"bare gRPC stream {one_way['floor'] * 1e6:,.0f} / {rtt['floor'] * 1e6:,.0f} us (x{rtt['raw'] / rtt['floor']:.2f})",
                flush=True,
            )
    finally:
        parent.send("stop")
        floor_requests.put(None)
        floor_channel.close()
        link.close()
        sock.close()
        channel.close()
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    rows = measure()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
