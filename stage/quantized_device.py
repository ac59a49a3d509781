"""Quantized products off CPU: torch's own weight-only operators, each checked at load against the dequantized weight.

On CPU the stage's C++ product (stage/quantized.py) multiplies every format. On a GPU, after loading:

- int4 groups → torch's int4 tile layout (`_convert_weight_to_int4pack`, `_weight_int4pack_mm`: bfloat16 activations,
  sm80+, groups of 32 … 256, w = (q − 8) · scale + zero, so zero = offset + 8 · scale). The group is the largest of
  256, 128, 64, 32 over which the held scales and offsets repeat: a GPTQ group of 128 is multiplied as one again.
- int8 with one scale and offset per output row (per-channel) → `_weight_int8pack_mm` (x · qᵀ · scale) plus
  offset · Σx, where it measures faster at load than dequantize-and-multiply.
- anything else (int8 groups, float32 or float16 activations): dequantized at each product, QuantizedLinear's own path.

The self-check: CHECK_ROWS random rows through the prepared product against the same rows times the dequantized weight
rounded to the activations' type, as ‖y − y_ref‖ / ‖y_ref‖. Above BOUND the numbers are logged and that layer type
(q_proj, …, down_proj) stays dequantized from there on; earlier layers of the type passed their own checks. Where
torch's tile layout could be read two ways (the nibble order of its uint8 input), the second is tried before giving up.

The same code runs on CPU with torch's CPU variants of the int4 operators (`OPS["cpu"]`): how the tests check the
conversion, the self-check and the fallback on a machine without a GPU.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from stagecoach.stage.quantized import QuantizedLinear, dequantize

log = logging.getLogger(__name__)

CHECK_ROWS = 8
# ‖error‖ / ‖product‖ of a correct layout, measured on CPU's variant: 2.4e-3 in bfloat16, 3e-7 in float32 (bfloat16
# scales and zeros, and bfloat16 rounding of the reference weight); a wrong layout gives about 1.
BOUND = 2e-2


def _nibbles_high_first(values: torch.Tensor) -> torch.Tensor:
    return (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)  # [N, K / 2]: value 2i in the high nibble


def _nibbles_low_first(values: torch.Tensor) -> torch.Tensor:
    return (values[:, 1::2] << 4 | values[:, ::2]).to(torch.uint8)


class Int4Ops:
    """One device's int4 operators: its packings (tried in order by the self-check) and its product."""

    def __init__(self, name: str, packings: list, product, dtypes: tuple[torch.dtype, ...]) -> None:
        self.name, self.packings, self.product, self.dtypes = name, packings, product, dtypes


def _ops() -> dict[str, Int4Ops]:
    aten = torch.ops.aten
    cuda_pack = [
        lambda v, t, f=f: aten._convert_weight_to_int4pack(f(v), t) for f in (_nibbles_high_first, _nibbles_low_first)
    ]
    return {
        "cuda": Int4Ops("cuda", cuda_pack, aten._weight_int4pack_mm, (torch.bfloat16,)),
        "cpu": Int4Ops(
            "cpu",
            [lambda v, t: aten._convert_weight_to_int4pack_for_cpu(v.to(torch.int32), t)],
            aten._weight_int4pack_mm_for_cpu,
            (torch.float32, torch.bfloat16, torch.float16),
        ),
    }


class _DeviceLinear(nn.Module):
    """A Linear whose `product` (rows [M, in] → [M, out]) is one of torch's weight-only operators."""

    in_features: int
    out_features: int
    perm: torch.Tensor | None
    bias: torch.Tensor | None

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.perm is not None:
            rows = rows[:, self.perm]
        out = self.product(rows).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


class Int4PackedLinear(_DeviceLinear):
    """A Linear held in torch's int4 tile layout: qweight (the packed tiles), scales_and_zeros [in / group, out, 2]."""

    def __init__(self, source: QuantizedLinear, qweight, scales_and_zeros, group: int, ops: Int4Ops) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group, self.ops = source.in_features, source.out_features, group, ops
        self.qweight, self.scales_and_zeros = nn.Buffer(qweight), nn.Buffer(scales_and_zeros)
        self.perm = nn.Buffer(source.perm) if source.perm is not None else None
        self.bias = source.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ops.product(rows.to(self.scales_and_zeros.dtype), self.qweight, self.group, self.scales_and_zeros)


class Int8ChannelLinear(_DeviceLinear):
    """A per-channel int8 Linear through `_weight_int8pack_mm`: x · (scale · q + offset)ᵀ = int8 product + Σx · offset."""

    def __init__(self, source: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.qweight = nn.Buffer(source.qweight.view(torch.int8))
        self.scale = nn.Buffer(source.scales[:, 0].to(dtype).contiguous())
        self.offset = nn.Buffer(source.offsets[:, 0].to(dtype).contiguous()) if source.offsets is not None else None
        self.perm = nn.Buffer(source.perm) if source.perm is not None else None
        self.bias = source.bias

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(rows.to(self.scale.dtype), self.qweight, self.scale)
        if self.offset is not None:
            out = out + rows.to(self.scale.dtype).sum(-1, keepdim=True) * self.offset
        return out


def _repeats(linear: QuantizedLinear, group: int) -> bool:
    """Whether the held scales and offsets repeat over every run of `group` inputs."""
    runs = group // linear.group
    if linear.in_features % group or runs == 0:
        return False
    held = [linear.scales] + ([linear.offsets] if linear.offsets is not None else [])
    return all(bool((t.view(t.shape[0], -1, runs) == t.view(t.shape[0], -1, runs)[..., :1]).all()) for t in held)


def native_group(linear: QuantizedLinear) -> int | None:
    """The largest group of 256, 128, 64, 32 inputs over which the held scales and offsets repeat (torch's int4 op's)."""
    return next((group for group in (256, 128, 64, 32) if _repeats(linear, group)), None)


def _int4_values(linear: QuantizedLinear) -> torch.Tensor:
    """[out, in] int32 values 0 … 15 of the held int4 groups (byte j of a group: value j low, value j + 16 high)."""
    b = linear.qweight.view(linear.out_features, -1, 16).to(torch.int32)
    return torch.cat([b & 15, b >> 4], -1).view(linear.out_features, linear.in_features)


def check(prepared, linear: QuantizedLinear, dtype: torch.dtype) -> float:
    """‖prepared product − rows · dequantized weightᵀ‖ / ‖rows · dequantized weightᵀ‖ over CHECK_ROWS random rows."""
    g = torch.Generator(device=linear.qweight.device).manual_seed(0)
    rows = torch.randn(CHECK_ROWS, linear.in_features, generator=g, device=linear.qweight.device).to(dtype)
    weight = dequantize(linear.qweight, linear.scales, linear.offsets, linear.int4).to(dtype)
    ref = rows.float() @ weight.float().t()
    got = prepared.product(rows).float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _int4(linear: QuantizedLinear, ops: Int4Ops, packing, dtype: torch.dtype) -> Int4PackedLinear | None:
    group = native_group(linear)
    if group is None or linear.out_features % 8:
        return None
    tiles = next(t for t in (8, 4, 2) if linear.in_features % (16 * t) == 0)
    scales = linear.scales[:, :: group // linear.group]  # [out, in / group]
    offsets = linear.offsets[:, :: group // linear.group] if linear.offsets is not None else torch.zeros_like(scales)
    scales_and_zeros = torch.stack([scales.t(), (offsets + 8 * scales).t()], -1).to(dtype).contiguous()
    return Int4PackedLinear(linear, packing(_int4_values(linear), tiles), scales_and_zeros, group, ops)


def _timed(module, rows: torch.Tensor) -> float:
    for _ in range(2):
        module(rows)
    if rows.device.type == "cuda":
        torch.cuda.synchronize(rows.device)
    start = time.perf_counter()
    for _ in range(5):
        module(rows)
    if rows.device.type == "cuda":
        torch.cuda.synchronize(rows.device)
    return time.perf_counter() - start


def _int8(linear: QuantizedLinear, dtype: torch.dtype) -> Int8ChannelLinear | None:
    """The int8 operator for a per-channel linear, where it is faster than dequantizing (measured at one row)."""
    if linear.int4 or not _repeats(linear, linear.in_features):
        return None
    try:
        prepared = Int8ChannelLinear(linear, dtype)
        rows = torch.randn(1, linear.in_features, device=linear.qweight.device, dtype=dtype)
        return prepared if _timed(prepared, rows) < _timed(linear, rows) else None
    except (RuntimeError, NotImplementedError) as e:  # the operator is not built for this device
        log.info("int8 weight-only operator not usable here (%s): per-channel int8 is dequantized", e)
        return None


def prepare(model: nn.Module, dtype: torch.dtype, device_kind: str | Int4Ops = "cuda") -> dict[str, str]:
    """Swaps each QuantizedLinear of a loaded model for the device's operator where its self-check passes; returns, per
    layer type, what its products use."""
    ops = _ops()[device_kind] if isinstance(device_kind, str) else device_kind
    if dtype not in ops.dtypes:
        log.info("%s activations on %s: quantized weights are dequantized at each product", dtype, ops.name)
        return {}
    used: dict[str, str] = {}
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        kind = ".".join(name.split(".")[-2:])
        if used.get(kind, "").startswith("dequantized"):
            continue
        prepared, errors = None, []
        for i, packing in enumerate(ops.packings if linear.int4 else [None]):
            candidate = _int4(linear, ops, packing, dtype) if linear.int4 else _int8(linear, dtype)
            if candidate is None:
                break
            errors.append(check(candidate, linear, dtype))
            if errors[-1] <= BOUND:
                prepared = candidate
                ops.packings.insert(0, ops.packings.pop(i))  # the layout that checked out goes first from now on
                break
        if prepared is None and errors:
            log.warning(
                "%s: %s's quantized product differs from its dequantized weight by %s (relative; bound %g): %s is "
                "dequantized at each product from here on",
                name, kind, ", ".join(f"{e:.3g}" for e in errors), BOUND, kind,
            )  # fmt: skip
            used[kind] = f"dequantized (self-check {max(errors):.3g} > {BOUND:g})"
        if prepared is None:
            used.setdefault(kind, "dequantized")
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, prepared)
        used[kind] = (
            f"int4 {ops.name} group {prepared.group} (self-check {errors[-1]:.2g})"
            if isinstance(prepared, Int4PackedLinear)
            else "int8 operator"
        )
    return used
