"""The GGUF file format (llama.cpp's checkpoints): its header, read without the tensors, and what it says of a Qwen2.

Layout (little-endian): "GGUF", version, tensor count, metadata count; the metadata as typed key/value pairs; per
tensor its name, dimensions (innermost first), type and offset; then, aligned to `general.alignment`, the tensors' data.
The coordinator takes the model's config, tokenizer and chat template from the metadata; a stage reads the header,
then only the bytes of its own tensors. Both sides read the same header here.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stagecoach.errors import CheckpointError

# ggml's type ids: (name, values per block, bytes per block) for the types a stage serves …
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    6: ("Q5_0", 32, 22),
    8: ("Q8_0", 32, 34),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
# … and the names of the others, for the refusal.
OTHER_TYPES = {3: "Q4_1", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS"}
OTHER_TYPES |= {18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16"}
OTHER_TYPES |= {26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

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


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a Qwen2 GGUF tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Qwen2 counterpart")


@dataclass(slots=True, frozen=True)
class GGUFTensor:
    name: str  # the file's name (blk.0.attn_q.weight)
    type: int  # ggml type id
    shape: tuple[int, ...]  # outermost first, as torch and HF order it: [out, in] for a matrix
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def type_name(self) -> str:
        return TYPES[self.type][0] if self.type in TYPES else OTHER_TYPES.get(self.type, f"type {self.type}")


@dataclass(slots=True)
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, GGUFTensor]  # by Hugging Face name
    header: bytes  # everything before the data: equal headers, equal checkpoints (names, types, shapes, metadata)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise CheckpointError(f"unknown GGUF metadata type {kind}")
        item, count = self.unpack("<I"), self.unpack("<Q")
        if item in _SCALARS and item != 7:  # numbers in one read (a vocabulary's token types are 150k of them)
            dtype = np.dtype(_SCALARS[item])
            values = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += count * dtype.itemsize
            return values.tolist()
        return [self.value(item) for _ in range(count)]


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file a `--model` names: the file itself, or the one `.gguf` of a folder without safetensors; else None."""
    model = Path(model)
    if model.suffix == ".gguf" and model.is_file():
        return model
    if not model.is_dir() or any(model.glob("*.safetensors")):
        return None
    found = sorted(model.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{model} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); name one")
    return found[0] if found else None


def check_served(path: str | Path, names: list[str] | None = None) -> None:
    """Refuses a file holding a tensor (of `names`, or any) of a type no stage serves: F32 and F16 anywhere, the
    quantized types as matrices only. The coordinator checks the whole file before it listens; a stage its own part."""
    g = read_gguf(path)
    for name in g.tensors if names is None else names:
        t = g.tensors[name]
        if t.type not in TYPES or (t.type_name not in ("F32", "F16") and len(t.shape) != 2):
            served = ", ".join(n for n, _, _ in TYPES.values())
            raise CheckpointError(f"{path}: tensor {t.name} is {t.type_name}; served types are {served}")


def read_gguf(path: str | Path) -> GGUFFile:
    """The file's header (cached per path, size and modification time)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror}") from None
    return _read(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read(path: Path, size: int, _mtime: int) -> GGUFFile:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            if buf[:4] != b"GGUF":
                raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
            c = _Cursor(buf)
            c.pos = 4
            version, n_tensors, n_meta = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
            if version < 2:
                raise CheckpointError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
            metadata = {}
            for _ in range(n_meta):
                key = c.string()
                metadata[key] = c.value(c.unpack("<I"))
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
                infos.append((name, tuple(reversed(dims)), c.unpack("<I"), c.unpack("<Q")))
            align = int(metadata.get("general.alignment", 32))
            data = c.pos + (-c.pos % align)
            header = bytes(buf[: c.pos])
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: the GGUF header is damaged ({e})") from None
    tensors = {}
    for name, shape, kind, offset in infos:
        begin = data + offset
        if kind in TYPES:
            _, per_block, block_bytes = TYPES[kind]
            end = begin + int(np.prod(shape)) // per_block * block_bytes
            if end > size:
                raise CheckpointError(
                    f"{path} is truncated: tensor {name} needs bytes up to {end}, the file has {size}"
                )
        else:
            end = begin  # refused when a stage needs it, naming it and its type
        tensors[hf_name(name)] = GGUFTensor(name, kind, shape, begin, end)
    return GGUFFile(path, metadata, tensors, header)


def fingerprint(path: str | Path) -> str:
    return hashlib.sha256(read_gguf(path).header).hexdigest()[:16]


def hf_config(g: GGUFFile) -> dict:
    """The model's config.json, from the metadata."""
    arch = g.get("general.architecture")
    if arch != "qwen2":
        raise CheckpointError(f"{g.path} holds a {arch!r} model; only qwen2 is served")
    if "model.embed_tokens.weight" not in g.tensors:
        raise CheckpointError(f"{g.path} has no token_embd.weight")
    eps = float(g.get("qwen2.attention.layer_norm_rms_epsilon", 1e-6))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": int(g.get("qwen2.embedding_length")),
        "intermediate_size": int(g.get("qwen2.feed_forward_length")),
        "num_hidden_layers": int(g.get("qwen2.block_count")),
        "num_attention_heads": int(g.get("qwen2.attention.head_count")),
        "num_key_value_heads": int(g.get("qwen2.attention.head_count_kv")),
        "max_position_embeddings": int(g.get("qwen2.context_length", 32768)),
        "rope_theta": float(g.get("qwen2.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(f"{eps:.6g}"),  # float32 1e-6 read back as 9.99999997e-07
        "vocab_size": g.tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in g.tensors,
        "use_sliding_window": False,
        "bos_token_id": int(g.get("tokenizer.ggml.bos_token_id", 151643)),
        "eos_token_id": int(g.get("tokenizer.ggml.eos_token_id", 151645)),
    }
