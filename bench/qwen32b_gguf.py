"""What each Qwen1.5-32B-Chat GGUF file needs per stage, at 2, 3 and 4 stages, computed (no weights are downloaded).

Each file's tensor types follow llama.cpp's rules for its quantization mix (llama_tensor_get_type): the mix's base
type everywhere; `output.weight` in Q6_K (Q8_0 in q8_0); in q4_k_m and q5_k_m, `attn_v` and `ffn_down` in Q6_K for
the layers llama.cpp gives more bits (the first and last eighth, and every third between: 32 of 64). Each tensor then
counts as Stagecoach holds it (stage.quantized.loaded_format; norms and biases in float32), the stages split as
`--stages N` splits them (cluster.partition.partition_layers with lm_head's cost in layers' worth of its bytes, as
cluster.backends.plan_layers does for a GGUF file), and the KV cache comes on top (4 KiB per token per layer in
bfloat16, 8 KiB in float32: 8 KV heads × 128 × K and V).

    python bench/qwen32b_gguf.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stagecoach.cluster.partition import partition_layers
from stagecoach.proto.model_config import ModelConfig
from stagecoach.stage.loader import stage_tensor_specs
from stagecoach.stage.quantized import loaded_format

CONFIG = Path(__file__).resolve().parents[2] / "shared/data/qwen1.5-32b-chat/config.json"
# Each file: (its base type, the type of the layers given more bits for attn_v and ffn_down, or None).
FILES = {
    "q2_k": ("Q2_K", None),
    "q3_k_m": ("Q3_K", None),
    "q4_0": ("Q4_0", None),
    "q4_k_m": ("Q4_K", "Q6_K"),
    "q5_0": ("Q5_0", None),
    "q5_k_m": ("Q5_K", "Q6_K"),
    "q6_k": ("Q6_K", None),
    "q8_0": ("Q8_0", None),
}
FILE_BYTES_PER_WEIGHT = {"Q2_K": 84 / 256, "Q3_K": 110 / 256, "Q4_0": 18 / 32, "Q4_K": 144 / 256}
FILE_BYTES_PER_WEIGHT |= {"Q5_0": 22 / 32, "Q5_K": 176 / 256, "Q6_K": 210 / 256, "Q8_0": 34 / 32}


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], base: str, more: str | None, layers: int) -> str:
    if len(shape) != 2:
        return "F32"
    if name == "lm_head.weight":
        return "Q8_0" if base == "Q8_0" else "Q6_K"
    if more and name.endswith(("v_proj.weight", "down_proj.weight")) and more_bits(int(name.split(".")[2]), layers):
        return more
    return base


def held(config: ModelConfig, start: int, end: int, base: str, more: str | None, only: str = "") -> tuple[int, int]:
    """(bytes held once loaded, or -1 where a type is not served; bytes in the file) of a stage holding layers
    [start, end), or of its tensors whose names start with `only`."""
    total = in_file = 0
    for name, shape in stage_tensor_specs(config, start, end).items():
        if not name.startswith(only):
            continue
        kind = tensor_type(name, shape, base, more, config.num_hidden_layers)
        numel = shape[0] * (shape[1] if len(shape) == 2 else 1)
        in_file += int(numel * FILE_BYTES_PER_WEIGHT.get(kind, 4))
        fmt, nbytes = loaded_format(kind, shape, torch.float32)
        if len(shape) == 2 and fmt == "float32":
            total = -1  # a type Stagecoach refuses
        elif total >= 0:
            total += nbytes
    return total, in_file


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    config = ModelConfig.from_hf_dict(json.loads(CONFIG.read_text()))
    n = config.num_hidden_layers
    out = {}
    gib = 2**30
    for file, (base, more) in FILES.items():
        whole, in_file = held(config, 0, n, base, more)
        row = {"file_gib": round(in_file / gib, 1), "held_gib": None if whole < 0 else round(whole / gib, 1)}
        if whole >= 0:
            layers = [held(config, i, i + 1, base, more, f"model.layers.{i}.")[0] for i in range(n)]
            lm_head = (held(config, n - 1, n, base, more)[0] - layers[-1]) / (sum(layers) / n)
            for stages in (2, 3, 4):
                ranges = partition_layers(n, stages, last_stage_extra=lm_head)
                per_stage = [held(config, start, end, base, more)[0] for start, end in ranges]
                row[f"{stages}_stages"] = {
                    "layers": [end - start for start, end in ranges],
                    "gib": [round(b / gib, 2) for b in per_stage],
                }
        out[file] = row
        split = "  ".join(
            f"{s}: {row[f'{s}_stages']['layers']} layers, max {max(row[f'{s}_stages']['gib']):.1f} GiB"
            for s in (2, 3, 4)
            if f"{s}_stages" in row
        )
        print(f"{file:7s} file {row['file_gib']:5.1f} GiB, held {row['held_gib'] or 'refused'} GiB  {split}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
