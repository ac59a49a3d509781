"""Tiny GPTQ and AWQ checkpoints, written from the layouts by the tests' own code (not the project's): random packed
values in every decoder linear, and transformers' model on the same values dequantized (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of an AWQ word holds this column of its eight


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Value j of each run of 32 / bits along dim at bits bits·j of an int32."""
    per = 32 // bits
    moved = values.movedim(dim, -1)
    v = moved.reshape(*moved.shape[:-1], -1, per).to(torch.int64)
    words = (v << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] 4-bit values → [rows, out / 8] words, nibble i holding column AWQ_ORDER[i] of its eight."""
    v = values.view(values.shape[0], -1, 8)[..., AWQ_ORDER]
    return pack(v.reshape(values.shape[0], -1), 4, 1)


def packed_linear(method, bits, group, order, v2, sym, out_features, in_features, g):
    """(the checkpoint's tensors by suffix, the float weight [out, in] they stand for); order: act-order's shuffle of
    the inputs' groups, or None."""
    group = in_features if group == -1 else group
    groups = in_features // group
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=g)
    if sym:
        z = torch.full((groups, out_features), 2 ** (bits - 1) - (0 if v2 else 1))
    else:
        z = torch.randint(0, 2**bits - 1, (groups, out_features), generator=g)
    scales = ((torch.rand(groups, out_features, generator=g) + 0.5) * (0.04 / 2**bits)).half()
    if method == "awq":
        w = scales.float().repeat_interleave(group, 0) * (q - z.repeat_interleave(group, 0)).float()
        return {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": scales}, w.t().contiguous()
    g_idx = torch.arange(in_features) // group
    if order is not None:
        g_idx = g_idx[order]
    zeff = z + (0 if v2 else 1)
    w = scales.float()[g_idx] * (q - zeff[g_idx]).float()
    tensors = {"qweight": pack(q, bits, 0), "qzeros": pack(z, bits, 1), "scales": scales, "g_idx": g_idx.int()}
    return tensors, w.t().contiguous()


def make_packed(
    path: Path,
    hf_model,
    method="gptq",
    bits=4,
    group=128,
    act_order=False,
    v2=False,
    sym=False,
    seed=0,
    label_v2=None,
    shared_orders=True,
):
    """Rewrites the saved checkpoint in `path` (HF's model.safetensors) with every decoder linear packed; sets those
    weights of `hf_model` to the values they stand for. label_v2=False writes v2 zeros under v1's label. With
    act_order, linears that read one input get one order, as GPTQ gives them (shared_orders=False: each its own)."""
    state = load_file(path / "model.safetensors")
    params = dict(hf_model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    orders: dict[tuple[str, str], torch.Tensor] = {}
    for name in sorted(state):
        if ".layers." in name and name.endswith(tuple(f"{p}.weight" for p in LINEARS)):
            out_features, in_features = state.pop(name).shape
            order = None
            if act_order:
                layer, _, proj = name.removesuffix(".weight").rpartition(".")
                same_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
                key = (layer, same_input.get(proj, proj) if shared_orders else proj)
                order = orders.setdefault(key, torch.randperm(in_features, generator=g))
            tensors, w = packed_linear(method, bits, group, order, v2, sym, out_features, in_features, g)
            state |= {name.removesuffix("weight") + suffix: t.contiguous() for suffix, t in tensors.items()}
            with torch.no_grad():
                params[name].copy_(w)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    q = {"quant_method": method, "bits": bits, "group_size": group}
    q |= {"version": "gemm", "zero_point": True} if method == "awq" else {"desc_act": act_order, "sym": sym}
    q |= {"checkpoint_format": "gptq_v2"} if method == "gptq" and (v2 if label_v2 is None else label_v2) else {}
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": q}, indent=1))
    return hf_model
