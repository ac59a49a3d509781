"""Quantized weights: the grouped product against its memory floor and float32, Qwen1.5-32B layers, and the demo
end to end, quantized (its GGUF file as it is) against float32 (the same file dequantized), on the same build.

1. The product (stage/csrc/quantized.cpp) at the demo's shapes and Qwen1.5-32B's, 1/4/16/64 rows, per format: time
   per product, cycling through copies of the weights larger than the last-level cache so they come from memory;
   the floor is the packed bytes (weights, scales, offsets) over the copy bandwidth measured in the same run (bytes
   read + written per second by a copy of 1 GiB); float32 is oneDNN's prepacked product on the same shapes, cycled
   the same way.
   At Qwen1.5-32B's shapes also Qwen's GPTQ-Int4 and AWQ (groups of 128, loaded from random packed tensors as a
   checkpoint's are: int4 groups of 32, each repeating its group's scale and offset) at 1 and 16 rows.
2. Two Qwen1.5-32B decoder layers (real shapes, random values) as q4_k_m holds its heavier half of the layers (Q4_K,
   with Q6_K for v and ffn_down), and as GPTQ-Int4 and AWQ load: bytes per layer against bfloat16, and a decode step
   of 1 and 16 sequences against float32 and against q4_k_m.
3. The error int8 activations would add (llama.cpp's way, simulated; no kernel): the demo's logits over a prompt.
4. The demo through `stagecoach serve` (configs/demo.yaml: 2 CPU stages), quantized and float32 in interleaved
   rounds, 1 and 16 concurrent streams (bench/end_to_end.py's driver), with each stage's resident memory.

    python bench/quantized.py [--rounds 2] [--quick] [--qwen-only] [--skip-e2e] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stagecoach.stage.quantized import QuantizedLinear, QuantizedWeight  # noqa: E402

WORKING_SET = 1 << 30  # bytes of weight copies cycled through: larger than any last-level cache here
DEMO_SHAPES = {"896→896": (896, 896), "896→4864": (4864, 896), "4864→896": (896, 4864)}  # (out, in)
QWEN32B_SHAPES = {"5120→5120": (5120, 5120), "5120→27392": (27392, 5120), "27392→5120": (5120, 27392)}
FORMATS = {"int8/32 (Q8_0, Q5_0)": (32, False, False), "int4/32+offset (Q4_K)": (32, True, True)}
FORMATS |= {"int8/16 (Q6_K)": (16, False, False)}
# Qwen's GPTQ-Int4 and AWQ releases (groups of 128), loaded from packed tensors as a checkpoint's are: int4/32+offset
PACKED = {"GPTQ-Int4 g128": "gptq", "AWQ g128": "awq"}


def random_weight(out_features: int, in_features: int, group: int, int4: bool, offsets: bool) -> QuantizedWeight:
    groups = in_features // group
    if int4:
        q = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8)
    else:
        q = torch.randint(-32, 32, (out_features, in_features), dtype=torch.int8)
    scales = torch.rand(out_features, groups) * 1e-3
    return QuantizedWeight(q, scales, torch.randn(out_features, groups) * 1e-3 if offsets else None, group, int4, "")


def packed_weight(
    out_features: int, in_features: int, method: str, group: int = 128, device: str = "cpu"
) -> QuantizedWeight:
    """Random GPTQ (4 bits, symmetric, no act-order, as Qwen's) or AWQ tensors of a linear, in the format they load as."""
    from stagecoach.stage.gptq_awq import from_awq, from_gptq

    def words(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device)

    groups = in_features // group
    scales = (torch.rand(groups, out_features, device=device) * 1e-3).half()
    if method == "awq":
        return from_awq(words(in_features, out_features // 8), words(groups, out_features // 8), scales, "awq")
    zeros = torch.full((groups, out_features // 8), 0x77777777, dtype=torch.int32, device=device)  # v1's symmetric 7
    g_idx = (torch.arange(in_features, device=device) // group).int()
    return from_gptq(words(in_features // 8, out_features), zeros, scales, g_idx, 4, False, "gptq")


def quantized_layer(weight: QuantizedWeight) -> QuantizedLinear:
    layer = QuantizedLinear.like(weight, bias=False)
    layer.qweight, layer.scales, layer.offsets = weight.q, weight.scales, weight.offsets
    return layer


def copy_bandwidth() -> float:
    """Bytes read + written per second by a copy of 1 GiB (the best of 5)."""
    src, dst = torch.ones(WORKING_SET // 4), torch.empty(WORKING_SET // 4)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * WORKING_SET / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cycle_time(layers: list, x: torch.Tensor, repeats: int) -> float:
    """Seconds per product, each call on the next copy of the weights (so none is still in cache)."""
    with torch.inference_mode():
        for layer in layers:
            layer(x)
        t0 = time.perf_counter()
        for i in range(repeats * len(layers)):
            layers[i % len(layers)](x)
        return (time.perf_counter() - t0) / (repeats * len(layers))


def product_table(shapes: dict, rows_list: list[int], bandwidth: float, repeats: int) -> list[dict]:
    from stagecoach.stage.model import Linear

    out = []
    for shape_name, (n, k) in shapes.items():
        floats = [Linear(k, n, bias=False).requires_grad_(False) for _ in range(max(2, WORKING_SET // (n * k * 4)))]
        for f in floats:
            f.pack()
        formats = {fmt: lambda f=f, n=n, k=k: random_weight(n, k, *f) for fmt, f in FORMATS.items()}
        if shapes is QWEN32B_SHAPES:  # q4_k_m files of Qwen1.5-32B hold Q4_K and Q6_K only; and Qwen's GPTQ / AWQ
            formats = {f: make for f, make in formats.items() if not f.startswith("int8/32")}
            formats |= {fmt: lambda m=m, n=n, k=k: packed_weight(n, k, m) for fmt, m in PACKED.items()}
        for fmt, make in formats.items():
            first = make()
            nbytes = sum(t.numel() * t.element_size() for t in first.tensors().values())
            layers = [quantized_layer(first)] + [
                quantized_layer(make()) for _ in range(max(1, WORKING_SET // nbytes) - 1)
            ]
            for rows in rows_list if fmt not in PACKED else [1, 16]:
                x = torch.randn(rows, k)
                t = cycle_time(layers, x, repeats)
                tf = cycle_time(floats, x, repeats)
                floor = nbytes / bandwidth
                out.append(
                    {
                        "shape": shape_name,
                        "format": fmt,
                        "rows": rows,
                        "ms": round(t * 1e3, 4),
                        "over_floor": round(t / floor, 2),
                        "float32_ms": round(tf * 1e3, 4),
                        "speedup_vs_float32": round(tf / t, 2),
                    }
                )
                print(
                    f"  {shape_name:11s} {fmt:22s} rows {rows:2d}: {t * 1e3:8.3f} ms = {t / floor:5.2f}x floor; "
                    f"float32 {tf * 1e3:8.3f} ms ({tf / t:.2f}x)",
                    flush=True,
                )
            del layers
    return out


def qwen32b_layers(rounds: int) -> dict:
    """Two Qwen1.5-32B decoder layers: q4_k_m's formats, GPTQ-Int4's and AWQ's against float32, decode steps of 1 and
    16 sequences."""
    from stagecoach.proto.model_config import ModelConfig
    from stagecoach.stage.kv_cache import KVCache
    from stagecoach.stage.model import AttentionMetadata, StageModel
    from stagecoach.stage.quantized import install

    real = json.loads((Path(__file__).resolve().parents[2] / "shared/data/qwen1.5-32b-chat/config.json").read_text())
    config = ModelConfig.from_hf_dict(real | {"num_hidden_layers": 3})
    models = {}
    for kind in ("float32", "q4_k_m", *PACKED):
        with torch.device("meta"):
            model = StageModel(config, 0, 2)  # two decoder layers; their embedding is left out (not what is measured)
        model.model.embed_tokens = None
        model.to_empty(device="cpu")
        state = {}
        for name, p in model.named_parameters():
            if kind == "q4_k_m" and p.dim() == 2:
                q6 = name.endswith(("v_proj.weight", "down_proj.weight"))
                state[name] = random_weight(*p.shape, 16 if q6 else 32, not q6, not q6)
            elif kind in PACKED and p.dim() == 2:
                state[name] = packed_weight(*p.shape, PACKED[kind])
            else:
                state[name] = torch.randn(p.shape) * 0.01
        model.load_state_dict(install(model, state), assign=True)
        if kind == "float32":
            model.pack()
        models[kind] = model.eval().requires_grad_(False)
    layer_bytes = {  # per layer: the model holds two
        kind: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) // 2
        for kind, m in models.items()
    }
    bf16 = config.layer_num_params() * 2
    out = {
        "layer_bytes": {"bfloat16": bf16} | {k: v for k, v in layer_bytes.items() if k != "float32"},
        "decode_ms": {},
    }
    for batch in (1, 16):
        times = {kind: [] for kind in models}
        for _ in range(rounds):
            for kind, model in models.items():
                cache = KVCache.for_model(model, batch * 4, 16, torch.float32, torch.device("cpu"))
                meta = AttentionMetadata.build(
                    [(48, 1, [4 * b, 4 * b + 1, 4 * b + 2, 4 * b + 3]) for b in range(batch)], 16, "cpu"
                )
                x = torch.randn(batch, config.hidden_size)
                with torch.inference_mode():
                    model.decoder_layers(x, meta, cache)  # warm
                    t0 = time.perf_counter()
                    model.decoder_layers(x, meta, cache)
                    times[kind].append(time.perf_counter() - t0)
        ms = {kind: statistics.median(t) * 1e3 for kind, t in times.items()}
        row = out["decode_ms"][batch] = {kind: round(t, 2) for kind, t in ms.items()}
        row["speedup"] = round(ms["float32"] / ms["q4_k_m"], 2)  # q4_k_m against float32
        row |= {f"{k} speedup": round(ms["float32"] / ms[k], 2) for k in PACKED}
        row |= {f"{k} / q4_k_m": round(ms[k] / ms["q4_k_m"], 2) for k in PACKED}
        print(
            f"  Qwen1.5-32B layer, decode of {batch:2d}: "
            + ", ".join(
                f"{k} {t:.1f} ms" + (f" ({ms['float32'] / t:.2f}x)" if k != "float32" else "") for k, t in ms.items()
            )
        )
    print(
        f"  bytes per layer: bfloat16 {bf16 / 2**20:.0f} MiB, "
        + ", ".join(f"{k} {b / 2**20:.0f} MiB" for k, b in layer_bytes.items() if k != "float32")
    )
    return out


def int8_activations(prompt_len: int = 64) -> dict:
    """The error int8 activations would bring (what llama.cpp does: each product's input rounded to int8 per block of
    32 with the block's absmax / 127, Q8_0's rule), simulated on the demo's quantized model: logits over a prompt
    against the float32 conversion's, beside the error of the quantized weights alone. No kernel: the error only."""
    from stagecoach.coordinator.demo_model import fetch_demo_model
    from stagecoach.stage.kv_cache import KVCache
    from stagecoach.stage.loader import load_stage_model
    from stagecoach.stage.model import AttentionMetadata
    from stagecoach.stage.quantized import QuantizedLinear

    def q8(module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        return ((blocks / scale).round().clamp(-127, 127) * scale).reshape(x.shape), *args[1:]

    ids = torch.randint(0, 150_000, (prompt_len,), generator=torch.Generator().manual_seed(0))
    meta = AttentionMetadata.build([(0, prompt_len, list(range(-(-prompt_len // 16))))], 16, "cpu")
    logits = {}
    for name in ("float32", "quantized", "quantized, int8 activations"):
        model = load_stage_model(fetch_demo_model(dequantize=name == "float32"), 0, 24).eval()
        if name.endswith("activations"):
            for m in model.modules():
                if isinstance(m, QuantizedLinear):
                    m.register_forward_pre_hook(q8)
        with torch.inference_mode():
            cache = KVCache.for_model(model, -(-prompt_len // 16), 16, torch.float32, torch.device("cpu"))
            logits[name] = model(ids, meta, cache)
    ref = logits["float32"]
    out = {}
    for name in ("quantized", "quantized, int8 activations"):
        err = (logits[name] - ref).abs().max().item()
        same = (logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item()
        out[name] = {"max_abs_logit_diff": round(err, 5), "top1_agreement": round(same, 4)}
        print(f"  {name}: logits within {err:.2e} of float32's (bound 2.5e-3); top-1 equal at {same:.1%} of positions")
    return out


def end_to_end(rounds: int) -> dict:
    import end_to_end as e2e

    from stagecoach.coordinator.demo_model import fetch_demo_model

    models = {"q4_k_m (GGUF as it is)": fetch_demo_model(), "float32": fetch_demo_model(dequantize=True)}
    runs = {name: [] for name in models}
    stages = {}
    for _ in range(rounds):
        for name, path in models.items():
            stages[name] = []
            result = e2e.run_stagecoach(str(path), [1, 16], rounds=2, compile_mode="off", stages_out=stages[name])
            runs[name].append({c: result[c]["tokens_per_s"] for c in (1, 16)})
    out = {"tokens_per_s": {}, "stages": stages}
    for name, rows in runs.items():
        out["tokens_per_s"][name] = {str(c): [round(r[c], 2) for r in rows] for c in (1, 16)}
    q, f = (out["tokens_per_s"][k] for k in models)
    out["speedup"] = {c: round(statistics.mean(q[c]) / statistics.mean(f[c]), 2) for c in ("1", "16")}
    weights = {k: sum(sum(s["weight_formats"].values()) for s in v) for k, v in stages.items()}
    out["weight_bytes_ratio"] = round(weights["q4_k_m (GGUF as it is)"] / weights["float32"], 3)
    print(
        f"  demo end to end: quantized / float32 = {out['speedup']['1']}x at 1 stream, {out['speedup']['16']}x at 16;"
    )
    print(f"  weight bytes {out['weight_bytes_ratio']}x; resident MiB per stage: ", end="")
    print({k: [round(s["rss_bytes"] / 2**20) for s in v] for k, v in stages.items()})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved end-to-end rounds of each model")
    parser.add_argument("--quick", action="store_true", help="demo shapes only, fewer repeats, one e2e round")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--qwen-only", action="store_true", help="the Qwen1.5-32B products and layers alone")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one stage's share of this 2-core machine; the e2e stages choose their own
    bandwidth = copy_bandwidth()
    print(f"quantized: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + written)", flush=True)
    result = {"copy_bandwidth_gbs": round(bandwidth / 1e9, 2), "threads": 1}
    if not args.qwen_only:
        result["demo_products"] = product_table(DEMO_SHAPES, [1, 4, 16, 64], bandwidth, 3 if args.quick else 10)
    if not args.quick:
        result["qwen32b_products"] = product_table(QWEN32B_SHAPES, [1, 4, 16, 64], bandwidth, 3)
        result["qwen32b_layers"] = qwen32b_layers(3)
    if not args.qwen_only:
        result["int8_activations"] = int8_activations()
    if not args.skip_e2e and not args.qwen_only:
        result["end_to_end"] = end_to_end(1 if args.quick else args.rounds)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
