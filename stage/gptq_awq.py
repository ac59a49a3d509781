"""GPTQ and AWQ checkpoints' packed tensors → the grouped formats of stage/quantized.py (w = scale · q + offset).

GPTQ (AutoGPTQ / GPTQModel): `qweight` int32 [in / (32 / bits), out], packed along the input dimension (value j of a
word at bits bits·j); `qzeros` int32 [groups, out / (32 / bits)], packed along the output dimension the same way;
`scales` float16 [groups, out]; `g_idx` int32 [in], each input's group. The weight is scale · (q − z'), where z' is the
stored zero + 1 for `checkpoint_format: gptq` (v1) and the stored zero for `gptq_v2`. With act-order (`desc_act`),
g_idx is not in order: the inputs are permuted at load so that each group's are contiguous, and the layer permutes
its input the same way (the returned `perm`).

AWQ (AutoAWQ "gemm"): `qweight` int32 [in, out / 8] packed along the output dimension in AWQ's order (nibble i holds
column (0, 2, 4, 6, 1, 3, 5, 7)[i] of its eight); `qzeros` int32 [groups, out / 8] packed the same way; `scales`
float16 [groups, out]; scale · (q − z), 4 bits.

Groups of 128 (and 256, and per-channel over a multiple of 128 inputs) are held in groups of 128 at 4 bits, the
others in groups of 32, each repeating its group's scale and offset: the values are the same, and the kernel
multiplies both. 4-bit values stay int4 (0 … 15, offset −scale · z'); 8-bit values are held as int8 q − 128 with
offset −scale · (z' − 128), in groups of 32.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from stagecoach.errors import CheckpointError
from stagecoach.stage.quantized import QuantizedWeight, pack4

log = logging.getLogger(__name__)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds this column of its eight


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words → their 32 / bits values (0 … 2^bits − 1) each, value j at bits bits·j, laid along `dim`."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per]
    values = values.movedim(-1, dim + 1 if dim >= 0 else dim)  # the values of a word follow it along dim
    shape = list(words.shape)
    shape[dim] *= per
    return values.reshape(shape)


def held_group(group: int, bits: int) -> int:
    """The group a checkpoint's group (its size in inputs) is held in: 128 at 4 bits where it is a multiple of 128."""
    return 128 if bits == 4 and group % 128 == 0 else 32


def _grouped(q_nk: torch.Tensor, scale_ng: torch.Tensor, zero_ng: torch.Tensor, bits: int, source: str):
    """q [out, in] (0 … 2^bits − 1), scale and effective zero [out, groups] → the format (held_group's groups)."""
    out_features, in_features = q_nk.shape
    group = in_features // scale_ng.shape[1]
    if group % 32 or in_features % 32:
        raise CheckpointError(f"{source}: group size {group} over {in_features} inputs; served: multiples of 32")
    held = held_group(group, bits)
    scale = scale_ng.float().repeat_interleave(group // held, dim=1).contiguous()
    zero = zero_ng.float().repeat_interleave(group // held, dim=1)
    if bits == 4:
        q = pack4(q_nk.reshape(out_features, -1, 32).to(torch.int32)).reshape(out_features, -1)
        return QuantizedWeight(q.contiguous(), scale, (-scale * zero).contiguous(), held, True, source)
    q = (q_nk - 128).to(torch.int8).contiguous()
    return QuantizedWeight(q, scale, (-scale * (zero - 128)).contiguous(), held, False, source)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    v2_zeros: bool,
    source: str,
) -> QuantizedWeight:
    """A GPTQ linear's tensors → its format, with act-order's input permutation (`perm`) where g_idx is out of order."""
    if bits not in (4, 8):
        raise CheckpointError(f"{source}: GPTQ with {bits} bits; served: 4 and 8")
    q = unpack(qweight, bits, 0)  # [in, out]
    zeros = unpack(qzeros, bits, 1)  # [groups, out]
    in_features, groups = q.shape[0], scales.shape[0]
    if zeros.shape != scales.shape or in_features % groups:
        raise CheckpointError(f"{source}: qzeros {list(qzeros.shape)} and scales {list(scales.shape)} do not match")
    group = in_features // groups
    in_order = torch.arange(in_features, device=q.device) // group
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), in_order):
        if not torch.equal(torch.bincount(g_idx.long(), minlength=groups).cpu(), torch.full((groups,), group)):
            raise CheckpointError(f"{source}: g_idx does not give each of the {groups} groups {group} inputs")
        perm = torch.argsort(g_idx.long(), stable=True)  # act-order: each group's inputs together
        q = q[perm]
    weight = _grouped(q.t(), scales.t(), zeros.t() + (0 if v2_zeros else 1), bits, source)
    weight.perm = perm
    return weight


def zeros_are_v2(qzeros: torch.Tensor, bits: int, sym: bool) -> bool:
    """A symmetric checkpoint labelled v1 whose stored zeros all sit at the midpoint (8 for 4 bits) rather than one
    below it: its zeros are v2's (q − z), whatever its label says."""
    return sym and bool((unpack(qzeros, bits, 1) == 1 << (bits - 1)).all())


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, source: str) -> QuantizedWeight:
    """An AWQ ("gemm") linear's tensors → its format."""
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=qweight.device))  # column c of eight is nibble inverse[c]

    def columns(words: torch.Tensor) -> torch.Tensor:  # [rows, out / 8] → [rows, out], columns in order
        v = unpack(words, 4, 1).view(words.shape[0], -1, 8)
        return v[..., inverse].reshape(words.shape[0], -1)

    q, zeros = columns(qweight), columns(qzeros)  # [in, out], [groups, out]
    if zeros.shape != scales.shape or q.shape[1] != scales.shape[1] or q.shape[0] % scales.shape[0]:
        raise CheckpointError(
            f"{source}: AWQ qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)} and scales "
            f"{list(scales.shape)} do not match"
        )
    return _grouped(q.t(), scales.t(), zeros.t(), 4, source)


# -- checkpoints ------------------------------------------------------------------------------------------------------
PACKED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the decoder layers' linears


class PackedConfig:
    """A checkpoint's `quantization_config` (config.json), as served: GPTQ 4/8 bits or AWQ gemm 4 bits."""

    __slots__ = ("method", "bits", "group", "desc_act", "sym", "v2", "told")

    def __init__(self, quantization_config: dict, source: str) -> None:
        q = quantization_config
        self.method = q.get("quant_method")
        self.bits = int(q.get("bits", q.get("w_bit", 0)))
        self.group = int(q.get("group_size", q.get("q_group_size", -1)))  # -1: one group over all inputs
        self.desc_act, self.sym = bool(q.get("desc_act", False)), bool(q.get("sym", True))
        self.v2 = q.get("checkpoint_format", "gptq") == "gptq_v2"
        self.told = False
        if self.method == "gptq" and q.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{source}: GPTQ in the {q['checkpoint_format']} layout; served: gptq, gptq_v2")
        if self.method == "gptq" and self.bits not in (4, 8):
            raise CheckpointError(f"{source}: GPTQ with {self.bits} bits; served: 4 and 8")
        if self.method == "awq" and (self.bits != 4 or str(q.get("version", "gemm")).lower() != "gemm"):
            raise CheckpointError(f"{source}: AWQ {q.get('version')} with {self.bits} bits; served: gemm, 4 bits")
        if self.method not in ("gptq", "awq"):
            raise CheckpointError(f"{source}: quantization {self.method!r}; served: gptq, awq (and GGUF files)")

    def suffixes(self) -> tuple[str, ...]:
        """The tensors that stand for a linear's `weight` in the checkpoint."""
        return ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else ("qweight", "qzeros", "scales")

    def loaded(self, name: str, shape: tuple[int, int]) -> tuple[str, int]:
        """What the linear `name` of shape [out, in] becomes once loaded, and its bytes. With act-order a layer holds
        one input order per input its linears read (share_input_orders): charged to q_proj, o_proj and gate_proj."""
        out_features, in_features = shape
        held = held_group(in_features if self.group == -1 else self.group, self.bits)
        numel = out_features * in_features
        nbytes = numel * self.bits // 8 + 8 * numel // held  # values; a float32 scale and offset per group
        order = self.desc_act and name.endswith(ORDER_HOLDERS)
        return f"int{self.bits}/{held}+offset", nbytes + (8 * in_features if order else 0)

    def weight(self, tensors: dict[str, torch.Tensor], source: str) -> QuantizedWeight:
        """A linear's format from its checkpoint tensors (by suffix)."""
        qweight, groups = tensors["qweight"], tensors["scales"].shape[0]
        in_features = qweight.shape[0] * (32 // self.bits if self.method == "gptq" else 1)
        if groups != (1 if self.group == -1 else in_features // self.group):
            raise CheckpointError(
                f"{source}: scales {list(tensors['scales'].shape)} give {groups} groups over {in_features} inputs, "
                f"but config.json's quantization_config says group_size {self.group}"
            )
        if self.method == "awq":
            return from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], source)
        v2 = self.v2 or zeros_are_v2(tensors["qzeros"], self.bits, self.sym)
        if v2 and not self.v2 and not self.told:
            self.told = True
            log.warning(
                "%s: labelled gptq (v1), but its symmetric zeros sit at the midpoint: read as v2 (q - z)", source
            )
        return from_gptq(
            tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), self.bits, v2, source
        )


ORDER_HOLDERS = ("q_proj.weight", "o_proj.weight", "gate_proj.weight")


def share_input_orders(model) -> None:
    """Act-order's input permutations, once per input rather than once per linear, on a loaded stage model's layers:
    q, k and v read one input, so their common order moves to the attention (`input_perm`); gate and up likewise to the
    MLP; and down_proj's order is folded into gate's and up's output rows (down's input is their elementwise product),
    so it costs nothing at run time. GPTQ gives linears that read one input one order (they share a Hessian); where
    they do not, each keeps its own. Layers already done are left as they are."""
    for layer in model.model.layers.values():
        attn, mlp = layer.self_attn, layer.mlp
        _fold_into_rows(mlp.down_proj, (mlp.gate_proj, mlp.up_proj))
        _share(attn, (attn.q_proj, attn.k_proj, attn.v_proj))
        _share(mlp, (mlp.gate_proj, mlp.up_proj))


def _share(owner, linears) -> None:
    perms = [getattr(linear, "perm", None) for linear in linears]
    if perms[0] is None or any(p is None or not torch.equal(p, perms[0]) for p in perms[1:]):
        return
    owner.input_perm = perms[0]
    for linear in linears:
        linear.perm = None


def _fold_into_rows(consumer, producers) -> None:
    """consumer reads its input in the order perm; each producer's output rows reordered by perm give it that order."""
    perm = getattr(consumer, "perm", None)
    if perm is None or any(getattr(p, "qweight", None) is None or p.bias is not None for p in producers):
        return
    for p in producers:
        p.qweight, p.scales = p.qweight[perm], p.scales[perm]
        if p.offsets is not None:
            p.offsets = p.offsets[perm]
    consumer.perm = None


def is_packed(name: str) -> bool:
    """Whether a stage tensor's HF name is a decoder linear's weight (packed in GPTQ and AWQ checkpoints)."""
    return name.startswith("model.layers.") and name.endswith(tuple(f"{p}.weight" for p in PACKED))


def packed_weights(model_dir, packed, specs, raw, device, progress=None) -> dict[str, QuantizedWeight]:
    """The GPTQ or AWQ linears of `specs` in their formats, from their checkpoint tensors in `raw`; progress, if given,
    gets each one's bytes as held (its share of the layer's input orders, see share_input_orders)."""
    out = {}
    for name, shape in specs.items():
        prefix = name.removesuffix("weight")
        weight = packed.weight({suffix: raw[prefix + suffix] for suffix in packed.suffixes()}, prefix + "qweight")
        if weight.shape != shape:
            raise CheckpointError(
                f"checkpoint {model_dir}: {prefix}qweight holds {list(weight.shape)}, expected {list(shape)}"
            )
        out[name] = weight.to(device)
        if progress is not None:
            progress(packed.loaded(name, shape)[1])
    return out


def packed_config(model_dir: Path) -> PackedConfig | None:
    """A GPTQ or AWQ checkpoint's quantization settings (config.json's quantization_config); None for float ones."""
    path = Path(model_dir) / "config.json"
    q = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    return PackedConfig(q, str(path)) if q else None
