"""GPTQ and AWQ packed tensors → the grouped formats: bit layouts pinned by hand-checked words, and every variant
(4/8 bits, groups 32/128/per-channel, act-order, v1/v2 zeros, AWQ) against a plain-torch reading of the layouts."""

from __future__ import annotations

import pytest
import torch

from stagecoach.stage.gptq_awq import from_awq, from_gptq, unpack, zeros_are_v2
from stagecoach.stage.quantized import dequantize, quant_product

WORD = 0x76543210  # values 0 … 7, value j at bits 4j
HIGH = -0x01234568  # 0xFEDCBA98 as int32: values 8 … 15


def test_hand_checked_words():
    assert unpack(torch.tensor([[WORD]], dtype=torch.int32), 4, 0).flatten().tolist() == list(range(8))
    assert unpack(torch.tensor([[WORD, HIGH]], dtype=torch.int32), 4, 1).tolist() == [list(range(16))]
    assert unpack(torch.tensor([[0x04030201]], dtype=torch.int32), 8, 0).flatten().tolist() == [1, 2, 3, 4]
    # AWQ: nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]; 32 inputs of 8 outputs, every word WORD, zeros 0
    awq = from_awq(
        torch.full((32, 1), WORD, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), "t"
    )
    w = dequantize(awq.q, awq.scales, awq.offsets, awq.int4)  # [out, in]
    assert w[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The test's own packing: value j of each run of 32 / bits along dim at bits bits·j of an int32."""
    per = 32 // bits
    v = values.movedim(dim, -1).reshape(*values.movedim(dim, -1).shape[:-1], -1, per).to(torch.int64)
    words = (v << (torch.arange(per) * bits)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def gptq_case(bits, group, act_order, seed, k=256, n=64):
    g = torch.Generator().manual_seed(seed)
    group = k if group == -1 else group
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    z = torch.randint(0, 2**bits - 1, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.01 + 1e-3).half()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    return q, z, scales, g_idx.int()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_equals_the_layouts_reading(bits, group, act_order, v2):
    q, z, scales, g_idx = gptq_case(bits, group, act_order, seed=bits + group + 7 * act_order + 3 * v2)
    # reference: w[n, k] = scale[g_idx[k], n] · (q[k, n] − z'[g_idx[k], n]), z' = z + 1 for v1
    zeff = z + (0 if v2 else 1)
    ref = (scales.float()[g_idx.long()] * (q - zeff[g_idx.long()]).float()).t()  # [out, in]
    weight = from_gptq(pack(q, bits, 0), pack(z, bits, 1), scales, g_idx, bits, v2, "t")
    perm = weight.perm
    assert (perm is not None) == (act_order and group != -1)  # one group over every input: no order to restore
    ours = dequantize(weight.q, weight.scales, weight.offsets, weight.int4)
    order = perm if perm is not None else torch.arange(q.shape[0])
    torch.testing.assert_close(ours, ref[:, order], rtol=0, atol=1e-6)
    x = torch.randn(3, q.shape[0])
    got = quant_product(x[:, order], weight.q, weight.scales, weight.offsets, None, weight.group, weight.int4)
    torch.testing.assert_close(got, x @ ref.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group, held", [(128, 128), (-1, 128), (64, 32)])
def test_groups_of_128_are_held_as_such_and_multiply_on_every_code_path(group, held):
    q, z, scales, g_idx = gptq_case(4, group, False, seed=11, k=512, n=96)
    ref = (scales.float()[g_idx.long()] * (q - z[g_idx.long()] - 1).float()).t()  # [out, in], v1 zeros
    weight = from_gptq(pack(q, 4, 0), pack(z, 4, 1), scales, g_idx, 4, False, "t")
    assert weight.group == held and weight.scales.shape == (96, 512 // held)
    for rows in (1, 2, 3, 4, 7, 8, 13, 23, 24, 70):  # every row tiling and the dequantize-then-multiply path
        x = torch.randn(rows, 512)
        got = quant_product(x, weight.q, weight.scales, weight.offsets, None, weight.group, weight.int4)
        torch.testing.assert_close(got, x @ ref.t(), rtol=1e-4, atol=1e-4)


def test_scales_that_contradict_the_configs_group_size_are_refused():
    from stagecoach.errors import CheckpointError
    from stagecoach.stage.gptq_awq import PackedConfig

    q, z, scales, g_idx = gptq_case(4, 32, False, seed=2)
    tensors = {"qweight": pack(q, 4, 0), "qzeros": pack(z, 4, 1), "scales": scales, "g_idx": g_idx}
    packed = PackedConfig({"quant_method": "gptq", "bits": 4, "group_size": 128}, "config.json")
    with pytest.raises(CheckpointError, match=r"scales \[8, 64\] give 8 groups over 256 inputs, but .* group_size 128"):
        packed.weight(tensors, "model.layers.0.mlp.up_proj.qweight")


def test_awq_equals_the_layouts_reading():
    g = torch.Generator().manual_seed(5)
    k, n, group = 256, 64, 128
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    scales = (torch.rand(k // group, n, generator=g) * 0.01 + 1e-3).half()
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])

    def awq_pack(values):  # nibble i of each word ← column order[i] of its eight
        v = values.view(values.shape[0], -1, 8)[..., order]
        return pack(v.reshape(values.shape[0], -1), 4, 1)

    ref = (scales.float().repeat_interleave(group, 0) * (q - z.repeat_interleave(group, 0)).float()).t()
    weight = from_awq(awq_pack(q), awq_pack(z), scales, "t")
    torch.testing.assert_close(dequantize(weight.q, weight.scales, weight.offsets, weight.int4), ref, rtol=0, atol=1e-6)


def test_symmetric_zeros_at_the_midpoint_are_v2():
    assert zeros_are_v2(pack(torch.full((2, 8), 8), 4, 1), 4, sym=True)
    assert not zeros_are_v2(pack(torch.full((2, 8), 7), 4, 1), 4, sym=True)
    assert not zeros_are_v2(pack(torch.full((2, 8), 8), 4, 1), 4, sym=False)


def test_a_packed_checkpoint_is_held_packed_with_its_byte_count(hf_checkpoint):
    from test_model_parity import CONFIGS

    from stagecoach.proto.model_config import ModelConfig
    from stagecoach.stage.loader import layer_weight_bytes, load_stage_model, stage_weight_bytes, weight_formats

    key = "gptq_4bit_g128_actorder"
    path, _ = hf_checkpoint(key, **CONFIGS[key])
    config = ModelConfig.from_pretrained(path)
    model = load_stage_model(path, 1, 3)
    held = {n: t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    held.pop("rotary_emb.inv_freq")  # derived, not a weight
    assert sum(held.values()) == stage_weight_bytes(config, 1, 3, torch.float32, path)
    assert layer_weight_bytes(config, 1, 3, torch.float32, path) == [
        sum(b for n, b in held.items() if f".layers.{i}." in n) for i in (1, 2)
    ]
    assert set(weight_formats(config, 1, 3, torch.float32, path)) == {"int4/128+offset", "float32"}
    # act-order: one order per input (q, k, v share one; gate and up another; down's is folded into their rows)
    attn, mlp = model.model.layers["1"].self_attn, model.model.layers["1"].mlp
    assert attn.input_perm is not None and mlp.input_perm is not None and attn.o_proj.perm is not None
    assert all(linear.perm is None for linear in (attn.q_proj, attn.k_proj, attn.v_proj, *mlp.children()))


def test_act_order_with_an_order_per_linear_matches_hf(hf_checkpoint):
    """Linears that read one input but were given different orders each keep their own, and still match HF."""
    from test_model_parity import PROMPT, check_against_hf, run_ours

    packing = dict(bits=4, group=32, act_order=True, shared_orders=False)
    path, hf_model = hf_checkpoint("gptq_4bit_g32_actorder_unshared", num_hidden_layers=2, packing=packing)
    seqs, logits = run_ours(path, [2], [PROMPT])
    check_against_hf(hf_model, seqs, logits, [PROMPT])


@pytest.mark.parametrize(
    "quantization_config, message",
    [
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with 3 bits; served: 4 and 8"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ gemv with 4 bits; served: gemm, 4 bits"),
        ({"quant_method": "exl2", "bits": 4}, "quantization 'exl2'; served: gptq, awq"),
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "GPTQ in the marlin layout"),
    ],
)
def test_what_is_not_served_is_refused(quantization_config, message):
    from stagecoach.errors import CheckpointError
    from stagecoach.stage.gptq_awq import PackedConfig

    with pytest.raises(CheckpointError, match=message):
        PackedConfig(quantization_config, "config.json")
