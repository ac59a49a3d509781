"""Decode attention over the paged KV cache at Qwen1.5-32B's attention shape, against the K/V-read floor, in one run.

40 query heads, 8 KV heads, head_dim 128, batch 16, float32, blocks of 16 tokens handed out in a
random order (as a long-running server's are). Two paths: the stage's kernel, which reads the
cache in place (stage/paged_attention.py), and gathering each sequence's blocks and running SDPA
(the path before it, still the fallback). The floor is the K/V bytes over this machine's read
bandwidth, measured in the same run by summing a 1 GiB tensor with the same thread count.
Then a 512-token prefill chunk over a 16k cached prefix against the larger of its K/V read and its
FLOPs at the GEMM rate measured in the same run; and a 2-layer model of that attention shape, batch 4
at 2,048-token contexts: a decode step through the local backend against transformers' `generate` on
the same checkpoint.

    python bench/attention.py [--contexts 1024 4096 16384 32768] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HEADS, KV_HEADS, HEAD_DIM, BATCH, BLOCK = 40, 8, 128, 16, 16
GATHER_UP_TO = 16384  # beyond this the gathered copy alone takes seconds and as much memory again


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def read_bandwidth() -> float:
    """Bytes per second summing a 1 GiB float32 tensor of data (ones: pages really mapped)."""
    import torch

    big = torch.ones(1 << 28)
    return big.numel() * 4 / timed(big.sum, 5)


def measure(contexts: list[int]) -> dict:
    import torch

    from stagecoach.stage.paged_attention import gathered_decode, paged_decode

    bandwidth = read_bandwidth()
    rows = []
    for context in contexts:
        g = torch.Generator().manual_seed(context)
        blocks = BATCH * context // BLOCK
        k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
        v = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
        tables = torch.randperm(blocks, generator=g).view(BATCH, context // BLOCK)
        lens = torch.full((BATCH,), context)
        q = torch.randn(BATCH, HEADS, HEAD_DIM, generator=g)
        floor = 2 * BATCH * context * KV_HEADS * HEAD_DIM * 4 / bandwidth
        repeats = 5 if context <= 4096 else 2
        row = {
            "context": context,
            "kv_bytes": 2 * BATCH * context * KV_HEADS * HEAD_DIM * 4,
            "floor_ms": round(floor * 1e3, 2),
        }
        kernel = paged_decode(q, k, v, tables, lens, HEAD_DIM**-0.5)
        if kernel is not None:
            t = timed(
                lambda q=q, k=k, v=v, tables=tables, lens=lens: paged_decode(q, k, v, tables, lens, HEAD_DIM**-0.5),
                repeats,
            )
            row |= {"kernel_ms": round(t * 1e3, 2), "kernel_over_floor": round(t / floor, 2)}
        if context <= GATHER_UP_TO:
            t = timed(
                lambda q=q, k=k, v=v, tables=tables, lens=lens: gathered_decode(q, k, v, tables, lens, HEAD_DIM**-0.5),
                repeats,
            )
            row |= {"gather_ms": round(t * 1e3, 2), "gather_over_floor": round(t / floor, 2)}
            if kernel is not None:
                row["max_abs_diff"] = float(
                    (kernel - gathered_decode(q, k, v, tables, lens, HEAD_DIM**-0.5)).abs().max()
                )
        rows.append(row)
        print(
            f"  context {context:>6}: floor {row['floor_ms']} ms; kernel {row.get('kernel_ms')} ms (x{row.get('kernel_over_floor')}); "
            f"gather + SDPA {row.get('gather_ms', 'not run')} ms (x{row.get('gather_over_floor', '-')})",
            flush=True,
        )
    return {
        "shape": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "batch": BATCH,
            "block_size": BLOCK,
            "dtype": "float32",
        },
        "threads": torch.get_num_threads(),
        "read_gb_per_s": round(bandwidth / 1e9, 2),
        "rows": rows,
    }


def gemm_rate() -> float:
    """FLOP/s of a [2048, 2048] x [2048, 2048] float32 product at this thread count."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / timed(lambda: a @ b, 5)


def prefill_chunk(prefix: int = 16384, n: int = 512) -> dict:
    """A 512-token prefill chunk over a 16k cached prefix at the 32B's attention shape: the kernel and the gather path
    against the floor, the larger of reading the K/V once and the attention's FLOPs at this machine's GEMM rate."""
    import torch

    from stagecoach.stage.paged_attention import gathered_prefill, paged_prefill

    bandwidth, rate = read_bandwidth(), gemm_rate()
    g = torch.Generator().manual_seed(prefix)
    blocks = -(-(prefix + n) // BLOCK)
    k = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    table = torch.randperm(blocks, generator=g)
    q = torch.randn(n, HEADS, HEAD_DIM, generator=g)
    kv_bytes = 2 * (prefix + n) * KV_HEADS * HEAD_DIM * 4
    flops = 4 * HEADS * HEAD_DIM * sum(prefix + i + 1 for i in range(n))  # Q K^T and P V over each query's causal keys
    floor = max(kv_bytes / bandwidth, flops / rate)
    row = {
        "prefix": prefix,
        "chunk": n,
        "kv_bytes": kv_bytes,
        "gflop": round(flops / 1e9, 1),
        "gemm_gflop_per_s": round(rate / 1e9, 1),
        "read_ms": round(kv_bytes / bandwidth * 1e3, 2),
        "floor_ms": round(floor * 1e3, 1),
    }
    if paged_prefill(q[:1], k, v, table, 0, HEAD_DIM**-0.5) is not None:
        t = timed(lambda: paged_prefill(q, k, v, table, prefix, HEAD_DIM**-0.5), 2)
        row |= {
            "kernel_ms": round(t * 1e3, 1),
            "kernel_over_floor": round(t / floor, 2),
            "kernel_gflop_per_s": round(flops / t / 1e9, 1),
        }
        row["max_abs_diff"] = float(
            (
                paged_prefill(q, k, v, table, prefix, HEAD_DIM**-0.5)
                - gathered_prefill(q, k, v, table, prefix, HEAD_DIM**-0.5)
            )
            .abs()
            .max()
        )
    t = timed(lambda: gathered_prefill(q, k, v, table, prefix, HEAD_DIM**-0.5), 2)
    row |= {"gather_ms": round(t * 1e3, 1), "gather_over_floor": round(t / floor, 2)}
    print(
        f"  prefill chunk of {n} over a {prefix}-token prefix: floor {row['floor_ms']} ms ({row['gflop']} GFLOP at "
        f"{row['gemm_gflop_per_s']} GFLOP/s; K/V read {row['read_ms']} ms); kernel {row.get('kernel_ms')} ms "
        f"(x{row.get('kernel_over_floor')}); gather + SDPA {row['gather_ms']} ms (x{row['gather_over_floor']})",
        flush=True,
    )
    return row


def model_step(context: int = 2048, batch: int = 4, new_tokens: int = 8) -> dict:
    """A 2-layer model of the 32B's attention shape (small MLP and vocabulary), batch 4 at 2,048-token contexts:
    a decode step through the local backend (the stage's runner, as the engine drives it) against transformers' forward
    with its KV cache, the loop `generate` runs. Medians over new_tokens steps after one prefill each."""
    import tempfile

    import torch
    from transformers import Qwen2ForCausalLM

    from stagecoach.cluster.backends import LocalPipeline
    from stagecoach.cluster.partition import ranges_from_counts
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.proto.types import SamplingParams

    dims = dict(
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=1000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "model", max_position_embeddings=context + 64, **dims)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 1000, (context,), generator=g).tolist() for _ in range(batch)]
        blocks = batch * (context + new_tokens + 2) // BLOCK + batch * 2
        pipe = LocalPipeline.load(path, ranges_from_counts([2], 2), num_blocks=blocks, block_size=BLOCK)

        engine = Engine(
            pipe,
            SchedulerConfig(
                num_blocks=blocks,
                block_size=BLOCK,
                max_num_batched_tokens=context,
                max_num_seqs=batch,
                prefix_caching=False,
                max_model_len=context + 64,
            ),
        )
        steps: list[float] = []  # the decode microbatches' times (every sequence one token), through the stage's runner
        execute = pipe.execute

        def timed_execute(mb, timings=None):
            start = time.perf_counter()
            out = execute(mb, timings)
            if mb.num_tokens == batch and all(c.num_tokens == 1 for c in mb.seqs):
                steps.append(time.perf_counter() - start)
            return out

        pipe.execute = timed_execute
        engine.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True) for _ in prompts]
        )
        step_ours = statistics.median(steps)

        hf = Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        hf_steps = []
        with torch.no_grad():
            out = hf(torch.tensor(prompts), use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                start = time.perf_counter()
                out = hf(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                hf_steps.append(time.perf_counter() - start)
        step_hf = statistics.median(hf_steps)
    print(
        f"  2-layer model, batch {batch}, context {context}: decode step {step_ours * 1e3:.1f} ms, transformers {step_hf * 1e3:.1f} ms "
        f"(x{step_ours / step_hf:.2f})",
        flush=True,
    )
    return {
        "context": context,
        "batch": batch,
        "step_ms": round(step_ours * 1e3, 2),
        "transformers_step_ms": round(step_hf * 1e3, 2),
        "ratio": round(step_ours / step_hf, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    result = measure(args.contexts)
    result["prefill"] = prefill_chunk()
    result["model_step"] = model_step()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
