"""Loads one stage's weights from a Hugging Face safetensors checkpoint or a GGUF file, reading only the tensors it owns.

The safetensors format is an 8-byte header length, a JSON header of `{name: {dtype, shape,
data_offsets}}`, then raw little-endian data. Reading each owned tensor straight into its own
buffer (no memory map) keeps resident memory near the stage's weight bytes, and shards that hold
none of the stage's tensors are never opened. A GGUF file's tensors are read the same way, by the offsets in its header;
its quantized ones stay quantized (stage/quantized.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stagecoach.errors import CheckpointError
from stagecoach.proto import gguf
from stagecoach.proto.model_config import ModelConfig
from stagecoach.stage import gptq_awq, quantized, quantized_device
from stagecoach.stage.model import RotaryEmbedding, StageModel

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(slots=True, frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses a safetensors header; offsets are made absolute."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    base = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, base + end)
    return infos


def read_tensor(f, info: TensorInfo) -> torch.Tensor:
    """Reads one tensor's bytes from an open file straight into a new CPU tensor."""
    tensor = torch.empty(info.shape, dtype=info.dtype)
    nbytes = info.end - info.begin
    if tensor.numel() * tensor.element_size() != nbytes:
        raise CheckpointError(f"{f.name}: tensor at byte {info.begin} has {nbytes} bytes for shape {info.shape}")
    if nbytes == 0:
        return tensor
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    f.seek(info.begin)
    done = 0
    while done < nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{f.name} is truncated: a tensor needs bytes up to {info.end}")
        done += n
    return tensor


def checkpoint_weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name → shard file name, from the index file or the single file's header."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index} has no valid weight_map: {e}") from None
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return {name: SINGLE_FILE for name in read_header(single)}
    raise CheckpointError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def stage_tensor_specs(config: ModelConfig, layer_start: int, layer_end: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a stage owns, by its HF name, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    specs: dict[str, tuple[int, ...]] = {}
    if layer_start == 0:
        specs["model.embed_tokens.weight"] = (config.vocab_size, h)
    for n in range(layer_start, layer_end):
        p = f"model.layers.{n}."
        specs |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    if layer_end == config.num_hidden_layers:
        specs["model.norm.weight"] = (h,)
        specs["lm_head.weight"] = (config.vocab_size, h)
    return specs


def stage_weight_bytes(
    config: ModelConfig, layer_start: int, layer_end: int, dtype: torch.dtype, model_dir: str | Path | None = None
) -> int:
    """Bytes of the stage's weights once loaded in dtype (a tied lm_head shared with embed_tokens counts once); a GGUF
    file's quantized tensors count in their formats."""
    return sum(n for _, n in _loaded_tensors(config, layer_start, layer_end, dtype, model_dir).values())


def weight_formats(
    config: ModelConfig, layer_start: int, layer_end: int, dtype: torch.dtype, model_dir: str | Path | None = None
) -> dict[str, int]:
    """The stage's weight bytes by the format they are held in (float32, int8/32, …)."""
    out: dict[str, int] = {}
    for fmt, nbytes in _loaded_tensors(config, layer_start, layer_end, dtype, model_dir).values():
        out[fmt] = out.get(fmt, 0) + nbytes
    return out


def layer_weight_bytes(
    config: ModelConfig, layer_start: int, layer_end: int, dtype: torch.dtype, model_dir: str | Path | None = None
) -> list[int]:
    """Bytes of each decoder layer's weights in [layer_start, layer_end), as loaded (without the embedding or lm_head
    that the first and last layers' stages also hold)."""
    tensors = _loaded_tensors(config, layer_start, layer_end, dtype, model_dir)
    return [
        sum(nbytes for name, (_, nbytes) in tensors.items() if name.startswith(f"model.layers.{n}."))
        for n in range(layer_start, layer_end)
    ]


def _loaded_tensors(config, layer_start, layer_end, dtype, model_dir) -> dict[str, tuple[str, int]]:
    """Each tensor the stage holds: (format, bytes)."""
    specs = stage_tensor_specs(config, layer_start, layer_end)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in specs:
        specs.pop("lm_head.weight", None)
    path = gguf.find_gguf(model_dir) if model_dir is not None else None
    if path is None:
        packed = gptq_awq.packed_config(model_dir) if model_dir is not None else None
        return {
            name: packed.loaded(name, shape)
            if packed is not None and gptq_awq.is_packed(name)
            else (str(dtype).removeprefix("torch."), _numel(shape) * dtype.itemsize)
            for name, shape in specs.items()
        }
    tensors = gguf.read_gguf(path).tensors
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    return {
        name: quantized.loaded_format(tensors[tied.get(name, name)].type_name, shape, dtype)
        for name, shape in specs.items()
        if tied.get(name, name) in tensors
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_stage_weights(
    model_dir: str | Path,
    config: ModelConfig,
    layer_start: int,
    layer_end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    only: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Reads the stage's tensors (or those of them named in `only`), shard by shard, converting to dtype and moving to device.

    progress, if given, is called with the bytes of each tensor once it is loaded.
    """
    model_dir = Path(model_dir)
    specs = stage_tensor_specs(config, layer_start, layer_end)
    if only is not None:
        specs = {name: shape for name, shape in specs.items() if name in only}
    if (path := gguf.find_gguf(model_dir)) is not None:
        return _load_gguf(path, config, specs, dtype, device, progress)
    weight_map = checkpoint_weight_map(model_dir)
    packed = gptq_awq.packed_config(model_dir)
    source = {name: name for name in specs}
    if "lm_head.weight" in specs and config.tie_word_embeddings and "lm_head.weight" not in weight_map:
        source["lm_head.weight"] = "model.embed_tokens.weight"
    packed_sources = set()  # a GPTQ or AWQ linear's tensors, read as stored
    for name in [name for name in specs if packed is not None and gptq_awq.is_packed(name)]:
        del source[name]
        packed_sources |= {name.removesuffix("weight") + suffix for suffix in packed.suffixes()}
    source |= {src: src for src in packed_sources}
    missing = sorted(name for name in source if source[name] not in weight_map)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {model_dir} lacks {len(missing)} tensor(s) this stage needs: {shown}")

    loaded, raw = _read_shards(model_dir, weight_map, source, specs, packed_sources, dtype, device, progress)
    out = {name: loaded[src] for name, src in source.items() if src not in raw}
    return out | gptq_awq.packed_weights(
        model_dir, packed, {n: s for n, s in specs.items() if n not in out}, raw, device, progress
    )


def _read_shards(model_dir, weight_map, source, specs, packed_sources, dtype, device, progress):
    """The checkpoint's tensors named in `source`, shard by shard: those the stage holds as they are (checked against
    specs, in dtype, on device), and packed ones (GPTQ, AWQ) as stored."""
    by_shard: dict[str, list[str]] = {}
    for src in sorted(set(source.values())):
        by_shard.setdefault(weight_map[src], []).append(src)
    loaded: dict[str, torch.Tensor] = {}
    raw: dict[str, torch.Tensor] = {}  # a GPTQ or AWQ linear's packed tensors, as stored
    problems: list[str] = []
    for shard, names in by_shard.items():
        path = model_dir / shard
        if not path.is_file():
            raise CheckpointError(f"shard {path} (listed in {INDEX_FILE}) does not exist")
        header = read_header(path)
        with open(path, "rb", buffering=0) as f:
            for src in names:
                info = header.get(src)
                if info is None:
                    problems.append(f"{src} is listed for {shard} but not in it")
                    continue
                if src in packed_sources:
                    raw[src] = read_tensor(f, info)  # packed: checked (and counted) as a whole, once in its format
                    continue
                want = specs[src] if src in specs else specs["lm_head.weight"]
                if info.shape != want:
                    problems.append(f"{src} has shape {list(info.shape)}, expected {list(want)}")
                    continue
                loaded[src] = read_tensor(f, info).to(device=device, dtype=dtype)
                if progress is not None:
                    progress(loaded[src].numel() * loaded[src].element_size())
    if problems:
        raise CheckpointError(f"checkpoint {model_dir}: " + "; ".join(problems))
    return loaded, raw


def _load_gguf(
    path: Path, config, specs, dtype, device, progress
) -> dict[str, torch.Tensor | quantized.QuantizedWeight]:
    """The stage's tensors from a GGUF file: F32/F16 and vectors in dtype, quantized matrices in their formats."""
    g = gguf.read_gguf(path)
    source = {name: name for name in specs}
    if "lm_head.weight" in specs and "lm_head.weight" not in g.tensors and config.tie_word_embeddings:
        source["lm_head.weight"] = "model.embed_tokens.weight"
    missing = sorted(name for name in specs if source[name] not in g.tensors)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) this stage needs: {', '.join(missing[:8])}")
    for name in specs:
        t = g.tensors[source[name]]
        if t.shape != specs[name]:
            raise CheckpointError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected {list(specs[name])}")
    gguf.check_served(path, [source[name] for name in specs])
    loaded: dict[str, object] = {}
    summary: dict[tuple[str, str], list[int]] = {}
    with open(path, "rb", buffering=0) as f:
        for src in sorted(set(source.values()), key=lambda n: g.tensors[n].begin):
            t = g.tensors[src]
            raw = read_tensor(f, TensorInfo(torch.uint8, (t.end - t.begin,), t.begin, t.end))
            if t.type_name in ("F32", "F16"):
                value = raw.view(torch.float32 if t.type_name == "F32" else torch.float16).view(t.shape)
                loaded[src] = value.to(device=device, dtype=dtype)
            else:
                loaded[src] = quantized.from_gguf(raw, t.type_name, t.shape, t.name).to(device)
            fmt, nbytes = quantized.loaded_format(t.type_name, t.shape, dtype)
            row = summary.setdefault((t.type_name, fmt), [0, 0, 0])
            row[0], row[1], row[2] = row[0] + 1, row[1] + t.end - t.begin, row[2] + nbytes
            if progress is not None:
                progress(nbytes)
    log.info(
        "read %s: %s",
        path.name,
        "; ".join(
            f"{kind} ×{n} ({file_bytes / 2**20:.1f} MiB) → {fmt} ({held / 2**20:.1f} MiB)"
            for (kind, fmt), (n, file_bytes, held) in sorted(summary.items())
        ),
    )
    return {name: loaded[src] for name, src in source.items()}


def load_stage_model(
    model_dir: str | Path,
    layer_start: int,
    layer_end: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: ModelConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> StageModel:
    """Builds the stage on the meta device and assigns the loaded tensors: weights are allocated once."""
    config = config or ModelConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = StageModel(config, layer_start, layer_end)
    state = load_stage_weights(model_dir, config, layer_start, layer_end, dtype, device, progress)
    model.load_state_dict(quantized.install(model, state), strict=True, assign=True)
    _prepare(model, dtype, device)
    # The rotary buffer is derived, not stored: build it for real on the target device.
    with torch.device(device):
        model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
    return model.eval().requires_grad_(False)


def _prepare(model: StageModel, dtype: torch.dtype, device) -> None:
    """After loading: act-order's orders once per input; on a GPU, torch's quantized operators where they check out."""
    gptq_awq.share_input_orders(model)
    if torch.device(device).type == "cuda" and (used := quantized_device.prepare(model, dtype)):
        log.info("quantized products on %s: %s", device, "; ".join(f"{k}: {v}" for k, v in sorted(used.items())))


def change_layers(
    model: StageModel,
    layer_start: int,
    layer_end: int,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: Callable[[int], None] | None = None,
) -> StageModel:
    """The stage's model for layers [layer_start, layer_end) (a rebalance): the layers and ends it keeps move over as
    they are, those it loses are dropped from `model` first (which is spent), and only the gained layers' tensors are read."""
    config = model.config
    with torch.device("meta"):
        new = StageModel(config, layer_start, layer_end)
    for key in [key for key in model.model.layers if key not in new.model.layers]:
        del model.model.layers[key]  # freed before the gained layers are read: the peak is the larger split, not both
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    for key, layer in model.model.layers.items():
        new.model.layers[key] = layer
    if new.is_first and model.is_first:
        new.model.embed_tokens = model.model.embed_tokens
    if new.is_last and model.is_last:
        new.model.norm, new.lm_head = model.model.norm, model.lm_head
    owned = {name for name, p in new.named_parameters() if not p.is_meta}
    owned |= {f"{name}.weight" for name, m in new.named_modules() if getattr(m, "qweight", None) is not None}
    gained = set(stage_tensor_specs(config, layer_start, layer_end)) - owned
    state = load_stage_weights(model_dir, config, layer_start, layer_end, dtype, device, progress, only=gained)
    new.load_state_dict(quantized.install(new, state), strict=False, assign=True)
    _prepare(new, dtype, device)
    new.rotary_emb = model.rotary_emb
    still_meta = [name for name, p in [*new.named_parameters(), *new.named_buffers()] if p.is_meta]
    assert not still_meta, f"tensors neither kept nor loaded: {still_meta[:4]}"
    return new.eval().requires_grad_(False)


def checkpoint_fingerprint(model_dir: str | Path) -> str:
    """A short hash of config.json and the safetensors headers: equal checkpoints give equal fingerprints."""
    model_dir = Path(model_dir)
    if (path := gguf.find_gguf(model_dir)) is not None:
        return gguf.fingerprint(path)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for shard in sorted(set(checkpoint_weight_map(model_dir).values())):
        with open(model_dir / shard, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
    return digest.hexdigest()[:16]
