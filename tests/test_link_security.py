"""Stage links: the shared token, mutual TLS, and malformed microbatches refused field by field."""

from __future__ import annotations

import datetime
import ipaddress
import random

import grpc
import pytest
import torch
from defaults import scheduler_config
from helpers import make_hf_checkpoint, send_one, wire_microbatch

from stagecoach.cluster.backends import LocalPipeline, ThreadPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc
from stagecoach.proto.microbatch import MicroBatch, SeqChunk
from stagecoach.proto.types import SamplingParams

HIDDEN = 64
RANGES = ranges_from_counts([2, 1], 3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("links")
    make_hf_checkpoint(path, num_hidden_layers=3, max_position_embeddings=256)
    return path


def greedy_ids(pipeline, prompts, n=6):
    engine = Engine(pipeline, scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size), max_inflight=2)
    return [
        s.output_token_ids
        for s in engine.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _ in prompts]
        )
    ]


@pytest.fixture(scope="module")
def pipeline(model):
    p = ThreadPipeline(model, RANGES, num_blocks=32, block_size=8)
    yield p
    p.shutdown()


def raw_stub(address: str) -> pb_grpc.StageStub:
    return pb_grpc.StageStub(grpc.insecure_channel(address))


def test_calls_without_the_token_are_unauthenticated(pipeline):
    stub = raw_stub(pipeline.stages[1].address)
    good = wire_microbatch(MicroBatch(0, [SeqChunk(0, 0, 1, [0], False, SamplingParams())], []), torch.zeros(1, HIDDEN))
    link = lambda request, timeout: send_one(stub, request, timeout)  # noqa: E731
    for call, request in ((link, good), (stub.Info, pb.InfoRequest()), (stub.Health, pb.HealthRequest())):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        stub.Health(pb.HealthRequest(), timeout=10, metadata=(("x-stagecoach-token", "not-the-token"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    from stagecoach.proto.link import LinkSender, link_message  # the Link stream, the way stages send

    acks = []
    sender = LinkSender(grpc.insecure_channel(pipeline.stages[1].address), on_ack=lambda *a: acks.append(a))
    sender.send(
        *link_message(MicroBatch(0, [SeqChunk(0, 0, 1, [0], False, SamplingParams())], []), torch.zeros(1, HIDDEN))
    )
    assert sender.wait_idle(10) and len(acks) == 1
    assert isinstance(acks[0][2], grpc.RpcError) and acks[0][2].code() == grpc.StatusCode.UNAUTHENTICATED
    from stagecoach.proto.link import DeliverySender  # the coordinator's Deliveries stream, the way stages deliver

    acks.clear()
    deliveries = DeliverySender(grpc.insecure_channel(pipeline.address), on_ack=lambda *a: acks.append(a))
    deliveries.send(pb.Delivery(batch_id=1))
    assert deliveries.wait_idle(10) and len(acks) == 1
    assert isinstance(acks[0][2], grpc.RpcError) and acks[0][2].code() == grpc.StatusCode.UNAUTHENTICATED


def malformed_microbatches(rng: random.Random) -> list[tuple[str, pb.MicroBatch, bool]]:
    """(what is wrong, message, for stage 0?) — each breaks one rule the stage must check."""

    def ok_chunk(**kw):
        base = dict(seq_id=rng.randrange(1000), start_pos=0, num_tokens=2, new_blocks=[0], sampling=SamplingParams())
        return SeqChunk(**(base | kw))

    def hidden(batch, tensor=None):
        return wire_microbatch(batch, tensor if tensor is not None else torch.zeros(batch.num_tokens, HIDDEN))

    cases = []
    for _ in range(20):
        n = rng.randrange(1, 6)
        cases += [
            (
                "wrong dtype",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=n)], []), torch.zeros(n, HIDDEN, dtype=torch.bfloat16)),
                False,
            ),
            (
                "wrong hidden size",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=n)], []), torch.zeros(n, HIDDEN + rng.randrange(1, 9))),
                False,
            ),
            ("too few rows", hidden(MicroBatch(0, [ok_chunk(num_tokens=n)], []), torch.zeros(n + 1, HIDDEN)), False),
            (
                "block out of range",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=1, new_blocks=[rng.randrange(32, 10**6)])], [])),
                False,
            ),
            (
                "negative block",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=1, new_blocks=[-1 - rng.randrange(5)])], [])),
                False,
            ),
            (
                "too few blocks for its positions",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=9 + rng.randrange(8), new_blocks=[0])], [])),
                False,
            ),
            (
                "position beyond the model",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=257 + rng.randrange(7), new_blocks=list(range(32)))], [])),
                False,
            ),
            (
                "unknown sequence",
                hidden(
                    MicroBatch(
                        0,
                        [
                            ok_chunk(
                                seq_id=10**6 + rng.randrange(1000),
                                start_pos=1 + rng.randrange(50),
                                num_tokens=1,
                                new_blocks=[],
                            )
                        ],
                        [],
                    )
                ),
                False,
            ),
            (
                "duplicate sequence",
                hidden(MicroBatch(0, [ok_chunk(seq_id=5, num_tokens=1), ok_chunk(seq_id=5, num_tokens=1)], [])),
                False,
            ),
            (
                "history token outside the vocabulary",
                hidden(MicroBatch(0, [ok_chunk(num_tokens=1, token_ids=[512 + rng.randrange(10**6)])], [])),
                False,
            ),
            (
                "missing token ids",
                wire_microbatch(MicroBatch(0, [ok_chunk(num_tokens=n)], list(range(max(0, n - 1)))), None),
                True,
            ),
        ]
    # Raw wire damage: bytes that disagree with the shape, an unknown dtype, a first chunk without sampling, an old schema.
    base = hidden(MicroBatch(0, [ok_chunk(num_tokens=1)], []))
    for i in range(10):
        m = pb.MicroBatch()
        m.CopyFrom(base)
        m.tensor.data = m.tensor.data[: rng.randrange(len(m.tensor.data))]
        cases.append(("truncated tensor bytes", m, False))
        m = pb.MicroBatch()
        m.CopyFrom(base)
        m.tensor.dtype = 40 + i
        cases.append(("unknown dtype", m, False))
        m = pb.MicroBatch()
        m.CopyFrom(base)
        m.seqs[0].ClearField("sampling")
        cases.append(("first chunk without sampling", m, False))
        m = pb.MicroBatch()
        m.CopyFrom(base)
        m.schema_version = 0
        cases.append(("old schema", m, False))
        # The chunk kinds: none named, one not served (verify, or a kind from a newer schema), scored rows over the wire.
        for what, change in (
            ("no kind", lambda c: setattr(c, "kind", pb.CHUNK_KIND_UNSPECIFIED)),
            ("a verify chunk", lambda c: setattr(c, "kind", pb.CHUNK_VERIFY)),
            ("an unknown kind", lambda c, i=i: setattr(c, "kind", 5 + i)),
            ("scored rows", lambda c: setattr(c, "score_rows", True)),
            ("a prefill chunk with sampling parameters", lambda c: setattr(c, "kind", pb.CHUNK_PREFILL)),
        ):
            m = pb.MicroBatch()
            m.CopyFrom(base)
            change(m.seqs[0])
            cases.append((what, m, False))
        m = pb.MicroBatch()
        m.CopyFrom(base)
        m.ClearField("seqs")
        cases.append(("no sequences", m, False))
    return cases


def test_two_hundred_malformed_microbatches_are_refused_and_the_stage_keeps_serving(pipeline, model):
    cases = malformed_microbatches(random.Random(0))
    assert len(cases) >= 200
    for what, message, first in cases:
        stub = pipeline.stubs[0 if first else 1]
        ack = send_one(stub, message)
        assert ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], what
        assert ack.error, what
    assert all(h.serving for h in pipeline.health())
    local = LocalPipeline.load(model, RANGES, num_blocks=32, block_size=8)
    assert greedy_ids(pipeline, [[3, 4, 5]]) == greedy_ids(local, [[3, 4, 5]])


def make_ca_and_certs(directory, addresses=("127.0.0.1",)):
    """A CA, and a certificate for the addresses signed by it (used by every party), with the cryptography package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, name):
        (directory / name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stagecoach test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stage")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [*(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, "key.pem")
    return {
        "tls_cert": str(directory / "cert.pem"),
        "tls_key": str(directory / "key.pem"),
        "tls_ca": str(directory / "ca.pem"),
    }


def test_mutual_tls_links_work_and_refuse_a_client_without_a_certificate(model, tmp_path):
    tls = make_ca_and_certs(tmp_path)
    p = ThreadPipeline(model, RANGES, num_blocks=32, block_size=8, **tls)
    try:
        local = LocalPipeline.load(model, RANGES, num_blocks=32, block_size=8)
        assert greedy_ids(p, [[9, 8, 7]]) == greedy_ids(local, [[9, 8, 7]])
        token = (("x-stagecoach-token", p.security.token),)
        ca = (tmp_path / "ca.pem").read_bytes()
        for channel in (
            grpc.insecure_channel(p.stages[0].address),  # no TLS at all
            grpc.secure_channel(p.stages[0].address, grpc.ssl_channel_credentials(root_certificates=ca)),
        ):  # TLS, no client certificate
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=10, metadata=token)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        p.shutdown()
