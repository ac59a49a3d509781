"""Tiny Qwen2 GGUF files (llama.cpp layout) with tensors in chosen ggml quantization types, for tests.

gguf-py can dequantize K-types but not quantize them, so blocks are packed by hand here from random
integer quants and fp16 scales; `reference_dequantize` unpacks them again in plain torch, straight from
the ggml block layouts (the same ones as gguf-py's `gguf/quants.py`), independently of gguf-py.

Conventions: a weight is [rows, cols] in HF order (rows = out features). GGUF stores ne[0] = cols, so
GGUFReader reports `shape` as [cols, rows]; its `data` is numpy-ordered [rows, bytes_per_row] for
quantized types. GGUFWriter.add_tensor with a uint8 array and raw_dtype takes the *byte* shape
(raw_shape defaults to the array's shape) and turns it into the element shape itself.
Qwen2 q/k weights are not permuted by llama.cpp (NeoX rope), unlike llama's.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType

TYPES = ("F32", "F16", "Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K")
_FILE_TYPE = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
}


def _f16_scale(rng: np.random.Generator, n: int, target: float) -> np.ndarray:
    """[n, 1] fp16 block scales of random sign and magnitude target * 2**U(-1, 1) (rms ~ target)."""
    return (target / 1.09 * rng.choice([-1.0, 1.0], (n, 1)) * 2 ** rng.uniform(-1, 1, (n, 1))).astype(np.float16)


def _u8(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(p).view(np.uint8) for p in parts], axis=-1)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales: 8 six-bit scales sc and mins m per 256-block.
    bytes 0-3: sc[0:4] | sc[4:8] bits 4-5 in bits 6-7; bytes 4-7: m[0:4] | m[4:8] bits 4-5 in bits 6-7;
    bytes 8-11: sc[4:8] low nibble | m[4:8] low nibble << 4."""
    b0 = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    b1 = m[:, :4] | (m[:, 4:] >> 4) << 6
    b2 = (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4
    return np.concatenate([b0, b1, b2], axis=-1).astype(np.uint8)


def _k_scales_mins(rng: np.random.Generator, n: int, std: float, qmax: int):
    """fp16 d, dmin and 6-bit sub-scales sc, mins m (full range 0..63) for a K-type with quants 0..qmax.
    dmin = d * (qmax+1)/2 and m ~ sc * qmax/(qmax+1) + noise, so dmin*m roughly cancels d*sc*mean(q)."""
    rms_q = np.sqrt(((qmax + 1) ** 2 - 1) / 12)
    d = np.abs(_f16_scale(rng, n, std / (36.6 * rms_q)))  # >= 0 as llama.cpp writes them; 36.6 = rms of 0..63
    dmin = d * np.float16((qmax + 1) / 2)  # a power of two: exact in fp16
    sc = rng.integers(0, 64, (n, 8))
    m = np.clip(np.rint(sc * qmax / (qmax + 1)) + rng.integers(-3, 4, (n, 8)), 0, 63).astype(np.int64)
    return d, dmin, sc, m


def _blocks(rng: np.random.Generator, type_name: str, n: int, std: float) -> np.ndarray:
    """n random blocks of type_name as [n, type_size] bytes."""
    q16 = np.uint8(4)
    if type_name == "Q8_0":  # f16 d | 32 x int8 q; w = d*q
        return _u8(_f16_scale(rng, n, std / 73.9), rng.integers(-128, 128, (n, 32)).astype(np.int8))
    if type_name == "Q4_0":  # f16 d | 16 B: q[j] low nibble, q[j+16] high nibble of byte j; w = d*(q-8)
        q = rng.integers(0, 16, (n, 32)).astype(np.uint8)
        return _u8(_f16_scale(rng, n, std / 4.61), q[:, :16] | q[:, 16:] << q16)
    if type_name == "Q5_0":  # f16 d | u32 qh: bit j = bit 4 of q[j] | 16 B low nibbles as Q4_0; w = d*(q-16)
        q = rng.integers(0, 32, (n, 32)).astype(np.uint8)
        qh = ((q.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)[:, None]
        return _u8(_f16_scale(rng, n, std / 9.23), qh.astype("<u4"), (q[:, :16] & 15) | (q[:, 16:] & 15) << q16)
    if type_name in ("Q4_K", "Q5_K"):
        # f16 d | f16 dmin | 12 B scales | (Q5_K: 32 B qh) | 128 B qs; 8 sub-blocks of 32, w = d*sc*q - dmin*m.
        # qs byte 32*i+l: low nibble = sub-block 2i pos l, high nibble = sub-block 2i+1 pos l.
        # Q5_K: bit 4 of sub-block s pos l is bit s of qh[l].
        qmax = 15 if type_name == "Q4_K" else 31
        d, dmin, sc, m = _k_scales_mins(rng, n, std, qmax)
        q = rng.integers(0, qmax + 1, (n, 8, 32)).astype(np.uint8)
        qs = ((q[:, 0::2] & 15) | (q[:, 1::2] & 15) << q16).reshape(n, 128)
        if type_name == "Q4_K":
            return _u8(d, dmin, _pack_k_scales(sc, m), qs)
        qh = ((q >> q16) << np.arange(8, dtype=np.uint8)[:, None]).sum(1, dtype=np.uint8)
        return _u8(d, dmin, _pack_k_scales(sc, m), qh, qs)
    if type_name == "Q6_K":
        # 128 B ql | 64 B qh | 16 x int8 scales | f16 d; two halves of 128 values, 16 sub-blocks of 16, w = d*sc*(q-32).
        # Half h, l < 32: ql[64h+l] = q[l] | q[l+64] << 4, ql[64h+32+l] = q[l+32] | q[l+96] << 4 (low nibbles);
        # qh[32h+l] = bits 4-5 of q[l], q[l+32], q[l+64], q[l+96] at bits 0-1, 2-3, 4-5, 6-7.
        # d is mostly an fp16 subnormal (< 2**-14) as in real files; at std 0.05 ~8% of blocks get a normal one.
        q = rng.integers(0, 64, (n, 2, 128)).astype(np.uint8)
        ql = ((q[..., :64] & 15) | (q[..., 64:] & 15) << q16).reshape(n, 128)
        hi = (q >> q16).reshape(n, 2, 4, 32) << (2 * np.arange(4, dtype=np.uint8))[:, None]
        scales = rng.integers(-128, 128, (n, 16)).astype(np.int8)
        return _u8(ql, hi.sum(2, dtype=np.uint8).reshape(n, 64), scales, _f16_scale(rng, n, std / (73.9 * 18.47)))
    raise ValueError(f"unsupported type {type_name}")


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, cols: int, std: float = 0.05) -> np.ndarray:
    """Raw bytes [rows, bytes_per_row] of a random [rows, cols] tensor in type_name, values around std."""
    if type_name in ("F32", "F16"):
        w = (rng.standard_normal((rows, cols)) * std).astype(np.float32 if type_name == "F32" else np.float16)
        return w.view(np.uint8)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if cols % block:
        raise ValueError(f"{type_name} needs cols % {block} == 0, got {cols}")
    blocks = _blocks(rng, type_name, rows * cols // block, std)
    assert blocks.shape[-1] == type_size, (type_name, blocks.shape)
    return blocks.reshape(rows, cols // block * type_size)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _k_sc_m(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K 12-byte scales [n, 12] -> sub-scales, mins [n, 8] (layout in _pack_k_scales)."""
    s = s.int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | (s[:, 0:4] >> 6) << 4], -1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | (s[:, 4:8] >> 6) << 4], -1)
    return sc.float(), m.float()


def _dequant_blocks(b: torch.Tensor, type_name: str) -> torch.Tensor:
    """[n, type_size] uint8 blocks -> [n, block_size] float32 (same float32 op order as ggml/gguf-py)."""
    n = b.shape[0]
    if type_name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])
    if type_name in ("Q4_0", "Q5_0"):
        qs = b[:, -16:].int()
        q = torch.cat([qs & 15, qs >> 4], -1)
        if type_name == "Q4_0":
            return _f16(b[:, :2]) * (q - 8).float()
        qh = (b[:, 2:6, None].int() >> torch.arange(8)) & 1  # little-endian u32: bit j in byte j // 8
        return _f16(b[:, :2]) * ((q | qh.reshape(n, 32) << 4) - 16).float()
    if type_name in ("Q4_K", "Q5_K"):
        sc, m = _k_sc_m(b[:, 4:16])
        qs = b[:, -128:].int().reshape(n, 4, 1, 32)
        q = ((qs >> torch.tensor([0, 4]).view(1, 1, 2, 1)) & 15).reshape(n, 8, 32)
        if type_name == "Q5_K":
            q = q | ((b[:, None, 16:48].int() >> torch.arange(8).view(8, 1)) & 1) << 4
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        return ((d * sc)[..., None] * q.float() - (dmin * m)[..., None]).reshape(n, 256)
    if type_name == "Q6_K":
        ql = b[:, :128].int().reshape(n, 2, 1, 64)
        ql = ((ql >> torch.tensor([0, 4]).view(1, 1, 2, 1)) & 15).reshape(n, 2, 128)
        qh = b[:, 128:192].int().reshape(n, 2, 1, 32)
        qh = ((qh >> torch.tensor([0, 2, 4, 6]).view(1, 1, 4, 1)) & 3).reshape(n, 2, 128)
        q = ((ql | qh << 4) - 32).reshape(n, 16, 16).float()
        scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
        return (scale[..., None] * q).reshape(n, 256)
    raise ValueError(f"unsupported type {type_name}")


def reference_dequantize(raw: np.ndarray, type_name: str, rows: int, cols: int) -> torch.Tensor:
    """float32 [rows, cols] from the raw bytes [rows, bytes_per_row] of a tensor in type_name."""
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1)  # a copy: reader data is read-only
    if type_name == "F32":
        return b.view(torch.float32).reshape(rows, cols).clone()
    if type_name == "F16":
        return b.view(torch.float16).float().reshape(rows, cols)
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return _dequant_blocks(b.reshape(-1, type_size), type_name).reshape(rows, cols)


def _tensor_specs(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, HF shape) of every tensor of a Qwen2 model."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    specs = [("token_embd.weight", "model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        g, p = f"blk.{n}.", f"model.layers.{n}."
        specs += [
            (g + "attn_norm.weight", p + "input_layernorm.weight", (h,)),
            (g + "attn_q.weight", p + "self_attn.q_proj.weight", (q, h)),
            (g + "attn_q.bias", p + "self_attn.q_proj.bias", (q,)),
            (g + "attn_k.weight", p + "self_attn.k_proj.weight", (kv, h)),
            (g + "attn_k.bias", p + "self_attn.k_proj.bias", (kv,)),
            (g + "attn_v.weight", p + "self_attn.v_proj.weight", (kv, h)),
            (g + "attn_v.bias", p + "self_attn.v_proj.bias", (kv,)),
            (g + "attn_output.weight", p + "self_attn.o_proj.weight", (h, q)),
            (g + "ffn_norm.weight", p + "post_attention_layernorm.weight", (h,)),
            (g + "ffn_gate.weight", p + "mlp.gate_proj.weight", (i, h)),
            (g + "ffn_up.weight", p + "mlp.up_proj.weight", (i, h)),
            (g + "ffn_down.weight", p + "mlp.down_proj.weight", (h, i)),
        ]
    specs.append(("output_norm.weight", "model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", False):
        specs.append(("output.weight", "lm_head.weight", (v, h)))
    return specs


def _type_for(name: str, types: dict[str, str] | str) -> str:
    """Exact name, else the longest matching suffix, else "default", else F32."""
    if isinstance(types, str):
        return types
    if name in types:
        return types[name]
    suffixes = [k for k in types if k != "default" and name.endswith(k)]
    return types[max(suffixes, key=len)] if suffixes else types.get("default", "F32")


def _add_tokenizer(w: GGUFWriter, tokenizer_dir: str | Path, vocab_size: int) -> None:
    """Tokenizer metadata as llama.cpp's convert_hf_to_gguf writes it for Qwen2 (gpt2-style BPE)."""
    tokenizer_dir = Path(tokenizer_dir)
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id |= {i: a["content"] for i, a in added.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    # 1 normal, 3 control (special added token), 4 user-defined (other added token), 5 unused (padding)
    ttypes = [(3 if added[i].get("special") else 4) if i in added else 1 if i in by_id else 5 for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    if "<|endoftext|>" in ids:
        w.add_bos_token_id(ids["<|endoftext|>"])
        w.add_pad_token_id(ids[tcfg.get("pad_token") or "<|endoftext|>"])
    eos = tcfg.get("eos_token") or ("<|im_end|>" if "<|im_end|>" in ids else "<|endoftext|>")
    if eos in ids:
        w.add_eos_token_id(ids[eos])
    if tcfg.get("chat_template"):
        w.add_chat_template(tcfg["chat_template"])


def write_qwen2_gguf(
    path: str | Path,
    config: dict,
    types: dict[str, str] | str,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Write a random Qwen2 GGUF v3 file; returns its HF state dict (float32, as dequantized)."""
    rng = np.random.default_rng(seed)
    specs = _tensor_specs(config)
    matrix_types = [_type_for(g, types) for g, _, shape in specs if len(shape) == 2]
    w = GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2-gguf-test")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings", 32768))
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(float(config.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_file_type(int(_FILE_TYPE[Counter(matrix_types).most_common(1)[0][0]]))
    w.add_quantization_version(2)
    if tokenizer_dir is not None:
        _add_tokenizer(w, tokenizer_dir, config["vocab_size"])
    state = {}
    for gguf_name, hf_name, shape in specs:
        if len(shape) == 1:  # norms near 1, biases small; always F32
            base = 1.0 if gguf_name.endswith("norm.weight") else 0.0
            vec = (base + rng.standard_normal(shape) * (0.1 if base else 0.02)).astype(np.float32)
            w.add_tensor(gguf_name, vec)
            state[hf_name] = torch.from_numpy(vec.copy())
            continue
        type_name = _type_for(gguf_name, types)
        raw = random_blocks(rng, type_name, *shape)
        # uint8 data + raw_dtype: the shape gguf-py expects is the byte shape (the default, raw.shape)
        w.add_tensor(gguf_name, raw, raw_dtype=GGMLQuantizationType[type_name])
        state[hf_name] = reference_dequantize(raw, type_name, *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


def hf_reference(config: dict, state: dict):
    """transformers Qwen2ForCausalLM (float32, eval, eager attention) holding exactly `state`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**config, attn_implementation="eager")
    model = Qwen2ForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"state does not fit the config: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def _check_blocks(rng: np.random.Generator) -> None:
    import gguf

    for t in TYPES:
        raw = random_blocks(rng, t, 64, 512)
        ref = reference_dequantize(raw, t, 64, 512)
        theirs = torch.from_numpy(gguf.quants.dequantize(raw, GGMLQuantizationType[t]).copy())
        assert theirs.shape == (64, 512) and torch.equal(ref, theirs), t
        print(
            f"{t:5s} {raw.shape} bytes: equal to gguf.quants.dequantize, std {ref.std():.4f} max {ref.abs().max():.4f}"
        )


def _self_check() -> None:
    import tempfile

    from gguf import GGUFReader

    _check_blocks(np.random.default_rng(0))
    from stagecoach.coordinator.random_checkpoint import write_tokenizer_files

    out = Path(tempfile.mkdtemp(prefix="gguf_files_"))
    write_tokenizer_files(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    config |= dict(num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, rope_theta=1e6)
    config |= dict(rms_norm_eps=1e-6, tie_word_embeddings=False)
    types = {"default": "Q4_K", "token_embd.weight": "Q8_0", "output.weight": "Q6_K", "attn_v.weight": "Q5_0"}
    types |= {"blk.0.ffn_down.weight": "Q5_K", "blk.1.ffn_down.weight": "F16", "attn_output.weight": "Q4_0"}
    types |= {"blk.1.ffn_up.weight": "F32"}
    state = write_qwen2_gguf(out / "tiny.gguf", config, types, seed=1, tokenizer_dir=out)
    reader = GGUFReader(out / "tiny.gguf")
    specs = {g: (hf, shape) for g, hf, shape in _tensor_specs(config)}
    assert {t.name for t in reader.tensors} == set(specs)
    for t in reader.tensors:
        shape = specs[t.name][1]
        want = _type_for(t.name, types) if len(shape) == 2 else "F32"
        assert t.tensor_type.name == want and tuple(t.shape.tolist()) == shape[::-1], (t.name, t.tensor_type, t.shape)
        got = reference_dequantize(
            np.asarray(t.data).view(np.uint8), want, *(shape if len(shape) == 2 else (1, *shape))
        )
        assert torch.equal(got.reshape(shape), state[specs[t.name][0]]), t.name
    print("GGUFReader:", len(reader.tensors), "tensors, types", sorted({t.tensor_type.name for t in reader.tensors}))
    print("keys:", [k for k in reader.fields if not k.startswith("tokenizer.ggml.t")])
    _check_transformers(out, "tiny.gguf", config, state)
    tied = config | {"tie_word_embeddings": True}
    state = write_qwen2_gguf(out / "tied.gguf", tied, "Q6_K", seed=2, tokenizer_dir=out)
    assert (
        "output.weight" not in {t.name for t in GGUFReader(out / "tied.gguf").tensors} and "lm_head.weight" not in state
    )
    _check_transformers(out, "tied.gguf", tied, state)


def _check_transformers(out: Path, name: str, config: dict, state: dict) -> None:
    """hf_reference vs transformers' own GGUF loader (optional: prints why if that cannot load the file)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 42]])
    ref = hf_reference(config, state)
    try:
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    except Exception as e:  # optional check: report why
        print(f"{name}: transformers GGUF load failed: {type(e).__name__}: {e}")
        return
    theirs = model.state_dict()
    worst = max((theirs[k].float() - v).abs().max().item() for k, v in state.items())
    with torch.no_grad():
        dlogits = (model(ids).logits - ref(ids).logits).abs().max().item()
    print(f"{name}: transformers GGUF load: {len(state)} tensors, max weight diff {worst}, max logit diff {dlogits}")


if __name__ == "__main__":
    _self_check()
