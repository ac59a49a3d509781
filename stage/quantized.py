"""Weights kept quantized: GGUF's blocks unpacked into the grouped formats the stage's C++ product reads, and the
`Linear` and `Embedding` that hold them.

Every format is w = scale · q + offset per group of consecutive weights in a row (offset 0 where the format has none),
which holds each GGUF type's values exactly:

| GGUF | q                       | group | scale        | offset      | bytes per weight |
|------|-------------------------|-------|--------------|-------------|------------------|
| Q8_0 | int8                    | 32    | d            | —           | 1.125            |
| Q5_0 | int8 (−16 … 15)         | 32    | d            | —           | 1.125            |
| Q4_0 | int4 (0 … 15)           | 32    | d            | −8·d        | 0.75             |
| Q4_K | int4 (0 … 15)           | 32    | d·scale      | −dmin·min   | 0.75             |
| Q5_K | int8 (0 … 31)           | 32    | d·scale      | −dmin·min   | 1.25             |
| Q6_K | int8 (−32 … 31)         | 16    | d·scale      | —           | 1.25             |

int4 packs each block of 32 in 16 bytes, byte j holding q[j] (low nibble) and q[j + 16] (high nibble): Q4_0's own
order. A group is one block, or four (groups of 128: GPTQ's and AWQ's, stage/gptq_awq.py).
Scales and offsets are float32 (a K-type's d·scale has more bits than a float16 holds).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from stagecoach.errors import CheckpointError
from stagecoach.proto.gguf import TYPES
from stagecoach.stage import cpu_build

log = logging.getLogger(__name__)


@functools.cache
def cpu_kernel():
    """The compiled product, or None (logged once) where it cannot be built here."""
    return cpu_build.build(log, "quantized product", "quantized weights are dequantized for each product instead")


class QuantizedWeight:
    """One quantized matrix [out, in]: q (int8 [out, in], or uint8 [out, in / 2] for int4), scales and offsets
    [out, in / group] (offsets None where the format has none)."""

    __slots__ = ("q", "scales", "offsets", "group", "int4", "source", "perm")

    def __init__(self, q, scales, offsets, group: int, int4: bool, source: str, perm=None) -> None:
        self.q, self.scales, self.offsets, self.group, self.int4, self.source = q, scales, offsets, group, int4, source
        self.perm = perm  # int64 [in]: the order the product reads its input in (GPTQ's act-order), or None

    @property
    def format(self) -> str:
        return f"{'int4' if self.int4 else 'int8'}/{self.group}{'+offset' if self.offsets is not None else ''}"

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * (2 if self.int4 else 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by the names a QuantizedLinear or QuantizedEmbedding holds them under."""
        out = {"qweight": self.q, "scales": self.scales}
        out |= {"offsets": self.offsets} if self.offsets is not None else {}
        return out | ({"perm": self.perm} if self.perm is not None else {})

    def to(self, device) -> QuantizedWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        moved = (move(self.q), move(self.scales), move(self.offsets))
        return QuantizedWeight(*moved, self.group, self.int4, self.source, move(self.perm))


# Each GGUF type's format and its bytes per weight (the table above).
FORMATS = {
    "Q8_0": ("int8/32", 1.125),
    "Q5_0": ("int8/32", 1.125),
    "Q4_0": ("int4/32+offset", 0.75),
    "Q4_K": ("int4/32+offset", 0.75),
    "Q5_K": ("int8/32+offset", 1.25),
    "Q6_K": ("int8/16", 1.25),
}


def loaded_format(type_name: str, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[str, int]:
    """What a GGUF tensor becomes once loaded, and its bytes: its quantized format, or dtype for F32/F16 and vectors."""
    numel = 1
    for d in shape:
        numel *= d
    if type_name not in FORMATS or len(shape) != 2:
        return str(dtype).removeprefix("torch."), numel * dtype.itemsize
    name, per_weight = FORMATS[type_name]
    return name, int(numel * per_weight)


# -- GGUF blocks → formats -------------------------------------------------------------------------------------------
def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block, as float32 [rows, blocks, 1]."""
    return blocks[..., at : at + 2].contiguous().view(torch.float16).float()


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 sub-blocks' 6-bit scales and mins, packed in the 12 bytes after d and dmin."""
    s = blocks[..., 4:16].to(torch.int32)
    scale = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], -1)
    low = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return scale.float(), low.float()


def pack4(values: torch.Tensor) -> torch.Tensor:
    """[..., 32] values 0..15 → [..., 16] bytes, value j in the low and value j + 16 in the high nibble."""
    return (values[..., :16] | (values[..., 16:] << 4)).to(torch.uint8)


def from_gguf(raw: torch.Tensor, type_name: str, shape: tuple[int, int], source: str) -> QuantizedWeight:
    """raw: the tensor's bytes, uint8 [rows * bytes per row] → its format (see the table above)."""
    rows, cols = shape
    _, per_block, block_bytes = next(t for t in TYPES.values() if t[0] == type_name)
    b = raw.view(rows, cols // per_block, block_bytes)  # [rows, blocks, bytes per block]
    flat = lambda t: t.reshape(rows, -1).contiguous()  # noqa: E731
    if type_name == "Q8_0":
        return QuantizedWeight(flat(b[..., 2:].view(torch.int8)), flat(_f16(b, 0)), None, 32, False, type_name)
    if type_name == "Q4_0":
        d = _f16(b, 0)
        return QuantizedWeight(flat(b[..., 2:]), flat(d), flat(-8 * d), 32, True, type_name)
    if type_name == "Q5_0":
        qh = b[..., 2:6].unsqueeze(-1)  # [rows, blocks, 4, 1]: the fifth bit of value j is bit j % 8 of byte j // 8
        high = ((qh >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(rows, -1, 32)
        qs = b[..., 6:22]
        q = (torch.cat([qs & 15, qs >> 4], -1) | (high << 4)).view(torch.int8) - 16
        return QuantizedWeight(flat(q), flat(_f16(b, 0)), None, 32, False, type_name)
    if type_name == "Q4_K":
        scale, low = _k_scales(b)
        qs = b[..., 16:144].reshape(rows, -1, 4, 32).to(torch.int32)  # 4 runs of 32 bytes: two sub-blocks each
        q = torch.stack([qs & 15, qs >> 4], 3).reshape(rows, -1, 32)  # [rows, sub-blocks, 32]
        return QuantizedWeight(flat(pack4(q)), flat(_f16(b, 0) * scale), flat(-_f16(b, 2) * low), 32, True, type_name)
    if type_name == "Q5_K":
        scale, low = _k_scales(b)
        qh = b[..., 16:48].to(torch.int32).unsqueeze(2)  # [rows, blocks, 1, 32]: bit 2j and 2j + 1 for run j
        qs = b[..., 48:176].reshape(rows, -1, 4, 32).to(torch.int32)
        run = torch.arange(4).view(1, 1, 4, 1)
        lo = (qs & 15) | (((qh >> (2 * run)) & 1) << 4)
        hi = (qs >> 4) | (((qh >> (2 * run + 1)) & 1) << 4)
        q = torch.stack([lo, hi], 3).reshape(rows, -1)
        return QuantizedWeight(
            flat(q.to(torch.int8)), flat(_f16(b, 0) * scale), flat(-_f16(b, 2) * low), 32, False, type_name
        )
    if type_name == "Q6_K":
        ql = b[..., 0:128].reshape(rows, -1, 2, 64).to(torch.int32)  # two halves of 128 values
        qh = b[..., 128:192].reshape(rows, -1, 2, 32).to(torch.int32)
        low, high = ql[..., :32], ql[..., 32:]
        q = torch.cat(
            [
                (low & 15) | ((qh & 3) << 4),
                (high & 15) | (((qh >> 2) & 3) << 4),
                (low >> 4) | (((qh >> 4) & 3) << 4),
                (high >> 4) | (((qh >> 6) & 3) << 4),
            ],
            -1,
        )
        scales = b[..., 192:208].contiguous().view(torch.int8).float() * _f16(b, 208)
        return QuantizedWeight(flat((q - 32).to(torch.int8)), flat(scales), None, 16, False, type_name)
    raise CheckpointError(f"{source}: GGUF type {type_name} has no quantized format here")


def dequantize(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, int4: bool) -> torch.Tensor:
    """The float32 values [rows, in] of a format's rows (an embedding's looked-up rows, or a whole matrix off CPU)."""
    rows, groups = scales.shape
    if int4:
        b = q.view(rows, groups, -1, 16).to(torch.int32)  # [rows, groups, blocks of 32 per group, 16 bytes]
        values = torch.cat([b & 15, b >> 4], -1).view(rows, groups, -1).float()
    else:
        values = q.view(rows, groups, -1).float()
    values = values * scales.unsqueeze(-1)
    if offsets is not None:
        values = values + offsets.unsqueeze(-1)
    return values.view(rows, -1)


# -- the modules ------------------------------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A Linear whose weight stays in its quantized format; the product is stage/csrc/quantized.cpp's on CPU."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: int, int4: bool, offsets: bool, perm: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group, self.int4 = in_features, out_features, group, int4
        self.perm = nn.Buffer(torch.empty(in_features, dtype=torch.int64)) if perm else None
        self.qweight = nn.Buffer(torch.empty(out_features, in_features // (2 if int4 else 1), dtype=torch.uint8))
        self.scales = nn.Buffer(torch.empty(out_features, in_features // group))
        self.offsets = nn.Buffer(torch.empty(out_features, in_features // group)) if offsets else None
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @classmethod
    def like(cls, weight: QuantizedWeight, bias: bool) -> QuantizedLinear:
        out_features, in_features = weight.shape
        return cls(
            in_features,
            out_features,
            bias,
            weight.group,
            weight.int4,
            weight.offsets is not None,
            weight.perm is not None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows[:, self.perm]  # GPTQ's act-order: the inputs in the order the groups were made in
        args = (rows, self.qweight, self.scales, self.offsets, self.bias, self.group, self.int4)
        # In a compiled step one opaque operator, as packed_linear.
        out = torch.ops.stagecoach.quant_linear(*args) if torch.compiler.is_compiling() else quant_product(*args)
        return out.view(*x.shape[:-1], self.out_features)


def quant_product(x, qweight, scales, offsets, bias, group: int, int4: bool) -> torch.Tensor:
    """x [rows, in] times the format's matrix (+ bias): the C++ product on CPU, else the dequantized matrix's."""
    kernel = cpu_kernel() if x.device.type == "cpu" else None
    if kernel is None:
        return F.linear(x, dequantize(qweight, scales, offsets, int4).to(x.dtype), bias)
    none = torch.empty(0)
    offsets = none if offsets is None else offsets
    bias = none if bias is None else bias.float()
    return kernel.quant_linear(x.float(), qweight, scales, offsets, bias, group, int4).to(x.dtype)


@torch.library.custom_op("stagecoach::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None,
    group: int,
    int4: bool,
) -> torch.Tensor:
    """QuantizedLinear's product in a compiled step."""
    return quant_product(x, qweight, scales, offsets, bias, group, int4)


@quant_linear.register_fake
def _(x, qweight, scales, offsets, bias, group, int4) -> torch.Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


class QuantizedEmbedding(nn.Module):
    """The token embedding in its quantized format: a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group: int, int4: bool, offsets: bool) -> None:
        super().__init__()
        self.embedding_dim, self.int4 = embedding_dim, int4
        self.qweight = nn.Buffer(torch.empty(num_embeddings, embedding_dim // (2 if int4 else 1), dtype=torch.uint8))
        self.scales = nn.Buffer(torch.empty(num_embeddings, embedding_dim // group))
        self.offsets = nn.Buffer(torch.empty(num_embeddings, embedding_dim // group)) if offsets else None

    @classmethod
    def like(cls, weight: QuantizedWeight) -> QuantizedEmbedding:
        rows, cols = weight.shape
        return cls(rows, cols, weight.group, weight.int4, weight.offsets is not None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = None if self.offsets is None else self.offsets[ids]
        return dequantize(self.qweight[ids], self.scales[ids], offsets, self.int4)


def install(model: nn.Module, state: dict) -> dict[str, torch.Tensor]:
    """Swaps each module whose weight `state` holds quantized for its quantized kind (its tensors still on the meta
    device); returns the state dict to assign, the quantized weights spelled out as their modules' tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(value, QuantizedWeight):
            out[name] = value
            continue
        path = name.removesuffix(".weight")
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, QuantizedLinear | QuantizedEmbedding):
            with torch.device("meta"):
                if isinstance(old, nn.Embedding):
                    new = QuantizedEmbedding.like(value)
                else:
                    new = QuantizedLinear.like(value, bias=getattr(old, "bias", None) is not None)
            if getattr(old, "bias", None) is not None:
                new.bias = old.bias
            setattr(parent, child, new)
        out |= {f"{path}.{key}": tensor for key, tensor in value.tensors().items()}
    return out
