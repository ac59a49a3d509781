"""The GPU part of the benchmarks, one script for the device machine: the CUDA path's correctness, then one stage's decode step against its floor.

The GPU machine has no Ray and no package registry: everything here runs in this process (the thread backend's
gRPC stages, or the in-process one).

1. Correctness (CI never runs CUDA): a small random checkpoint through 2 stages that share the
   one GPU (`stagecoach generate --backend thread`: each stage behind its own gRPC server),
   float32 greedy ids against HF's on the same device; then bfloat16 logits of every prefill
   and decode position (2 in-process stages) against HF's in bfloat16.
2. Quantized checkpoints (tests/packed_files.py writes them: GPTQ 4 bits in groups of 128 with
   act-order, AWQ in groups of 128, GPTQ 8 bits per channel), 2 in-process bfloat16 stages:
   what each layer type's product uses after its self-check at load (stage/quantized_device.py:
   torch's int4 operator, its int8 one, or dequantized), and the logits against HF's bfloat16
   model on the same dequantized values.
3. Decode step: one stage of real-shape Qwen1.5-32B layers (hidden 5120, intermediate 27392,
   40 heads, 8 KV heads) with random weights, in bfloat16 and as GPTQ-Int4 (groups of 128)
   loads, the step's time at batch 1, 16 and 64, eager and compiled (stage/compiled.py:
   torch.compile with CUDA graphs, one graph per batch size), against the floor: the stage's
   weight bytes as held plus the batch's K/V bytes (every sequence's context read once per
   layer) over the device's measured copy bandwidth (a copy moves 2 × its bytes).

    python bench/gpu.py [--layers 16] [--json-out bench/results/gpu.json]   # about 3-5 minutes
    python bench/gpu.py --quick      # 4 layers, eager only: under 2 minutes
    python bench/gpu.py --smoke      # the same steps on CPU at toy sizes: checks the script, not the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # packed_files: the tests' own GPTQ / AWQ writer
sys.path.insert(0, str(ROOT / "bench"))  # quantized.packed_weight


def _importable() -> str:
    """Where `import stagecoach` finds this checkout: installed here, or (the GPU machine, where it is not) a folder
    holding a `stagecoach` link to it, put on sys.path; returned for the subprocesses' PYTHONPATH ("" if installed)."""
    try:
        import stagecoach  # noqa: F401

        return ""
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="stagecoach-path-"))
        (shim / "stagecoach").symlink_to(ROOT)
        sys.path.insert(0, str(shim))
        return str(shim)


PYTHONPATH = _importable()
STAGECOACH = [sys.executable, "-m", "stagecoach.coordinator.cli"]
REAL = dict(
    hidden_size=5120,
    intermediate_size=27392,
    num_attention_heads=40,
    num_key_value_heads=8,
    vocab_size=152064,
    rope_theta=1e6,
    max_position_embeddings=32768,
)  # Qwen1.5-32B-Chat's config.json


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def hf_greedy(model, prompt: list[int], steps: int, device: str) -> tuple[list[int], list]:
    """HF's greedy ids and the logits row of every position after the prompt's first token, with its own KV cache."""
    import torch

    ids = torch.tensor([prompt], device=device)
    out, rows, past = [], [], None
    with torch.inference_mode():
        logits = None
        for _ in range(steps):
            res = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past, logits = res.past_key_values, res.logits[0]
            rows.extend(logits.float().cpu())
            nxt = int(logits[-1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out, rows


def correctness(device: str, smoke: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    steps = 16
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_checkpoint(
            Path(tmp) / "model",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            std=0.08,
        )
        prompt = [(7 * i) % 500 + 3 for i in range(24)]

        # float32 through the thread backend: two stages on the GPU, each behind its own gRPC server.
        run = subprocess.run(
            [
                *STAGECOACH,
                "generate",
                "--model",
                str(model_dir),
                "--stages",
                "2",
                "--backend",
                "thread",
                "--device",
                device,
                "--dtype",
                "float32",
                "--prompt-ids",
                ",".join(map(str, prompt)),
                "--max-new-tokens",
                str(steps),
                "--temperature",
                "0",
                "--repetition-penalty",
                "1.0",
                "--ignore-eos",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=os.environ | ({"PYTHONPATH": PYTHONPATH} if PYTHONPATH else {}),
        )
        assert run.returncode == 0, run.stderr[-3000:]
        ours = json.loads(run.stdout.strip().splitlines()[-1])
        hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        ref_ids, _ = hf_greedy(hf32, prompt, steps, device)
        devices = {s.get("device") for s in ours["stages"]}
        result["float32_thread_greedy_equal"] = ours["token_ids"] == ref_ids
        result["float32_thread_stage_devices"] = sorted(d for d in devices if d)
        print(
            f"  float32, 2 gRPC stages on {result['float32_thread_stage_devices']}: greedy ids equal HF's: "
            f"{result['float32_thread_greedy_equal']}",
            flush=True,
        )

        # bfloat16: every logits row of our two stages (in this process) against HF's in bfloat16.
        hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
        ids, rows, _ = bf16_rows(model_dir, device, prompt, steps)
        result |= compare("bfloat16", ids, rows, hf16, prompt, steps, device)
    return result


def bf16_rows(model_dir, device: str, prompt: list[int], steps: int, prepare_on_cpu: bool = False):
    """Two in-process bfloat16 stages: greedy ids, every logits row, and per linear what its products use."""
    import torch

    from stagecoach.cluster.backends import LocalPipeline
    from stagecoach.cluster.partition import ranges_from_counts
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.proto.types import SamplingParams
    from stagecoach.stage import quantized_device

    class Recording(LocalPipeline):
        def execute(self, batch, timings=None):
            for chunk in batch.seqs:
                chunk.score_rows = True  # every row's logits, not only the sampled ones
            out = super().execute(batch, timings)
            rows.extend(self.last_logits.float().cpu())
            return out

    rows: list = []
    pipe = Recording.load(model_dir, ranges_from_counts([2, 2], 4), "bfloat16", device, num_blocks=64, block_size=16)
    if prepare_on_cpu:  # --smoke: what the loader does on a GPU, through torch's CPU variants
        for runner in pipe.runners:
            quantized_device.prepare(runner.model, torch.bfloat16, "cpu")
    used: dict[str, list[str]] = {}
    for runner in pipe.runners:
        for name, module in runner.model.named_modules():
            kind = {"QuantizedLinear": "dequantized", "Int8ChannelLinear": "int8 operator"}.get(type(module).__name__)
            kind = f"int4 operator, group {module.group}" if hasattr(module, "scales_and_zeros") else kind
            if kind and kind not in used.setdefault(name.split(".")[-1], []):
                used[name.split(".")[-1]].append(kind)
    scheduler = SchedulerConfig(
        num_blocks=64,
        block_size=16,
        max_num_batched_tokens=512,
        max_num_seqs=64,
        max_model_len=len(prompt) + steps,
        prefix_caching=False,
    )
    engine = Engine(pipe, scheduler, max_inflight=1)
    (seq,) = engine.generate([prompt], [SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)])
    return seq.output_token_ids, rows, used


def compare(label: str, ids, rows, hf16, prompt, steps: int, device: str) -> dict:
    """Our rows against HF's: those both computed from the same inputs (the prompt's, the last giving token 0, then
    one per decoded token while the ids agree), as max |diff| / max |logit|."""
    import torch

    ref_ids, ref_rows = hf_greedy(hf16, prompt, steps, device)
    agree = next((i for i, (a, b) in enumerate(zip(ids, ref_ids, strict=False)) if a != b), steps)
    n = len(prompt) + min(agree, steps - 1)
    ours, ref = torch.stack(rows[:n]), torch.stack(ref_rows[:n])
    rel = (ours - ref).abs().max().item() / ref.abs().max().item()
    print(
        f"  {label}, 2 stages: logits max |diff| / max |logit| = {rel:.4f} over {n} positions "
        f"(close: {rel < 0.03}); greedy ids agree for {agree} of {steps}",
        flush=True,
    )
    key = label.replace(" ", "_").replace("-", "_")
    return {f"{key}_max_abs_diff_over_max_logit": round(rel, 5), f"{key}_greedy_ids_agree_for": agree} | {
        f"{key}_logits_close": rel < 0.03
    }


PACKINGS = {  # tests/packed_files.make_packed's settings
    "GPTQ-Int4 g128 act-order": dict(method="gptq", bits=4, group=128, act_order=True),
    "AWQ g128": dict(method="awq", bits=4, group=128),
    "GPTQ 8-bit per-channel": dict(method="gptq", bits=8, group=-1, sym=True),
}


def quantized_correctness(device: str, smoke: bool) -> dict:
    """Tiny GPTQ / AWQ checkpoints on 2 in-process bfloat16 stages: the products each layer type uses after the
    self-check at load, and the logits against HF's bfloat16 model on the same dequantized values."""
    import torch
    from packed_files import make_packed
    from transformers import AutoModelForCausalLM

    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    steps, prompt, out = 16, [(7 * i) % 500 + 3 for i in range(24)], {}
    for label, packing in PACKINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_random_checkpoint(
                Path(tmp) / "model",
                hidden_size=256,  # groups of 128 fit
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=512,
                std=0.08,
            )
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            make_packed(Path(model_dir), hf, **packing)  # HF now holds the packed values, dequantized
            ids, rows, used = bf16_rows(model_dir, device, prompt, steps, prepare_on_cpu=smoke)
            print(f"  {label}: products after the self-check: {used}", flush=True)
            out[label] = {"products": used} | compare(
                label, ids, rows, hf.to(torch.bfloat16).to(device).eval(), prompt, steps, device
            )
    return out


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves, counting a copy as reading and writing its bytes."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - start)


def stage_model(config, layers: int, weights: str, device: str, dtype):
    """A middle stage of `layers` layers (no embedding, no lm_head) with random weights: dense in dtype, or GPTQ-Int4
    (groups of 128, as Qwen's) as the loader holds it, then prepared for the device (self-check included)."""
    import torch

    from stagecoach.stage import quantized_device
    from stagecoach.stage.model import RotaryEmbedding, StageModel
    from stagecoach.stage.quantized import install

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device if weights == "bfloat16" else "meta"):
        model = StageModel(config, 1, 1 + layers)
    torch.set_default_dtype(previous)
    if weights == "bfloat16":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        return model.eval(), {}
    from quantized import packed_weight

    state = {
        name: packed_weight(*p.shape, "gptq", device=device)
        if p.dim() == 2
        else torch.randn(p.shape, device=device, dtype=dtype) * 0.02
        for name, p in model.named_parameters()
    }
    model.load_state_dict(install(model, state), assign=True)
    with torch.device(device):
        model.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
    used = quantized_device.prepare(model.eval().requires_grad_(False), dtype, "cpu" if device == "cpu" else "cuda")
    return model, used


def decode_steps(device: str, layers: int, batches: list[int], smoke: bool, weights: str, compile_too: bool) -> dict:
    import torch

    from stagecoach.proto.microbatch import MicroBatch, SeqChunk
    from stagecoach.stage.kv_cache import KVCache
    from stagecoach.stage.model import ModelConfig
    from stagecoach.stage.runner import Prepared, StageRunner

    dims = (
        dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
        if smoke
        else REAL
    )
    config = ModelConfig(num_hidden_layers=layers + 2, **dims)
    dtype = torch.bfloat16
    model, used = stage_model(config, layers, weights, device, dtype)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    block_size, context = 16, 512
    blocks_per_seq = context // block_size
    kv = KVCache(
        layers, max(batches) * blocks_per_seq, block_size, config.num_key_value_heads, config.head_dim, dtype, device
    )
    runner = StageRunner(model, kv)
    bandwidth = copy_bandwidth(device, (64 << 20) if smoke else (2 << 30))
    floor_ms = weight_bytes / bandwidth * 1e3
    out = {
        "weights": weights,
        "products": used,
        "layers": layers,
        "weight_bytes": weight_bytes,
        "copy_gb_per_s": round(bandwidth / 1e9, 1),
        "floor_ms": round(floor_ms, 3),
        "batches": {},
    }
    print(
        f"  {weights}: {layers} layers, {weight_bytes / 1e9:.2f} GB of weights {used or ''}; copies at {bandwidth / 1e9:.0f} GB/s: floor {floor_ms:.2f} ms a step",
        flush=True,
    )
    pos = context - 1  # each sequence decodes its last position, attending over the whole context
    # The attention's own floor (issue 13's): each sequence's K and V read once, every layer.
    kv_token_bytes = 2 * layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
    prepared = {}
    for b in batches:
        seqs = [SeqChunk(i, pos, 1) for i in range(b)]
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(b)]
        x = torch.randn(b, config.hidden_size, dtype=dtype, device=device)
        prepared[b] = Prepared(MicroBatch(0, seqs, []), x, tables)  # the compute alone: as if admitted

    def step_ms(b: int) -> float:
        with torch.inference_mode():
            for _ in range(3):
                runner.execute(prepared[b])
            sync(device)
            times = []
            for _ in range(5 if smoke else 30):
                start = time.perf_counter()
                runner.execute(prepared[b])
                sync(device)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    eager = {b: step_ms(b) for b in batches}
    compiled = dict(eager)
    if compile_too:
        start = time.perf_counter()
        try:  # torch.compile; CUDA graphs on CUDA
            runner.compile(batches, progress=lambda line: print("   ", line, flush=True))
            out["compile_s"] = round(time.perf_counter() - start, 1)
            compiled = {b: step_ms(b) for b in batches}
            out["recompiles_after_warm_up"] = runner.compiled.compiles - len(batches)
        except Exception as e:  # one run on a lent machine: keep the eager numbers, say why
            out["compile_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  compile failed: {out['compile_error']}", flush=True)
    for b in batches:
        kv_floor_ms = b * context * kv_token_bytes / bandwidth * 1e3
        best = min(eager[b], compiled[b])
        out["batches"][b] = {
            "eager_ms": round(eager[b], 3),
            "compiled_ms": round(compiled[b], 3),
            "step_ms": round(best, 3),
            "over_floor": round(best / (floor_ms + kv_floor_ms), 3),
            "compiled_over_eager": round(compiled[b] / eager[b], 3),
            "kv_floor_ms": round(kv_floor_ms, 3),
        }
        print(
            f"  batch {b}: eager {eager[b]:.2f} ms, compiled {compiled[b]:.2f} ms a step; floor {floor_ms:.2f} + K/V {kv_floor_ms:.2f} ms: "
            f"{best / (floor_ms + kv_floor_ms):.2f} x",
            flush=True,
        )
    return out


def section(result: dict, key: str, title: str, run) -> None:
    """One part of the run: its numbers, or (a lent machine runs this once) the error that stopped it, and on."""
    print(title, flush=True)
    try:
        result[key] = run()
    except Exception as e:
        result[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"  failed: {result[key]['error']}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="4 layers, batches 1 and 16, eager only: under 2 minutes")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks that the script runs")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --smoke to check the script on CPU")
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
    }
    layers = 2 if args.smoke else 4 if args.quick else args.layers
    batches = [1, 16] if args.quick else [1, 16, 64]
    started = time.perf_counter()
    title = "correctness of the CUDA path" if device == "cuda" else "correctness (smoke, CPU)"
    section(result, "correctness", title, lambda: correctness(device, args.smoke))
    section(
        result,
        "quantized_correctness",
        "GPTQ / AWQ checkpoints: the products after the self-check, logits against HF",
        lambda: quantized_correctness(device, args.smoke),
    )
    for weights in ("bfloat16", "GPTQ-Int4"):
        section(
            result,
            f"decode_{weights}",
            f"decode step against the floor, {weights}",
            lambda w=weights: decode_steps(device, layers, batches, args.smoke, w, compile_too=not args.quick),
        )
    dense, gptq = (result[f"decode_{w}"].get("batches", {}) for w in ("bfloat16", "GPTQ-Int4"))
    if 1 in dense:
        batch1 = dense[1]["over_floor"]
        result["goal_batch1_within_1_3x_floor"] = batch1 <= 1.3
        print(f"bfloat16 batch 1: {batch1:.2f} × the floor (goal <= 1.3: {'pass' if batch1 <= 1.3 else 'miss'})")
    for b in set(dense) & set(gptq):
        result.setdefault("gptq_int4_speedup_over_bfloat16", {})[b] = round(dense[b]["step_ms"] / gptq[b]["step_ms"], 2)
    print(f"bfloat16 step / GPTQ-Int4 step: {result.get('gptq_int4_speedup_over_bfloat16')}; ", end="")
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{result['seconds']} s in all", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
