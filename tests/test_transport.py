"""Wire schema and gRPC transport without Ray: codec, large messages, bad input, generated code."""

from __future__ import annotations

import filecmp

import grpc
import pytest
import torch
from defaults import scheduler_config
from helpers import make_hf_checkpoint, send_one, wire_microbatch

from stagecoach.cluster.backends import LocalPipeline, ThreadPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto import codec, generate
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.microbatch import MicroBatch, SeqChunk
from stagecoach.proto.types import SamplingParams


def test_generated_code_is_current(tmp_path):
    for path in generate.generate(tmp_path):
        assert filecmp.cmp(path, generate.PROTO_DIR / path.name, shallow=False), (
            f"{path.name} is stale: run python -m stagecoach.proto.generate"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
def test_tensor_round_trip_is_bit_exact(dtype):
    t = (torch.randn(7, 33) * 100).to(dtype)
    msg, payload = codec.tensor_payload(t)
    msg.data = payload.tobytes()
    assert len(msg.data) == t.numel() * t.element_size()  # bfloat16 as its 2-byte payload
    back = codec.tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_microbatch_round_trip():
    batch = MicroBatch(
        batch_id=9,
        seqs=[
            SeqChunk(1, 0, 3, [1], True, SamplingParams(temperature=0.5, top_k=4, seed=3, logprobs=2), 3, [5, 6, 7]),
            SeqChunk(2, 4, 1, [2], False),
        ],
        token_ids=[5, 6, 7, 11],
        drop_seq_ids=[0],
    )
    back, inputs = codec.decode_microbatch(pb.MicroBatch.FromString(wire_microbatch(batch).SerializeToString()))
    assert inputs.tolist() == batch.token_ids and back.drop_seq_ids == [0]
    assert (
        back.seqs[0].sampling.top_k == 4 and back.seqs[0].sampling.logprobs == 2 and back.seqs[0].token_ids == [5, 6, 7]
    )
    assert back.seqs[0].num_prompt_tokens == 3 and back.seqs[0].new_blocks == [1]
    assert back.seqs[1].token_ids == [] and back.seqs[1].sampling is None and back.seqs[1].new_blocks == [2]


def test_malformed_tensor_is_named():
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=[4, 4], data=b"\0" * 12)
    with pytest.raises(codec.WireError, match=r"tensor: shape \[4, 4\] of torch.float32 needs 64 bytes, got 12"):
        codec.tensor_from_proto(msg)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide")
    make_hf_checkpoint(
        path,
        hidden_size=512,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        std=0.05,
    )
    return path


def generate_ids(pipeline, prompts, max_batch_tokens, max_inflight, n=4):
    engine = Engine(
        pipeline,
        scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size, max_num_batched_tokens=max_batch_tokens),
        max_inflight=max_inflight,
    )
    return [
        s.output_token_ids
        for s in engine.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _ in prompts]
        )
    ]


def test_prefill_above_grpc_default_limit_crosses(wide_model):
    """A 2,600-token prefill of hidden 512 in float32 is 5.1 MiB between stages, above gRPC's 4 MiB default."""
    prompt = [(i * 37) % 500 + 3 for i in range(2600)]
    ranges = ranges_from_counts([2, 1], 3)
    pipeline = ThreadPipeline(wide_model, ranges, num_blocks=400, block_size=8, max_batch_tokens=4096)
    try:
        got = generate_ids(pipeline, [prompt], 4096, 2)
    finally:
        pipeline.shutdown()
    local = LocalPipeline.load(wide_model, ranges, num_blocks=400, block_size=8)
    assert got == generate_ids(local, [prompt], 4096, 1)


def test_bad_microbatch_gets_invalid_argument_and_stage_keeps_serving(wide_model):
    ranges = ranges_from_counts([2, 1], 3)
    pipeline = ThreadPipeline(wide_model, ranges, num_blocks=16, block_size=8)
    try:
        stub = pipeline.stubs[1]
        good = MicroBatch(0, [SeqChunk(0, 0, 2, [0], False, SamplingParams())], [])
        cases = {
            "hidden_states has shape [2, 7], expected [2, 512]": wire_microbatch(good, torch.zeros(2, 7)),
            "seqs[0].seq_id 42 is not a sequence this stage holds": wire_microbatch(
                MicroBatch(0, [SeqChunk(42, 5, 1)], []), torch.zeros(1, 512)
            ),
            "block 77 is outside the cache's 16 blocks": wire_microbatch(
                MicroBatch(0, [SeqChunk(0, 0, 2, [77], False, SamplingParams())], []), torch.zeros(2, 512)
            ),
        }
        for message, msg in cases.items():
            ack = send_one(stub, msg)
            assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert message in ack.error
        bad_version = wire_microbatch(good, torch.zeros(2, 512))
        bad_version.schema_version = 0
        assert "schema_version 0" in send_one(stub, bad_version).error
        bad_token = wire_microbatch(MicroBatch(0, [SeqChunk(0, 0, 1, [0], False, SamplingParams())], [10**6]), None)
        assert "token id 1000000 is outside the vocabulary" in send_one(pipeline.stubs[0], bad_token).error
        # Still serving, and nothing was queued by the refused calls.
        assert stub.Health(pb.HealthRequest(), timeout=10).serving
        assert generate_ids(pipeline, [[3, 4, 5]], 512, 2) == generate_ids(
            LocalPipeline.load(wide_model, ranges, num_blocks=16, block_size=8), [[3, 4, 5]], 512, 1
        )
        info = stub.Info(pb.InfoRequest(), timeout=10)
        assert (info.layer_start, info.layer_end, info.num_kv_blocks, info.schema_version) == (
            2,
            3,
            16,
            pb.SCHEMA_VERSION_CURRENT,
        )
        assert len(info.checkpoint_fingerprint) == 16 and info.address.startswith("127.0.0.1:")
    finally:
        pipeline.shutdown()


def test_stages_of_different_checkpoints_are_refused(tmp_path):
    from dataclasses import replace

    from stagecoach.cluster.backends import stage_plans
    from stagecoach.cluster.config import ClusterConfig
    from stagecoach.cluster.grpc_pipeline import GrpcPipeline
    from stagecoach.errors import PipelineError
    from stagecoach.stage.worker import StageWorker

    make_hf_checkpoint(tmp_path / "a", num_hidden_layers=2, seed=1)
    make_hf_checkpoint(tmp_path / "b", num_hidden_layers=2, seed=2, intermediate_size=96)
    config = ClusterConfig.from_dict({"cache": {"num_blocks": 4}, "transport": {"host": "127.0.0.1"}})
    plans = stage_plans(config, [(0, 1), (1, 2)], link_token="")
    workers = [
        StageWorker(replace(plan, model_dir=str(tmp_path / name))) for plan, name in zip(plans, "ab", strict=False)
    ]
    pipeline = GrpcPipeline("127.0.0.1")
    try:
        for w in workers:
            w.load()
            w.start(4)
        with pytest.raises(PipelineError, match="the stages loaded different checkpoints"):
            pipeline.attach([w.address for w in workers])
    finally:
        for w in workers:
            w.stop()
        pipeline.shutdown()


def test_link_frames_are_plain_linkframe_messages():
    """Chunk frames are written by hand; LinkFrame's own parser must read them as it would its own."""
    from stagecoach.proto.link import encode_frames, link_message

    batch = MicroBatch(5, [SeqChunk(0, 0, 3, [0], False, SamplingParams())], [])
    tensor = torch.randn(3, 1000)
    msg, payload = link_message(batch, tensor)
    frames = [pb.LinkFrame.FromString(f) for f in encode_frames(msg, payload, chunk_bytes=5000)]
    assert len(frames) == 1 + 3 and frames[0].HasField("batch") and not frames[0].batch.tensor.data
    assert [f.last for f in frames] == [False, False, False, True] and [len(f.chunk) for f in frames] == [
        0,
        5000,
        5000,
        2000,
    ]
    assert b"".join(f.chunk for f in frames) == tensor.numpy().tobytes()
    (small,) = [
        pb.LinkFrame.FromString(f) for f in encode_frames(*link_message(batch, tensor[:, :10]), chunk_bytes=5000)
    ]
    assert small.last and small.batch.tensor.data == tensor[:, :10].contiguous().numpy().tobytes()


def test_link_assembler_refuses_malformed_chunk_sequences():
    from stagecoach.proto.link import LinkAssembler, encode_frames, link_message

    batch = MicroBatch(5, [SeqChunk(0, 0, 2, [0], False, SamplingParams())], [])
    tensor = torch.randn(2, 100)
    frames = [pb.LinkFrame.FromString(f) for f in encode_frames(*link_message(batch, tensor), chunk_bytes=300)]
    asm = LinkAssembler(max_bytes=1 << 20)
    assert [asm.add(f) for f in frames[:-1]] == [None] * (len(frames) - 1)
    msg, data, error = asm.add(frames[-1])
    assert error is None and codec.decode_microbatch(msg, data)[1].equal(tensor)

    def run(seq, max_bytes=1 << 20):
        asm = LinkAssembler(max_bytes)
        results = [asm.add(f) for f in seq]
        return results[-1][2]

    assert "chunk bytes arrived" in run(frames[:2] + [pb.LinkFrame(chunk=b"x", last=True)])
    assert "more chunk bytes" in run(frames[:1] + [pb.LinkFrame(chunk=b"\0" * 801, last=True)])
    assert "before its microbatch's header" in run([pb.LinkFrame(chunk=b"abc", last=True)])
    assert "cannot be sent in chunks" in run(frames, max_bytes=100)
    huge = pb.LinkFrame(batch=pb.MicroBatch(batch_id=1, tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 20, 1 << 20])))
    assert "cannot be sent in chunks" in run([huge, pb.LinkFrame(last=True)])
    assert "ended without its last chunk" in run(frames[:2] + frames)


def test_link_refusal_keeps_the_stream_and_chunked_microbatches_cross(wide_model):
    from stagecoach.proto.link import LinkRefused, LinkSender, link_message
    from stagecoach.proto.security import open_channel
    from stagecoach.proto.server import channel_options

    ranges = ranges_from_counts([2, 1], 3)
    pipeline = ThreadPipeline(wide_model, ranges, num_blocks=16, block_size=8)
    acks = []
    try:
        # A second sender into stage 1, beside stage 0's; small chunks so a 4 KiB tensor goes in pieces.
        channel = open_channel(pipeline.stages[1].address, channel_options(64 * 2**20), pipeline.security)
        sender = LinkSender(channel, on_ack=lambda *a: acks.append(a), chunk_bytes=1000)
        sender.send(
            *link_message(MicroBatch(1000, [SeqChunk(0, 0, 2, [0], False, SamplingParams())], []), torch.zeros(2, 7))
        )
        sender.send(
            *link_message(
                MicroBatch(1001, [SeqChunk(0, 0, 2, [999], False, SamplingParams())], []), torch.zeros(2, 512)
            )
        )
        sender.send(
            *link_message(MicroBatch(1002, [SeqChunk(7, 0, 2, [1], False, SamplingParams())], []), torch.zeros(2, 512))
        )
        assert sender.wait_idle(30)
        assert [a[0] for a in acks] == [1000, 1001, 1002] and all(a[1] > 0 for a in acks)
        first, second, third = (a[2] for a in acks)
        assert isinstance(first, LinkRefused) and first.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden_states has shape [2, 7], expected [2, 512]" in str(first)
        assert isinstance(second, LinkRefused) and "block 999 is outside" in str(second)
        assert third is None  # the chunked one was accepted, on the same stream
        # The stage still computes: a full generation matches.
        assert generate_ids(pipeline, [[3, 4, 5]], 512, 2) == generate_ids(
            LocalPipeline.load(wide_model, ranges, num_blocks=16, block_size=8), [[3, 4, 5]], 512, 1
        )
        sender.close()
        channel.close()
    finally:
        pipeline.shutdown()


def test_delivery_stream_survives_a_restarted_coordinator():
    """Deliveries go on one stream; when the coordinator's server goes away the outstanding ones fail, and the next
    delivery opens a fresh stream to whoever listens at the address again."""
    import threading
    import time

    from stagecoach.cluster.grpc_pipeline import GrpcPipeline
    from stagecoach.proto.link import DeliverySender

    def sample(batch_id):
        return pb.Delivery(batch_id=batch_id, samples=[pb.Sample(seq_id=batch_id, token_id=batch_id % 7)])

    first = GrpcPipeline("127.0.0.1")
    port = int(first.address.rsplit(":", 1)[1])
    acks, acked = [], threading.Event()

    def on_ack(*ack):
        acks.append(ack)
        acked.set()

    sender = DeliverySender(grpc.insecure_channel(first.address), on_ack=on_ack)
    try:
        for batch_id in (1, 2, 3):
            sender.send(sample(batch_id))
        got = [first.wait(timeout=10) for _ in range(3)]
        assert [(d.batch_id, d.samples[0].token_id) for d in got] == [(1, 1), (2, 2), (3, 3)]
        assert sender.wait_idle(10) and [(a[0], a[2]) for a in acks] == [(1, None), (2, None), (3, None)]

        first.shutdown()  # the neighbour goes away: the open stream ends
        acks.clear()
        acked.clear()
        sender.send(sample(4))
        assert acked.wait(20) and acks[0][0] == 4 and acks[0][2] is not None  # failed, not lost silently
        assert sender.wait_idle(10)

        second = GrpcPipeline("127.0.0.1", port)  # back at the same address
        try:
            # While the channel is still backing off its reconnects a delivery fails fast (and says so); once it is
            # connected again, the same sender's next deliveries arrive on a fresh stream, in order.
            batch_id, deadline = 5, time.monotonic() + 30
            while True:
                acks.clear()
                sender.send(sample(batch_id))
                assert sender.wait_idle(10) and acks[0][0] == batch_id
                if acks[0][2] is None:
                    break
                assert time.monotonic() < deadline, f"no delivery reached the restarted coordinator: {acks[0][2]}"
                batch_id += 1
                time.sleep(0.2)
            sender.send(sample(batch_id + 1))
            got = [second.wait(timeout=20) for _ in range(2)]
            assert [d.batch_id for d in got] == [batch_id, batch_id + 1]
            assert sender.wait_idle(10) and [(a[0], a[2]) for a in acks] == [(batch_id, None), (batch_id + 1, None)]
        finally:
            second.shutdown()
    finally:
        sender.close()
