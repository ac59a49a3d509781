"""What Qwen1.5-32B-Chat's GPTQ-Int4 and AWQ checkpoints need per stage, at 2, 3 and 4 stages, next to bfloat16:
computed from the real config and Qwen's quantization_config (no weights are downloaded).

Each count is the loader's own (stage.loader.stage_weight_bytes over a folder holding the real config.json and the
checkpoint's quantization_config), split as `--stages N --dtype D` splits (cluster.backends.balanced_split: lm_head's
cost in layers' worth of its bytes in that dtype):

- CPU: every decoder linear in int4 groups of 128 with a float32 scale and offset (0.5625 bytes a weight), the
  embedding, lm_head, norms and biases in float32 (a CPU stage computes in float32);
- CUDA (bfloat16), as counted: the same linears, the rest in bfloat16 (what the memory check charges);
- CUDA held: after the self-check, torch's int4 tiles with a bfloat16 scale and zero per group of 128 (0.53 bytes a
  weight); a layer type that fails its check stays at the counted size.

The files: 4-bit values, float16 scales and 4-bit zeros per group of 128 (and GPTQ's int32 g_idx), the embedding and
lm_head in float16. The KV cache comes on top (4 KiB per token per layer in bfloat16, 8 KiB in float32).

    python bench/qwen32b_packed.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from stagecoach.cluster.backends import balanced_split
from stagecoach.proto.model_config import ModelConfig
from stagecoach.stage.gptq_awq import is_packed
from stagecoach.stage.loader import stage_tensor_specs, stage_weight_bytes

CONFIG = Path(__file__).resolve().parents[2] / "shared/data/qwen1.5-32b-chat/config.json"
# Qwen's quantization_config of Qwen1.5-32B-Chat-GPTQ-Int4 and -AWQ (config.json of each release).
CHECKPOINTS = {
    "bfloat16": None,
    "GPTQ-Int4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "AWQ": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True},
}
GROUP = 128
CUDA_INT4_PER_WEIGHT = 0.5 + 4 / GROUP  # torch's int4 tiles and a bfloat16 scale and zero per group
COUNTED_INT4_PER_WEIGHT = 0.5 + 8 / GROUP  # as the loader holds them: a float32 scale and offset per group


def rounded(values) -> list[float]:
    return [round(v / 2**30, 2) for v in values]


def file_bytes(config: ModelConfig, quantization: dict | None) -> int:
    total = 0
    for name, shape in stage_tensor_specs(config, 0, config.num_hidden_layers).items():
        numel = shape[0] * (shape[1] if len(shape) == 2 else 1)
        if quantization is None or not is_packed(name):
            total += 2 * numel
            continue
        total += numel // 2 + numel // GROUP * (2 + 0.5)  # values; per group a float16 scale and a 4-bit zero
        total += 4 * shape[1] if quantization["quant_method"] == "gptq" else 0  # g_idx
    return int(total)


def packed_weights(config: ModelConfig, start: int, end: int) -> int:
    return sum(s[0] * s[1] for n, s in stage_tensor_specs(config, start, end).items() if is_packed(n))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    real = json.loads(CONFIG.read_text())
    config = ModelConfig.from_hf_dict(real)
    gib, out = 2**30, {}
    for name, quantization in CHECKPOINTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.json").write_text(
                json.dumps(real | ({"quantization_config": quantization} if quantization else {}))
            )
            row = {"file_gib": round(file_bytes(config, quantization) / gib, 1)}
            for stages in (2, 3, 4):
                per = row[f"{stages}_stages"] = {}
                for where, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
                    if quantization is None and where == "cpu":
                        continue
                    ranges = balanced_split(config, folder, stages, dtype=dtype)
                    counted = [stage_weight_bytes(config, start, end, dtype, folder) for start, end in ranges]
                    per[where] = {"layers": [end - start for start, end in ranges], "gib": rounded(counted)}
                    if quantization is not None and where == "cuda":
                        saved = COUNTED_INT4_PER_WEIGHT - CUDA_INT4_PER_WEIGHT
                        held = [b - saved * packed_weights(config, *r) for b, r in zip(counted, ranges, strict=True)]
                        per[where]["held_gib"] = rounded(held)
        out[name] = row
        for stages in (2, 3, 4):
            for where, per in row[f"{stages}_stages"].items():
                held = f", held {max(per['held_gib']):5.2f} GiB" if "held_gib" in per else ""
                print(
                    f"{name:9s} file {row['file_gib']:4.1f} GiB, {where:4s} {stages} stages {per['layers']}: "
                    f"largest {max(per['gib']):5.2f} GiB as counted{held}"
                )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
