"""Conversions between tensors / microbatches and their wire messages, with every size checked."""

from __future__ import annotations

import warnings

import torch

from stagecoach.errors import RequestError, WireError
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.microbatch import ChunkKind, MicroBatch, SeqChunk
from stagecoach.proto.types import SampleResult, SamplingParams

SCHEMA_VERSION = pb.SCHEMA_VERSION_CURRENT
_KINDS = frozenset(int(k) for k in ChunkKind)

_TO_WIRE = {
    torch.float32: pb.FLOAT32,
    torch.bfloat16: pb.BFLOAT16,
    torch.float16: pb.FLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}

# Decoded tensors are read-only views of the message's bytes (no copy); the stage never writes
# into its input, so torch's warning about non-writable buffers says nothing useful here.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def tensor_payload(tensor: torch.Tensor) -> tuple[pb.Tensor, memoryview]:
    """The tensor's dtype and shape as a message without data, and its bytes as a view (no copy)."""
    if tensor.dtype not in _TO_WIRE:
        raise WireError(f"tensor dtype {tensor.dtype} cannot travel; use one of {sorted(str(d) for d in _TO_WIRE)}")
    flat = tensor.detach().contiguous().view(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return pb.Tensor(dtype=_TO_WIRE[tensor.dtype], shape=list(tensor.shape)), memoryview(flat.view(torch.uint8).numpy())


def tensor_nbytes(msg: pb.Tensor, field: str = "tensor") -> tuple[torch.dtype, int]:
    """The dtype a tensor message names and the bytes its shape calls for; WireError if either is bad."""
    dtype = _FROM_WIRE.get(msg.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype {msg.dtype} is not a known dtype")
    if any(d < 0 for d in msg.shape):
        raise WireError(f"{field}.shape {list(msg.shape)} has a negative dimension")
    numel = 1
    for d in msg.shape:
        numel *= d
    return dtype, numel * dtype.itemsize


def tensor_from_proto(msg: pb.Tensor, field: str = "tensor", data: bytes | memoryview | None = None) -> torch.Tensor:
    """A CPU view of the message's bytes (or of `data`, bytes that came separately): no copy."""
    dtype, nbytes = tensor_nbytes(msg, field)
    data = msg.data if data is None else data
    if nbytes != len(data):
        raise WireError(f"{field}: shape {list(msg.shape)} of {dtype} needs {nbytes} bytes, got {len(data)}")
    if nbytes == 0:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(tuple(msg.shape))


# SamplingParams' fields that travel (as proto SamplingParams' fields of the same names), besides logprobs and seed.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(seed=p.seed or 0, **{f: getattr(p, f) for f in _SAMPLING_FIELDS})
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def _sampling_from_proto(msg: pb.SamplingParams, field: str) -> SamplingParams:
    """Checked by SamplingParams itself; it crosses once per sequence, with its first chunk."""
    try:
        return SamplingParams(
            seed=msg.seed,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
            **{f: getattr(msg, f) for f in _SAMPLING_FIELDS},
        )
    except RequestError as e:
        raise WireError(f"{field}: {e}") from None


def encode_microbatch(batch: MicroBatch, tensor_msg: pb.Tensor, timings=()) -> pb.MicroBatch:
    """The microbatch as its wire message around `tensor_msg` (a Link's header: the tensor's dtype and shape, its bytes
    travelling in the frames after it)."""
    seqs = []
    for c in batch.seqs:
        chunk = pb.SequenceChunk(
            seq_id=c.seq_id,
            start_pos=c.start_pos,
            num_tokens=c.num_tokens,
            new_blocks=c.new_blocks,
            do_sample=c.do_sample,
            num_prompt_tokens=c.num_prompt_tokens,
            token_ids=c.token_ids,
            kind=c.kind,
            score_rows=c.score_rows,
        )
        if c.sampling is not None:
            chunk.sampling.CopyFrom(_sampling_to_proto(c.sampling))
        seqs.append(chunk)
    return pb.MicroBatch(
        batch_id=batch.batch_id,
        seqs=seqs,
        tensor=tensor_msg,
        drop_seq_ids=batch.drop_seq_ids,
        timings=timings,
        schema_version=SCHEMA_VERSION,
    )


def decode_microbatch(msg: pb.MicroBatch, data: bytes | memoryview | None = None) -> tuple[MicroBatch, torch.Tensor]:
    """The microbatch and its tensor (data: the tensor's bytes, when they came in chunks): stage 0's token ids, or hidden states.

    A stage checks the tensor against its place in the pipeline (StageRunner.prepare); this checks the message itself.
    """
    if msg.schema_version != SCHEMA_VERSION:
        raise WireError(f"schema_version {msg.schema_version}: this stage speaks {SCHEMA_VERSION}")
    seqs = []
    for i, c in enumerate(msg.seqs):
        if c.kind == pb.CHUNK_KIND_UNSPECIFIED:
            raise WireError(f"seqs[{i}].kind is missing: every chunk names its kind (first, prefill or decode)")
        if c.score_rows:
            raise WireError(f"seqs[{i}].score_rows: deliveries do not carry row scores yet; ask for sampled rows only")
        # sampling: a first chunk's; what each kind may carry is checked by the stage that admits it (check_chunk)
        seqs.append(
            SeqChunk(
                c.seq_id,
                c.start_pos,
                c.num_tokens,
                list(c.new_blocks),
                c.do_sample,
                _sampling_from_proto(c.sampling, f"seqs[{i}].sampling") if c.HasField("sampling") else None,
                c.num_prompt_tokens,
                list(c.token_ids),
                ChunkKind(c.kind) if c.kind in _KINDS else c.kind,
            )
        )
    batch = MicroBatch(batch_id=msg.batch_id, seqs=seqs, token_ids=[], drop_seq_ids=list(msg.drop_seq_ids))
    return batch, tensor_from_proto(msg.tensor, data=data)


def encode_samples(samples: list[SampleResult]) -> list[pb.Sample]:
    out = []
    for s in samples:
        msg = pb.Sample(seq_id=s.seq_id, token_id=s.token_id)
        if s.logprob is not None:
            msg.logprob = s.logprob
        if s.top_logprobs:
            msg.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=lp) for t, lp in s.top_logprobs)
        out.append(msg)
    return out


def decode_samples(msgs) -> list[SampleResult]:
    return [
        SampleResult(
            seq_id=m.seq_id,
            token_id=m.token_id,
            logprob=m.logprob if m.HasField("logprob") else None,
            top_logprobs=[(t.token_id, t.logprob) for t in m.top_logprobs] or None,
        )
        for m in msgs
    ]
