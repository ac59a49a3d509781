"""Quantized products off CPU (stage/quantized_device.py), checked here through torch's CPU variants of the same int4
operators: a whole stage's logits against HF's, the group each layer type is multiplied in, the self-check's fallback
when a layout is wrong (and its second layout), and the per-channel int8 operator. CUDA itself runs in bench/gpu.py."""

from __future__ import annotations

import logging

import pytest
import torch
from test_model_parity import CONFIGS, PROMPT

from stagecoach.stage import quantized_device
from stagecoach.stage.gptq_awq import from_gptq
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.loader import load_stage_model
from stagecoach.stage.model import AttentionMetadata
from stagecoach.stage.quantized import QuantizedLinear
from stagecoach.stage.quantized_device import Int4Ops, Int4PackedLinear, Int8ChannelLinear

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, config) -> torch.Tensor:
    cache = KVCache(config.num_hidden_layers, 4, 16, config.num_key_value_heads, config.head_dim)
    meta = AttentionMetadata.build([(0, len(PROMPT), [0])], 16, torch.device("cpu"))
    with torch.inference_mode():
        return model(torch.tensor(PROMPT), meta, cache)


def stage(hf_checkpoint, key):
    path, hf_model = hf_checkpoint(key, **CONFIGS[key])
    model = load_stage_model(path, 0, CONFIGS[key]["num_hidden_layers"])
    with torch.no_grad():
        ref = hf_model(torch.tensor([PROMPT])).logits[0]
    return model, ref


@pytest.mark.parametrize(
    "key, groups",
    [
        ("gptq_4bit_g128_actorder", {t: 128 for t in TYPES}),
        ("awq_4bit_g64", {t: 64 for t in TYPES}),
        ("gptq_4bit_channel_midpoint", {t: 256 for t in TYPES}),  # per-channel: the largest group the op takes
        # GGUF: the Q4_0 / Q4_K tensors in groups of 32; the int8-held types (Q8_0, Q5_*, Q6_K) stay dequantized
        ("gguf_mixed", None),
    ],
)
def test_the_int4_operator_gives_the_stage_hfs_logits(hf_checkpoint, key, groups):
    model, ref = stage(hf_checkpoint, key)
    used = quantized_device.prepare(model, torch.float32, "cpu")
    prepared = {n.split(".")[-1]: m.group for n, m in model.named_modules() if isinstance(m, Int4PackedLinear)}
    if groups is not None:
        assert prepared == groups, used
    else:
        assert set(prepared.values()) == {32} and any(v == "dequantized" for v in used.values()), used
    assert (logits(model, model.config) - ref).abs().max().item() <= 1e-4


def broken(values: torch.Tensor, tiles: int) -> torch.Tensor:
    """A wrong reading of the layout: the inputs in reverse."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.flip(1).to(torch.int32), tiles)


def right(values: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), tiles)


def test_a_failed_self_check_leaves_the_layer_type_dequantized(hf_checkpoint, caplog):
    model, ref = stage(hf_checkpoint, "gptq_4bit_g128_actorder")
    ops = Int4Ops("cpu", [broken], torch.ops.aten._weight_int4pack_mm_for_cpu, (torch.float32,))
    with caplog.at_level(logging.WARNING, logger="stagecoach.stage.quantized_device"):
        used = quantized_device.prepare(model, torch.float32, ops)
    assert set(used) == {f"{p}.{t}" for p, ts in (("self_attn", TYPES[:4]), ("mlp", TYPES[4:])) for t in ts}
    assert all(v.startswith("dequantized (self-check ") for v in used.values()), used
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n.endswith(TYPES))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(TYPES) and all("bound 0.02" in w and "dequantized at each product" in w for w in warned)
    assert (logits(model, model.config) - ref).abs().max().item() <= 1e-4  # served right, the slower way


def test_the_second_layout_is_tried_and_then_kept(hf_checkpoint):
    model, ref = stage(hf_checkpoint, "awq_4bit_g64")
    ops = Int4Ops("cpu", [broken, right], torch.ops.aten._weight_int4pack_mm_for_cpu, (torch.float32,))
    used = quantized_device.prepare(model, torch.float32, ops)
    assert all(v.startswith("int4 cpu group 64") for v in used.values()) and ops.packings == [right, broken]
    assert (logits(model, model.config) - ref).abs().max().item() <= 1e-4


def test_the_int8_operator_for_per_channel_weights():
    g = torch.Generator().manual_seed(3)
    k, n = 256, 64
    q = torch.randint(0, 256, (k, n), generator=g)
    z = torch.randint(0, 255, (1, n), generator=g)
    scales = (torch.rand(1, n, generator=g) * 0.01 + 1e-3).half()
    g_idx = torch.zeros(k, dtype=torch.int32)

    def words(values, dim):  # 8 bits: four values a word, value j at bits 8j
        v = values.movedim(dim, -1).reshape(*values.movedim(dim, -1).shape[:-1], -1, 4).to(torch.int64)
        w = (v << (torch.arange(4) * 8)).sum(-1)
        return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).movedim(-1, dim)

    weight = from_gptq(words(q, 0), words(z, 1), scales, g_idx, 8, False, "t")
    linear = QuantizedLinear.like(weight, bias=False)
    linear.load_state_dict(weight.tensors(), assign=True, strict=False)
    ref = (scales.float() * (q - z - 1).float()).t()  # [out, in], v1 zeros
    x = torch.randn(3, k, generator=g)
    for dtype, bound in ((torch.float32, 1e-6), (torch.bfloat16, quantized_device.BOUND)):
        prepared = Int8ChannelLinear(linear, dtype)
        assert quantized_device.check(prepared, linear, dtype) <= bound
        got = prepared(x.to(dtype)).float()
        assert ((got - x @ ref.t()).norm() / (x @ ref.t()).norm()).item() <= bound
