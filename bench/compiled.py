"""The decode step eager and compiled, in one process with one torch thread (a CPU stage's share), against transformers.

(a) A random Qwen2, hidden 512, intermediate 1376, 8 layers, 8/4 heads, vocabulary 400, float32, as one stage: the decode
    step at batch 1 and 16 (context 64) of transformers' forward with its KV cache, and of ours three ways: eager with
    torch's default matrix products (MKL), eager with oneDNN's prepacked ones (what a float32 CPU stage runs), and
    compiled (stage/compiled.py). The floor: the weight bytes over one thread's read bandwidth.
(b) The demo model (configs/demo.yaml: two stages) where it is on disk: each stage's decode step eager and compiled at
    batch 1 and 16, and the compile's warm-up per batch size: what `pipeline.compile: auto` is decided on for CPU stages
    (on only if compiled is at least 1.2x faster at both batch sizes and the warm-up of the configured sizes under 60 s).
(c) One matrix product at the demo's MLP shape, [16, 896] x [896, 4864]: MKL against oneDNN prepacked, GFLOP/s.

The variants of a figure run interleaved, in rounds, in one process.

    python bench/compiled.py [--quick] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import read_bandwidth, timed  # noqa: E402

WIDE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=400,
)
CONTEXT = 64
BLOCK = 16


def stage_runner(model_dir: Path, start: int, end: int, batch: int, packed: bool):
    """A StageRunner over layers [start, end) with room for `batch` sequences of CONTEXT + 64 tokens."""
    import torch

    import stagecoach.stage.runner as runner_module
    from stagecoach.proto.model_config import ModelConfig
    from stagecoach.stage.kv_cache import KVCache
    from stagecoach.stage.loader import load_stage_model

    config = ModelConfig.from_pretrained(model_dir)
    model = load_stage_model(model_dir, start, end, torch.float32, "cpu", config)
    blocks = -(-(CONTEXT + 64) // BLOCK)
    cache = KVCache(end - start, batch * blocks, BLOCK, config.num_key_value_heads, config.head_dim)
    can_pack = runner_module.can_pack
    if not packed:  # the A side: torch's default products
        runner_module.can_pack = lambda *_: False
    try:
        return runner_module.StageRunner(model, cache), blocks
    finally:
        runner_module.can_pack = can_pack


def decode_batch(runner, batch: int, blocks: int):
    """A decode microbatch of `batch` sequences at position CONTEXT, as admitted (the compute alone)."""
    import torch

    from stagecoach.proto.microbatch import MicroBatch, SeqChunk
    from stagecoach.stage.runner import Prepared

    config = runner.model.config
    seqs = [SeqChunk(i, CONTEXT, 1, do_sample=True) for i in range(batch)]  # greedy: every decode token samples
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    x = torch.randint(0, config.vocab_size, (batch,)) if runner.is_first else torch.randn(batch, config.hidden_size)
    return Prepared(MicroBatch(0, seqs, []), x, tables)


def interleaved(steps: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds of each named step, the steps taking turns round by round."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for fn in steps.values():
        fn()  # warm
    for _ in range(rounds):
        for name, fn in steps.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def hf_step(model_dir: Path, batch: int):
    """transformers' decode step at batch `batch` after a CONTEXT-token prompt, with its own KV cache."""
    import torch
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(torch.randint(0, hf.config.vocab_size, (batch, CONTEXT)), use_cache=True)
    state = {"cache": out.past_key_values, "token": out.logits[:, -1:].argmax(-1)}

    def step():
        with torch.no_grad():
            o = hf(state["token"], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["token"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        # Keep the context at CONTEXT + a few: crop back, so every step attends to the same length.
        state["cache"].crop(-1)

    return step


def wide_model(workdir: Path, batches: list[int], rounds: int) -> dict:
    import torch

    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint
    from stagecoach.proto.model_config import ModelConfig
    from stagecoach.stage.loader import stage_weight_bytes

    path = write_random_checkpoint(workdir / "wide", max_position_embeddings=8192, **WIDE)
    weight_bytes = stage_weight_bytes(ModelConfig.from_pretrained(path), 0, WIDE["num_hidden_layers"], torch.float32)
    out = {"model": WIDE | {"dtype": "float32", "context": CONTEXT}, "batches": {}}
    bandwidth = read_bandwidth()
    for batch in batches:
        steps, compile_s = {}, None
        steps["transformers"] = hf_step(path, batch)
        for name in ("eager_mkl", "eager", "compiled"):
            runner, blocks = stage_runner(path, 0, WIDE["num_hidden_layers"], batch, packed=name != "eager_mkl")
            if name == "compiled":
                compile_s = runner.compile([batch])
            prepared = decode_batch(runner, batch, blocks)
            steps[name] = lambda r=runner, p=prepared: r.execute(p)
        ms = {k: v * 1e3 for k, v in interleaved(steps, rounds, 10).items()}
        floor_ms = weight_bytes / bandwidth * 1e3
        out["batches"][batch] = {f"{k}_ms": round(v, 3) for k, v in ms.items()} | {
            "floor_ms": round(floor_ms, 3),
            "compile_s": round(compile_s, 1),
            "compiled_over_transformers": round(ms["compiled"] / ms["transformers"], 3),
            "eager_over_transformers": round(ms["eager"] / ms["transformers"], 3),
            "eager_mkl_over_transformers": round(ms["eager_mkl"] / ms["transformers"], 3),
            "compiled_over_floor": round(ms["compiled"] / floor_ms, 3),
        }
        print(
            f"  hidden 512 x 8, batch {batch}: transformers {ms['transformers']:.2f} ms, eager (MKL) {ms['eager_mkl']:.2f}, "
            f"eager {ms['eager']:.2f}, compiled {ms['compiled']:.2f} (floor {floor_ms:.2f}; compile {compile_s:.0f} s)",
            flush=True,
        )
        torch._dynamo.reset()
    out["read_gb_per_s"] = round(bandwidth / 1e9, 1)
    return out


def demo_model(batches: list[int], rounds: int) -> dict | None:
    import torch

    from stagecoach.cluster.backends import plan_layers
    from stagecoach.cluster.config import ClusterConfig, PipelineSection
    from stagecoach.coordinator.demo_model import default_model_dir
    from stagecoach.proto.model_config import ModelConfig

    path = default_model_dir()
    if not (path / "config.json").exists():
        print("  demo model not on disk (make demo fetches it): skipped", flush=True)
        return None
    config = ClusterConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    ranges = plan_layers(config, ModelConfig.from_pretrained(path))
    configured = len(PipelineSection().compile_batch_sizes)
    out = {"ranges": [list(r) for r in ranges], "batches": {}, "compile_s_per_batch_size": []}
    for batch in batches:
        ms = {"eager": 0.0, "compiled": 0.0}
        for start, end in ranges:
            eager, blocks = stage_runner(path, start, end, batch, packed=True)
            compiled, _ = stage_runner(path, start, end, batch, packed=True)
            # From nothing, as on a fresh machine: inductor's on-disk caches would make a second compile seconds.
            with (
                torch._inductor.config.patch(fx_graph_cache=False),
                torch._functorch.config.patch(enable_autograd_cache=False),
            ):
                out["compile_s_per_batch_size"].append(round(compiled.compile([batch]), 1))
            pe, pc = decode_batch(eager, batch, blocks), decode_batch(compiled, batch, blocks)
            t = interleaved(
                {"eager": lambda r=eager, b=pe: r.execute(b), "compiled": lambda r=compiled, b=pc: r.execute(b)},
                rounds,
                5,
            )
            for k in ms:
                ms[k] += t[k] * 1e3
            del eager, compiled
            torch._dynamo.reset()
        out["batches"][batch] = {
            "eager_ms": round(ms["eager"], 2),
            "compiled_ms": round(ms["compiled"], 2),
            "speedup": round(ms["eager"] / ms["compiled"], 3),
        }
        print(
            f"  demo model (both stages), batch {batch}: eager {ms['eager']:.1f} ms, compiled {ms['compiled']:.1f} ms "
            f"({ms['eager'] / ms['compiled']:.2f}x)",
            flush=True,
        )
    per_size = max(out["compile_s_per_batch_size"])
    out["warm_up_s_configured"] = round(per_size * configured, 1)  # the slower stage, times the configured sizes
    out["auto_would_compile_cpu"] = (
        all(b["speedup"] >= 1.2 for b in out["batches"].values()) and out["warm_up_s_configured"] < 60
    )
    print(
        f"  warm-up: up to {per_size:.0f} s per batch size, ~{out['warm_up_s_configured']:.0f} s for the {configured} configured; "
        f"auto on CPU: {'on' if out['auto_would_compile_cpu'] else 'off'}",
        flush=True,
    )
    return out


def gemm_shapes() -> dict:
    import torch

    x, w = torch.randn(16, 896), torch.randn(4864, 896)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    flops = 2 * 16 * 896 * 4864
    mkl = timed(lambda: torch.nn.functional.linear(x, w), 50)
    onednn = timed(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], ""), 50)
    out = {
        "shape": "[16, 896] x [896, 4864]",
        "mkl_gflops": round(flops / mkl / 1e9, 1),
        "onednn_gflops": round(flops / onednn / 1e9, 1),
    }
    print(
        f"  [16, 896] x [896, 4864]: MKL {out['mkl_gflops']} GFLOP/s, oneDNN prepacked {out['onednn_gflops']}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rounds = 2 if args.quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        print("decode step, one process, one thread", flush=True)
        result = {
            "gemm": gemm_shapes(),
            "wide": wide_model(Path(tmp), [1, 16], rounds),
            "demo": demo_model([1, 16], rounds),
        }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
