"""Converts a Qwen2 GGUF file (llama.cpp) into a Hugging Face checkpoint folder, one tensor at a time.

Quantized tensors are dequantized with the `gguf` package and written straight into a
safetensors file whose header is computed up front, so peak memory stays near one tensor.
The tokenizer is rebuilt from the GGUF vocabulary and merges with Qwen2's pre-tokenizer, byte-level
decoder and the NFC normalizer that the GGUF metadata omits.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

from stagecoach.errors import CheckpointError

# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer; the same as HF's tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Qwen2 counterpart")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"the GGUF file is a {arch!r} model; only qwen2 converts")
    names = {t.name for t in reader.tensors}
    eps = float(_field(reader, "qwen2.attention.layer_norm_rms_epsilon", 1e-6))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": int(_field(reader, "qwen2.embedding_length")),
        "intermediate_size": int(_field(reader, "qwen2.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "qwen2.block_count")),
        "num_attention_heads": int(_field(reader, "qwen2.attention.head_count")),
        "num_key_value_heads": int(_field(reader, "qwen2.attention.head_count_kv")),
        "max_position_embeddings": int(_field(reader, "qwen2.context_length", 32768)),
        "rope_theta": float(_field(reader, "qwen2.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(f"{eps:.6g}"),  # float32 1e-6 read back as 9.99999997e-07
        "vocab_size": next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1].item(),
        "tie_word_embeddings": "output.weight" not in names,
        "use_sliding_window": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 151643)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 151645)),
    }


def build_tokenizer(reader):
    """A `tokenizers` Tokenizer equal to HF's Qwen2 tokenizer.json, from the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointError("the GGUF tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    num_regular = next((i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED, _UNUSED)), len(tokens))
    vocab = {tokens[i]: i for i in range(num_regular)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer normalizes; the GGUF metadata does not say so
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    added = []
    for i in range(num_regular, len(tokens)):
        # Control and padding tokens are special (skipped when decoding); user-defined ones are text.
        added.append(
            AddedToken(
                tokens[i],
                special=types[i] != _USER_DEFINED,
                normalized=False,
                lstrip=False,
                rstrip=False,
                single_word=False,
            )
        )
    tok.add_tokens(added)
    for i in range(num_regular, len(tokens)):
        if tok.token_to_id(tokens[i]) != i:
            raise CheckpointError(f"GGUF token {tokens[i]!r} would get id {tok.token_to_id(tokens[i])}, not {i}")
    return tok, [(i, tokens[i], types[i] != _USER_DEFINED) for i in range(num_regular, len(tokens))]


def _write_tokenizer(reader, out: Path, config: dict) -> None:
    tok, added = build_tokenizer(reader)
    tok.save(str(out / "tokenizer.json"))
    id_to_text = {i: text for i, text, _ in added}
    template = _field(reader, "tokenizer.chat_template")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": {
                    str(i): {
                        "content": text,
                        "lstrip": False,
                        "normalized": False,
                        "rstrip": False,
                        "single_word": False,
                        "special": special,
                    }
                    for i, text, special in added
                },
                "bos_token": None,
                "eos_token": id_to_text.get(config["eos_token_id"], "<|im_end|>"),
                "pad_token": id_to_text.get(
                    int(_field(reader, "tokenizer.ggml.padding_token_id", config["bos_token_id"])), "<|endoftext|>"
                ),
                "unk_token": None,
                "chat_template": template,
                "clean_up_tokenization_spaces": False,
                "model_max_length": config["max_position_embeddings"],
                "split_special_tokens": False,
            },
            indent=2,
            ensure_ascii=False,
        )
    )


def _write_safetensors(reader, path: Path, dtype: str) -> None:
    """Streams every tensor into one safetensors file: header first, then each dequantized tensor."""
    import torch
    from gguf.quants import dequantize

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    code = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    entries, offset = [], 0
    for t in sorted(reader.tensors, key=lambda t: hf_name(t.name)):
        shape = [int(d) for d in reversed(t.shape.tolist())]  # GGUF lists dimensions innermost first
        nbytes = int(np.prod(shape)) * torch_dtype.itemsize
        entries.append((t, hf_name(t.name), shape, offset, offset + nbytes))
        offset += nbytes
    header = {
        name: {"dtype": code, "shape": shape, "data_offsets": [begin, end]} for _, name, shape, begin, end in entries
    }
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t, _name, shape, begin, end in entries:
            # Row blocks of about 4M values keep the dequantization temporaries small.
            rows = t.data.shape[0] if t.data.ndim > 1 else 1
            step = max(1, (4 << 20) // max(1, int(np.prod(shape)) // rows))
            written = 0
            for start in range(0, rows, step):
                part = t.data[start : start + step] if t.data.ndim > 1 else t.data
                values = np.ascontiguousarray(
                    dequantize(part, t.tensor_type), dtype=np.float32
                )  # [out, in] rows, as HF
                if not values.flags.writeable:  # an unquantized tensor comes back as a view of the read-only file
                    values = values.copy()
                block = torch.from_numpy(values).to(torch_dtype)
                data = block.view(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != end - begin:
                raise CheckpointError(f"GGUF tensor {t.name} dequantized to {written} bytes, expected {end - begin}")


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", generation_config: dict | None = None
) -> Path:
    """Writes config.json, model.safetensors, tokenizer files and generation_config.json to out_dir.

    Written into a sibling temporary folder and renamed at the end: out_dir is either complete or absent.
    """
    from gguf import GGUFReader

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        reader = GGUFReader(str(gguf_path))
        config = hf_config(reader) | {"torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": [config["eos_token_id"], config["bos_token_id"]],
            "pad_token_id": config["bos_token_id"],
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen | (generation_config or {}), indent=2))
        _write_tokenizer(reader, tmp, config)
        _write_safetensors(reader, tmp / "model.safetensors", dtype)
        del reader
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
