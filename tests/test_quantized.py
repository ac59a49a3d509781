"""Quantized weights: each GGUF type's blocks held exactly in their format, the C++ product against float32 on the
same values (every code path: 1-64 rows and prefill chunks), the compiled step's opaque operator, the byte counts,
and the refusal of a type that is not served. Whole-model parity over stages and backends is test_model_parity's,
test_ray_pipeline's and test_rebalance_apply's `gguf` cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_files import random_blocks, reference_dequantize

from stagecoach.errors import CheckpointError
from stagecoach.proto.model_config import ModelConfig
from stagecoach.stage.loader import layer_weight_bytes, load_stage_model, stage_weight_bytes, weight_formats
from stagecoach.stage.quantized import QuantizedLinear, cpu_kernel, dequantize, from_gguf, install

QUANTIZED = ["Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"]


def quantized_linear(type_name: str, rows: int, cols: int, seed: int = 0):
    """A QuantizedLinear holding random blocks of type_name, and the reference's float32 values of its weight."""
    raw = random_blocks(np.random.default_rng(seed), type_name, rows, cols)
    weight = from_gguf(torch.from_numpy(raw.copy()).view(-1), type_name, (rows, cols), "w")
    linear = torch.nn.Module()
    linear.proj = torch.nn.Linear(cols, rows)
    state = install(linear, {"proj.weight": weight, "proj.bias": torch.randn(rows) * 0.1})
    linear.load_state_dict(state, assign=True)
    return linear.proj.requires_grad_(False), reference_dequantize(raw, type_name, rows, cols)


@pytest.mark.parametrize("type_name", QUANTIZED)
def test_each_type_is_held_exactly_and_multiplies_like_float32(type_name):
    assert cpu_kernel() is not None  # the C++ product, not the fallback
    layer, values = quantized_linear(type_name, 96, 512)
    assert isinstance(layer, QuantizedLinear)
    assert torch.equal(dequantize(layer.qweight, layer.scales, layer.offsets, layer.int4), values)
    for rows in (1, 2, 3, 4, 7, 8, 13, 23, 24, 70):  # every row tiling and the dequantize-then-multiply path
        x = torch.randn(rows, 512)
        torch.testing.assert_close(layer(x), F.linear(x, values, layer.bias), rtol=1e-5, atol=2e-5)


def test_the_compiled_step_calls_the_product_as_one_operator():
    layer, values = quantized_linear("Q4_K", 64, 256)
    x = torch.randn(4, 256)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(x), F.linear(x, values, layer.bias), rtol=1e-5, atol=2e-5)


def test_byte_counts_are_the_bytes_the_stage_holds(hf_checkpoint):
    path, _ = hf_checkpoint("gguf_mixed", num_hidden_layers=5)
    config = ModelConfig.from_pretrained(path)
    for start, end in [(0, 2), (2, 5)]:
        model = load_stage_model(path, start, end)
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.dim() > 0)
        held -= model.rotary_emb.inv_freq.numel() * 4  # derived, not a weight
        assert held == stage_weight_bytes(config, start, end, torch.float32, path)
        formats = weight_formats(config, start, end, torch.float32, path)
        assert sum(formats.values()) == held and {"int4/32+offset", "int8/32", "int8/16", "float32"} <= set(formats)
        # each layer's own bytes: the first and last layers without the embedding, norm and lm_head their stages hold
        tensors = [(name, t) for name, t in [*model.named_parameters(), *model.named_buffers()] if ".layers." in name]
        assert layer_weight_bytes(config, start, end, torch.float32, path) == [
            sum(t.numel() * t.element_size() for name, t in tensors if f".layers.{n}." in name)
            for n in range(start, end)
        ]
    # the float count of the same model: what the memory check would have asked for before
    assert stage_weight_bytes(config, 0, 5, torch.float32, path) < 0.45 * stage_weight_bytes(
        config, 0, 5, torch.float32
    )


def with_type(src, dst, tensor: str, type_id: int) -> None:
    """A copy of the GGUF file `src` whose `tensor` (an F16 one) claims the type `type_id` instead (BF16 has F16's size)."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == 1  # F16
    data[type_at : type_at + 4] = type_id.to_bytes(4, "little")
    dst.write_bytes(bytes(data))


def test_a_type_that_is_not_served_is_refused_naming_the_tensor_and_the_type(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("gguf_mixed", num_hidden_layers=5)
    bad = tmp_path / "bad.gguf"
    with_type(path, bad, "blk.3.attn_output.weight", 30)  # BF16
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a folder: one .gguf and its tokenizer files
        (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    load_stage_model(bad, 0, 3)  # the other stage's tensors are never read
    with pytest.raises(CheckpointError, match=r"blk\.3\.attn_output\.weight is BF16; served types are F32, F16, Q4_0"):
        load_stage_model(bad, 3, 5)
    cmd = [
        sys.executable,
        "-m",
        "stagecoach.coordinator.cli",
        "generate",
        "--model",
        str(tmp_path),
        "--backend",
        "local",
    ]
    proc = subprocess.run([*cmd, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "stagecoach: error:" in proc.stderr and "blk.3.attn_output.weight is BF16" in proc.stderr
    # serve refuses before it listens
    serve = [*cmd[:3], "serve", "--model", str(tmp_path), "--backend", "local", "--port", "0"]
    proc = subprocess.run(serve, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "blk.3.attn_output.weight is BF16" in proc.stderr, proc.stderr[-2000:]
    assert "listening" not in proc.stderr
