"""Converts a Qwen2 GGUF file (llama.cpp) into a Hugging Face checkpoint folder, one tensor at a time.

Quantized tensors are dequantized with the `gguf` package and written straight into a
safetensors file whose header is computed up front, so peak memory stays near one tensor.
The tokenizer is rebuilt from the GGUF vocabulary and merges with Qwen2's pre-tokenizer, byte-level
decoder and the NFC normalizer that the GGUF metadata omits.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from stagecoach.errors import CheckpointError
from stagecoach.proto import gguf

# Qwen2's pre-tokenizer split (llama.cpp's "qwen2" pre-tokenizer; the same as HF's tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED, _UNUSED = 3, 4, 5


def build_tokenizer(g: gguf.GGUFFile):
    """A `tokenizers` Tokenizer equal to HF's Qwen2 tokenizer.json, from the GGUF vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if g.get("tokenizer.ggml.model") != "gpt2":
        raise CheckpointError("the GGUF tokenizer is not byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type")
    merges = g.get("tokenizer.ggml.merges")
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


def _write_tokenizer(g: gguf.GGUFFile, out: Path, config: dict) -> None:
    tok, added = build_tokenizer(g)
    tok.save(str(out / "tokenizer.json"))
    id_to_text = {i: text for i, text, _ in added}
    template = g.get("tokenizer.chat_template")
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
                    int(g.get("tokenizer.ggml.padding_token_id", config["bos_token_id"])), "<|endoftext|>"
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


def _write_safetensors(g: gguf.GGUFFile, path: Path, dtype: str) -> None:
    """Streams every tensor into one safetensors file: header first, then each dequantized tensor."""
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    code = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    entries, offset = [], 0
    for name, t in sorted(g.tensors.items()):
        if t.type not in gguf.TYPES:
            raise CheckpointError(f"{g.path}: tensor {t.name} is {t.type_name}, which does not convert")
        nbytes = int(np.prod(t.shape)) * torch_dtype.itemsize
        entries.append((t, name, offset, offset + nbytes))
        offset += nbytes
    header = {name: {"dtype": code, "shape": list(t.shape), "data_offsets": [b, e]} for t, name, b, e in entries}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t, _name, begin, end in entries:
            rows = t.shape[0] if len(t.shape) > 1 else 1
            blocks = data[t.begin : t.end].reshape(rows, -1)  # [rows, bytes per row]
            step = max(1, (4 << 20) // max(1, int(np.prod(t.shape)) // rows))  # about 4M values at a time
            written = 0
            for start in range(0, rows, step):
                values = dequantize(blocks[start : start + step], GGMLQuantizationType(t.type))
                block = torch.from_numpy(np.array(values, dtype=np.float32)).to(torch_dtype)
                out = block.view(-1).view(torch.uint8).numpy()
                f.write(memoryview(out))
                written += out.nbytes
            if written != end - begin:
                raise CheckpointError(f"GGUF tensor {t.name} dequantized to {written} bytes, expected {end - begin}")


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", generation_config: dict | None = None
) -> Path:
    """Writes config.json, model.safetensors, tokenizer files and generation_config.json to out_dir.

    Written into a sibling temporary folder and renamed at the end: out_dir is either complete or absent.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        g = gguf.read_gguf(gguf_path)
        config = gguf.hf_config(g) | {"torch_dtype": dtype}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer_files(g, tmp, generation_config)
        _write_safetensors(g, tmp / "model.safetensors", dtype)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_tokenizer_files(g: gguf.GGUFFile, out: Path, generation_config: dict | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json from the metadata."""
    config = gguf.hf_config(g)
    gen = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], config["bos_token_id"]],
        "pad_token_id": config["bos_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen | (generation_config or {}), indent=2))
    _write_tokenizer(g, out, config)


def tokenizer_dir(path: Path, cache: Path) -> Path:
    """A folder with the tokenizer files of a GGUF file's metadata, written once into `cache` (keyed by its header)."""
    g = gguf.read_gguf(path)
    out = cache / f"{path.stem}-{gguf.fingerprint(path)}"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name(out.name + f".partial-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        write_tokenizer_files(g, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out
