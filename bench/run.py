"""`make bench`: every benchmark in one run, each figure a ratio against its baseline measured in the same run.

Writes bench/results/{transport,pipeline,sequence_state,attention,sampler,end_to_end,quantized,speculative,summary}.json and bench/results/bench.png,
and prints a table of figures with their goals and pass/miss.

    python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def figure(name: str, value: float | None, goal: str, passed: bool | None, unit: str = "") -> dict:
    return {
        "figure": name,
        "value": value,
        "unit": unit,
        "goal": goal,
        "status": "n/a" if passed is None else ("pass" if passed else "miss"),
    }


def run_transport() -> tuple[list[dict], list[dict]]:
    import transport

    print("transport: one hop, 127.0.0.1", flush=True)
    rows = transport.measure()
    (RESULTS / "transport.json").write_text(json.dumps(rows, indent=2) + "\n")
    small, big = rows[0], rows[-1]
    figs = [
        figure(
            "hop 10 KiB: added one-way latency vs raw TCP (Link)",
            small["link"]["added_one_way_us"],
            "(reference)",
            None,
            "us",
        ),
        figure(
            "hop 10 KiB: Link - bare gRPC stream, one-way",
            round(small["link"]["one_way_p50_us"] - small["floor"]["one_way_p50_us"], 1),
            "<= 60 us",
            small["link"]["one_way_p50_us"] - small["floor"]["one_way_p50_us"] <= 60,
            "us",
        ),
        figure(
            "hop 10 KiB: added one-way latency vs raw TCP (bare gRPC stream, floor)",
            small["floor"]["added_one_way_us"],
            "(floor)",
            None,
            "us",
        ),
        figure(
            "hop 40 MiB: throughput / raw TCP (Link)",
            big["link"]["throughput_vs_raw"],
            ">= 0.5",
            big["link"]["throughput_vs_raw"] >= 0.5,
        ),
        figure(
            "hop 40 MiB: throughput / raw TCP (bare gRPC stream, floor)",
            big["floor"]["throughput_vs_raw"],
            "(floor)",
            None,
        ),
        figure("hop 320 KiB: throughput / raw TCP (Link)", rows[1]["link"]["throughput_vs_raw"], "(no goal)", None),
    ]
    return rows, figs


def run_pipeline(quick: bool) -> tuple[dict, list[dict]]:
    import pipeline_utilisation as pu

    print("pipeline: synthetic stages, 4 processes", flush=True)
    steady = []
    for compute_ms, inflight in ((10, 4), (3, 4), (10, 6)):
        r = pu.measure(4, compute_ms / 1e3, inflight, 32, 24 if quick else 40)
        steady.append(r)
        print(
            f"  {compute_ms} ms, {inflight} in flight: efficiency {r['efficiency']}, utilisation {r['utilisation']}; round {r['round_ms']}; "
            f"CPU per microbatch {r['cpu_us_per_microbatch']} us",
            flush=True,
        )
    prefill = []
    for m in (1, 4, 8, 16):
        r = pu.measure_prefill(4, 0.02, m)
        prefill.append(r)
        print(
            f"  prefill, {m} microbatches of 20 ms: wall {r['wall_ms']} ms, GPipe {r['gpipe_wall_ms']} ms; "
            f"bubble {r['measured_bubble']} vs GPipe's {r['gpipe_bubble']}",
            flush=True,
        )
    result = {"steady": steady, "prefill": prefill}
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    goals = {(10, 4): 0.92, (3, 4): 0.85}  # pipeline efficiency: microbatches per second x stage compute time
    figs = []
    for r in steady:
        goal = goals.get((round(r["compute_ms"]), r["inflight"]))
        figs.append(
            figure(
                f"pipeline {r['compute_ms']:g} ms stages, {r['inflight']} in flight: efficiency",
                r["efficiency"],
                f">= {goal}" if goal else "(no goal)",
                r["efficiency"] >= goal if goal else None,
            )
        )
        figs.append(
            figure(
                f"pipeline {r['compute_ms']:g} ms stages, {r['inflight']} in flight: worst stage busy / ideal",
                r["min_ratio_to_ideal"],
                "(secondary view)",
                None,
            )
        )
    figs += [
        figure(
            f"prefill {r['microbatches']} microbatches: GPipe wall / measured wall",
            r["gpipe_over_measured"],
            "(no goal; 1.0 = GPipe)",
            None,
        )
        for r in prefill
    ]
    return result, figs


def run_sequence_state(quick: bool) -> tuple[dict, list[dict]]:
    import sequence_state

    print("sequence state: per-step work against context and batch", flush=True)
    r = sequence_state.main(["--json-out", str(RESULTS / "sequence_state.json")] + (["--quick"] if quick else []))
    over, size, cpu, tiny = r["overhead"], r["decode_bytes"], r["coordinator_cpu_ms"], r["tiny_step_ms"]
    size_ratio, cpu_ratio = round(size["4000"] / size["64"], 4), round(cpu["4000"] / cpu["64"], 3)
    tiny_ratio = round(tiny["4 stages, batch 256"] / tiny["4 stages, batch 1"], 3)
    figs = [
        figure(
            "distribution overhead per token, batch 1 (2 Ray stages - 1 process)",
            round(over["1"]["overhead_ms"], 2),
            "<= 3 ms",
            over["1"]["overhead_ms"] <= 3,
            "ms",
        ),
        figure(
            "distribution overhead per token, batch 8",
            round(over["8"]["overhead_ms"], 2),
            "<= 4 ms",
            over["8"]["overhead_ms"] <= 4,
            "ms",
        ),
        figure(
            "decode microbatch bytes, stage 0 -> 1, context 4,000 / context 64",
            size_ratio,
            "<= 1.05",
            size_ratio <= 1.05,
        ),
        figure("coordinator CPU per decode step, context 4,000 / context 64", cpu_ratio, "<= 1.1", cpu_ratio <= 1.1),
        figure("tiny model, 4 stages: step time at batch 256 / at batch 1", tiny_ratio, "<= 2.5", tiny_ratio <= 2.5),
    ]
    return r, figs


def run_attention(quick: bool) -> tuple[dict, list[dict]]:
    import attention

    print("attention: decode over the paged cache, Qwen1.5-32B's attention shape, batch 16", flush=True)
    r = attention.main(
        ["--json-out", str(RESULTS / "attention.json")] + (["--contexts", "1024", "4096"] if quick else [])
    )
    figs = []
    for row in r["rows"]:
        ratio = row.get("kernel_over_floor")
        goal = "<= 2" if row["context"] >= 4096 else "(no goal)"
        figs.append(
            figure(
                f"decode attention, 32B shape, batch 16, context {row['context']}: time / K-V-read floor",
                ratio,
                goal,
                (ratio is not None and ratio <= 2) if row["context"] >= 4096 else None,
            )
        )
        if "gather_over_floor" in row:
            figs.append(
                figure(
                    f"decode attention, context {row['context']}: gather + SDPA (before) / floor",
                    row["gather_over_floor"],
                    "(reference)",
                    None,
                )
            )
    pre = r["prefill"]
    figs.append(
        figure(
            f"prefill chunk of {pre['chunk']} over a {pre['prefix']}-token cached prefix: time / floor",
            pre.get("kernel_over_floor"),
            "<= 2",
            pre.get("kernel_over_floor") is not None and pre["kernel_over_floor"] <= 2,
        )
    )
    figs.append(
        figure(
            "prefill chunk over a cached prefix: gather + SDPA (before) / floor",
            pre["gather_over_floor"],
            "(reference)",
            None,
        )
    )
    step = r["model_step"]
    figs.append(
        figure(
            f"2-layer 32B-attention model, batch {step['batch']}, context {step['context']}: decode step / transformers'",
            step["ratio"],
            "<= 0.7",
            step["ratio"] <= 0.7,
        )
    )
    return r, figs


def run_sampler() -> tuple[dict, list[dict]]:
    import sampler

    print("sampler: vocabulary 151,936, against reading the logits once", flush=True)
    r = sampler.main(["--json-out", str(RESULTS / "sampler.json")])
    figs = []
    for row in r["rows"]:
        name = f"sampler, {row['options']}, batch {row['batch']}"
        if row["options"] == "every option" and row["batch"] == 64:
            figs.append(figure(f"{name}: time / logits-read floor", row["over_floor"], "<= 5", row["over_floor"] <= 5))
        elif row["options"] == "every option":
            figs.append(figure(f"{name}", row["ms"], "<= 3 ms", row["ms"] <= 3, "ms"))
        else:
            figs.append(figure(f"{name}: time / logits-read floor", row["over_floor"], "(no goal)", None))
    return r, figs


def run_compiled(quick: bool) -> tuple[dict, list[dict]]:
    import compiled

    print("decode step eager and compiled, one process, one thread", flush=True)
    args = ["--json-out", str(RESULTS / "compiled.json")] + (["--quick"] if quick else [])
    r = compiled.main(args)
    figs = [
        figure(
            "matrix product [16, 896] x [896, 4864]: oneDNN prepacked / MKL GFLOP/s",
            round(r["gemm"]["onednn_gflops"] / r["gemm"]["mkl_gflops"], 3),
            "(reference)",
            None,
        )
    ]
    for b, row in r["wide"]["batches"].items():
        goal = "<= 0.5" if int(b) == 1 else "(no goal)"
        figs.append(
            figure(
                f"hidden-512 x 8 layers, batch {b}, one process: compiled decode / transformers'",
                row["compiled_over_transformers"],
                goal,
                row["compiled_over_transformers"] <= 0.5 if int(b) == 1 else None,
            )
        )
        figs.append(
            figure(
                f"hidden-512 x 8 layers, batch {b}: eager / transformers', eager with MKL / transformers'",
                None,
                f"{row['eager_over_transformers']} / {row['eager_mkl_over_transformers']}",
                None,
            )
        )
    if r["demo"]:
        for b, row in r["demo"]["batches"].items():
            figs.append(
                figure(
                    f"demo model, both stages, batch {b}: eager / compiled step",
                    row["speedup"],
                    ">= 1.2 for auto on CPU",
                    row["speedup"] >= 1.2,
                )
            )
        figs.append(
            figure(
                "demo model: compile warm-up of the configured batch sizes (s)",
                r["demo"]["warm_up_s_configured"],
                "< 60 for auto on CPU",
                r["demo"]["warm_up_s_configured"] < 60,
            )
        )
    return r, figs


def run_end_to_end(quick: bool) -> tuple[dict, list[dict]]:
    import end_to_end

    print("end to end: the demo model, float32", flush=True)
    result = end_to_end.main(["--json-out", str(RESULTS / "end_to_end.json"), "--rounds", "1" if quick else "2"])
    ours, hf, share = result["stagecoach"], result["transformers_all_cores"], result["transformers_stage_share"]
    figs = []
    for c in sorted(ours, key=int):
        ratio = round(ours[c]["tokens_per_s"] / hf[c], 3)
        goal, ok = (
            (">= 1.1", ratio >= 1.1)
            if int(c) == 16
            else (">= 1.0", ratio >= 1.0)
            if int(c) == 1
            else ("(all cores; no goal)", None)
        )
        figs.append(figure(f"e2e c={c}: tokens/s / transformers ({result['cores']} threads)", ratio, goal, ok))
        figs.append(
            figure(
                f"e2e c={c}: TTFT p50 / ITL p50 / ITL p99 (ms)",
                None,
                f"{ours[c]['ttft_ms']['p50']:.0f} / {ours[c]['itl_ms']['p50']:.1f} / {ours[c]['itl_ms']['p99']:.1f}",
                None,
            )
        )
    ratio = round(ours[1]["tokens_per_s"] / share[1], 3)
    figs.append(
        figure(
            f"e2e c=1: tokens/s / transformers ({share['threads']} thread: a stage's share)",
            ratio,
            ">= 0.8",
            ratio >= 0.8,
        )
    )
    return result, figs


def run_quantized(quick: bool, skip_e2e: bool) -> tuple[dict, list[dict]]:
    import quantized

    print("quantized: the grouped product, Qwen1.5-32B layers, the demo's GGUF against float32", flush=True)
    args = ["--json-out", str(RESULTS / "quantized.json"), "--rounds", "1" if quick else "2"]
    r = quantized.main(args + (["--quick"] if quick else []) + (["--skip-e2e"] if skip_e2e else []))
    figs = []
    for table in ("demo_products", "qwen32b_products"):
        rows = [row for row in r.get(table, []) if row["rows"] == 1 and row["format"] not in quantized.PACKED]
        if rows:
            worst = max(rows, key=lambda row: row["over_floor"])
            figs.append(
                figure(
                    f"quantized product, {table.split('_')[0]} shapes, 1 row: time / packed-bytes floor (worst: "
                    f"{worst['shape']} {worst['format'].split(' ')[0]})",
                    worst["over_floor"],
                    "<= 1.5",
                    worst["over_floor"] <= 1.5,
                )
            )
    packed = [row for row in r.get("qwen32b_products", []) if row["format"] in quantized.PACKED]
    for rows in (1, 16):
        if worst := max(
            (row for row in packed if row["rows"] == rows), key=lambda row: row["over_floor"], default=None
        ):
            figs.append(
                figure(
                    f"GPTQ-Int4 / AWQ product, Qwen1.5-32B shapes, {rows} row(s): time / packed-bytes floor (worst: "
                    f"{worst['shape']} {worst['format']})",
                    worst["over_floor"],
                    "(report)",
                    None,
                )
            )
    if "qwen32b_layers" in r:
        layers = r["qwen32b_layers"]
        ratio = round(layers["layer_bytes"]["q4_k_m"] / layers["layer_bytes"]["bfloat16"], 3)
        figs.append(figure("Qwen1.5-32B layer, q4_k_m: bytes / bfloat16", ratio, "(reference)", None))
        for batch, row in layers["decode_ms"].items():
            figs.append(
                figure(f"Qwen1.5-32B layers, decode of {batch}: float32 / q4_k_m", row["speedup"], "(reference)", None)
            )
            for kind in quantized.PACKED:
                figs.append(
                    figure(
                        f"Qwen1.5-32B layers, decode of {batch}: float32 / {kind} (its time / q4_k_m's: "
                        f"{row[f'{kind} / q4_k_m']})",
                        row[f"{kind} speedup"],
                        "(reference)",
                        None,
                    )
                )
    if "int8_activations" in r:
        err = r["int8_activations"]["quantized, int8 activations"]
        figs.append(
            figure(
                "demo logits with int8 activations (simulated), max |diff| against float32's",
                err["max_abs_logit_diff"],
                f"(report; bound 2.5e-3; top-1 equal {err['top1_agreement']:.1%})",
                None,
            )
        )
    if "end_to_end" in r:
        e2e = r["end_to_end"]
        for c, goal in (("1", 2.5), ("16", 1.0)):
            figs.append(
                figure(
                    f"demo e2e c={c}: tokens/s, GGUF quantized / float32",
                    e2e["speedup"][c],
                    f">= {goal}" + (" (beyond: >= 3.5)" if c == "1" else ""),
                    e2e["speedup"][c] >= goal,
                )
            )
        figs.append(
            figure(
                "demo: weight bytes, quantized / float32",
                e2e["weight_bytes_ratio"],
                "<= 0.3",
                e2e["weight_bytes_ratio"] <= 0.3,
            )
        )
    return r, figs


def run_gpu() -> list[dict]:
    """bench/gpu.py where there is a CUDA device (the correctness of the CUDA path first); else the figure is not run."""
    import torch

    name = "GPU decode step, 16 real-shape layers bf16, batch 1: time / floor"
    if not torch.cuda.is_available():
        gpu = figure(name, None, "<= 1.3", None)
        gpu["status"] = "not run: no CUDA device here (python bench/gpu.py on a GPU machine)"
        return [gpu]
    import gpu as gpu_bench

    print("GPU: CUDA path correctness, then one stage's decode step", flush=True)
    result = gpu_bench.main(["--json-out", str(RESULTS / "gpu.json")])
    c, batches = result["correctness"], result["decode"]["batches"]
    figs = [
        figure(
            "GPU float32, 2 Ray stages sharing the GPU: greedy ids equal HF's",
            None,
            "equal",
            c["float32_ray_greedy_equal"],
        ),
        figure(
            "GPU bfloat16: logits max |diff| / max |logit| against HF",
            c["bfloat16_max_abs_diff_over_max_logit"],
            "< 0.03",
            c["bfloat16_logits_close"],
        ),
    ]
    for b, row in batches.items():
        figs.append(
            figure(
                f"GPU decode step, {result['decode']['layers']} real-shape layers bf16, batch {b}: time / floor",
                row["over_floor"],
                "<= 1.3" if int(b) == 1 else "(no goal)",
                row["over_floor"] <= 1.3 if int(b) == 1 else None,
            )
        )
    return figs


def plot(transport_rows, pipeline, e2e, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    labels = [f"{r['bytes'] // 1024:,} KiB" for r in transport_rows]
    width = 0.35
    for i, (name, label) in enumerate((("link", "Link stream"), ("floor", "bare gRPC stream"))):
        ax.bar(
            [x + (i - 0.5) * width for x in range(len(labels))],
            [r[name]["throughput_vs_raw"] for r in transport_rows],
            width,
            label=label,
        )
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="goal at 40 MiB")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("throughput / raw TCP")
    ax.set_title("one hop on 127.0.0.1")
    ax.legend(fontsize=8)

    ax = axes[1]
    prefill = pipeline["prefill"]
    ms = [r["microbatches"] for r in prefill]
    ax.plot(ms, [r["gpipe_bubble"] for r in prefill], "o--", label="GPipe bubble (S-1)/(M+S-1)")
    ax.plot(ms, [r["measured_bubble"] for r in prefill], "o-", label="measured bubble")
    ax.set_xlabel("microbatches M (4 stages)")
    ax.set_ylabel("idle fraction")
    ax.set_title("pipeline: prefill bubble")
    ax.legend(fontsize=8)

    ax = axes[2]
    if e2e:
        cs = sorted(e2e["stagecoach"], key=int)
        ax.plot(
            [int(c) for c in cs],
            [e2e["stagecoach"][c]["tokens_per_s"] for c in cs],
            "o-",
            label="Stagecoach (2 stages)",
        )
        ax.plot(
            [int(c) for c in cs],
            [e2e["transformers_all_cores"][c] for c in cs],
            "s--",
            label=f"transformers ({e2e['cores']} threads)",
        )
        ax.plot([1], [e2e["transformers_stage_share"][1]], "^", label="transformers (1 thread)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"end to end: {e2e['model']}, float32")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_speculative(quick: bool) -> tuple[dict, list[dict]]:
    import speculative

    print("speculative decoding: n-gram drafts on and off, the demo through serve", flush=True)
    r = speculative.main(["--json-out", str(RESULTS / "speculative.json")] + (["--quick"] if quick else []))
    figs = []
    for model, goals in (("float32", {"1 request": 1.8, "16 mixed": 0.95}), ("q4_k_m (GGUF)", {})):
        for label, rows in r.get(model, {}).items():
            for variant, row in rows.items():
                if variant == "tokens_per_s":
                    continue
                goal = goals.get(label) if variant == "ngram" else None
                figs.append(
                    figure(
                        f"speculative ({variant}), demo {model}, {label}: tokens/s on / off (acceptance "
                        f"{row['acceptance_rate']:.2f}, {row['tokens_per_pass']:.2f} tokens a pass, "
                        f"{row['declined_by_cost']} declined by the cost model, texts identical: {row['texts_identical']})",
                        row["speedup"],
                        f">= {goal}" + (" (beyond: >= 2.5)" if label == "1 request" else "") if goal else "(report)",
                        row["speedup"] >= goal if goal else None,
                    )
                )
    return r, figs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end benchmark")
    parser.add_argument("--plot-only", action="store_true", help="redraw bench.png from the JSON of the last run")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        e2e_path = RESULTS / "end_to_end.json"
        e2e = json.loads(e2e_path.read_text()) if e2e_path.exists() else None
        if e2e:  # JSON keys are strings; the plot indexes the 1-thread baseline by 1
            e2e["transformers_stage_share"] = {
                k if k == "threads" else int(k): v for k, v in e2e["transformers_stage_share"].items()
            }
        plot(
            json.loads((RESULTS / "transport.json").read_text()),
            json.loads((RESULTS / "pipeline.json").read_text()),
            e2e,
            RESULTS / "bench.png",
        )
        return 0
    start = time.monotonic()
    transport_rows, figs = run_transport()
    pipeline, more = run_pipeline(args.quick)
    figs += more
    figs += run_sequence_state(args.quick)[1]
    figs += run_attention(args.quick)[1]
    figs += run_sampler()[1]
    figs += run_compiled(args.quick)[1]
    e2e = None
    if not args.skip_e2e:
        e2e, more = run_end_to_end(args.quick)
        figs += more
    figs += run_quantized(args.quick, args.skip_e2e)[1]
    if not args.skip_e2e:
        figs += run_speculative(args.quick)[1]
    figs += run_gpu()
    summary = {"machine": machine(), "seconds": round(time.monotonic() - start, 1), "figures": figs}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(transport_rows, pipeline, e2e, RESULTS / "bench.png")

    width = max(len(f["figure"]) for f in figs)
    print()
    print(f"{'figure':<{width}}  {'value':>10}  {'goal':<24}  status")
    for f in figs:
        value = "" if f["value"] is None else f"{f['value']:g}{(' ' + f['unit']) if f['unit'] else ''}"
        print(f"{f['figure']:<{width}}  {value:>10}  {f['goal']:<24}  {f['status']}")
    print(f"\n{summary['seconds']:.0f} s; JSON and bench.png in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
