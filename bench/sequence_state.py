"""Per-step work that grows with new tokens, not with context: four figures, each measured in one run.

(a) distribution overhead per token: the mean gap between a greedy stream's tokens through
    `stagecoach serve` with two Ray stages [4, 4] minus the same with `--backend local`
    (a random Qwen2, hidden 512, intermediate 1376, 8 layers, 8/4 heads, float32, one torch
    thread per process), at batch 1 and 8;
(b) the encoded size of one decode microbatch of 8 sequences from stage 0 to stage 1 (hidden 512)
    at contexts 64 and 4,000;
(c) the coordinator's CPU time per decode step (process CPU over a run of steps, 32 sequences,
    engine + wire encoding + detokenising and stop strings, over a pipeline that answers at once)
    at contexts 64 and 4,000;
(d) a tiny model (hidden 64, compute negligible) through 1, 2 and 4 stages, each a process of its
    own with one torch thread, at batch 1, 64 and 256: time per decode step.

    python bench/sequence_state.py [--quick] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
WIDE = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=400,
)  # every id is a token of the 400-entry tokenizer: each one streams text
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def checkpoint(directory: Path, dims: dict) -> Path:
    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(directory, max_position_embeddings=8192, **dims)


def scheduler_config(num_blocks: int, block_size: int, max_tokens: int, max_seqs: int = 256):
    from stagecoach.coordinator.scheduler import SchedulerConfig

    return SchedulerConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=max_tokens,
        max_num_seqs=max_seqs,
        max_model_len=8192,
        prefix_caching=False,
    )


# -- (a) the distribution overhead, through the HTTP API ----------------------------------------------
def stream_gap(port: int, prompt: list[int], tokens: int, out: list) -> None:
    """One greedy stream; appends its mean gap between tokens (seconds): from its first text chunk to its last, per token.

    (A token whose text is held back, half a character, rides on a later chunk; over 48 tokens that shifts the mean by
    a percent or two, the same in every run.)
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:300]
    arrivals, usage = [], None
    for line in resp:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    conn.close()
    assert usage and usage["completion_tokens"] == tokens and len(arrivals) >= 2
    out.append((arrivals[-1] - arrivals[0]) / (tokens - 1))


def serve_gaps(model: Path, args: list[str], batches: list[int], tokens: int, rounds: int) -> dict[int, float]:
    import socket
    from urllib.request import urlopen

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [
            str(BIN / "stagecoach"),
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--kv-blocks",
            "512",
            "--no-prefix-caching",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (
                f"stagecoach serve {' '.join(args)} did not come up"
            )
            try:
                if urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        stream_gap(port, [5, 6, 7], 8, [])  # warm-up
        gaps = {}
        for b in batches:
            samples: list[float] = []
            for r in range(rounds):
                threads = [
                    threading.Thread(target=stream_gap, args=(port, [11 + i, 12 + r, 13], tokens, samples))
                    for i in range(b)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            gaps[b] = statistics.median(samples)
        with urlopen(
            f"http://127.0.0.1:{port}/v1/stats", timeout=10
        ) as resp:  # where a token's time went, on each stage's own clock
            stats = json.loads(resp.read())
        gaps["breakdown"] = {
            "coordinator_hop_ms": (stats["latency"]["coordinator_hop_ms"] or {}).get("p50"),
            "stages": [
                {k: (s[k] or {}).get("p50") for k in ("compute_ms", "queue_ms", "hop_ms")} for s in stats["stages"]
            ],
        }
        return gaps
    finally:
        server.terminate()
        server.wait(timeout=60)


def distribution_overhead(workdir: Path, quick: bool) -> dict:
    model = checkpoint(workdir / "wide", WIDE)
    batches, tokens, rounds = [1, 8], (24 if quick else 48), (2 if quick else 3)
    local = serve_gaps(model, ["--backend", "local"], batches, tokens, rounds)
    ray = serve_gaps(
        model,
        [
            "--layers",
            "4,4",
            "--ray-address",
            "local",
            "--grpc-host",
            "127.0.0.1",
            "--gpus-per-stage",
            "0",
            "--placement",
            "pack",
        ],
        batches,
        tokens,
        rounds,
    )
    out = {
        str(b): {"local_ms": local[b] * 1e3, "two_stages_ms": ray[b] * 1e3, "overhead_ms": (ray[b] - local[b]) * 1e3}
        for b in batches
    }
    return out | {"two_stages_breakdown_p50_ms": ray["breakdown"], "local_breakdown_p50_ms": local["breakdown"]}


# -- (b) a decode microbatch's size -------------------------------------------------------------------
def decode_bytes(context: int, num_seqs: int = 8, hidden: int = 512) -> int:
    import torch

    from stagecoach.coordinator.scheduler import Scheduler
    from stagecoach.proto.link import link_message
    from stagecoach.proto.types import SampleResult, SamplingParams

    sched = Scheduler(scheduler_config(num_seqs * (context // 16 + 2), 16, num_seqs * context))
    for i in range(num_seqs):
        sched.add_request(
            [(i + j) % 400 + 3 for j in range(context - 1)], SamplingParams(temperature=0, max_tokens=4, seed=1)
        )
    prefill = sched.schedule()
    sched.process_results(prefill, [SampleResult(c.seq_id, 7) for c in prefill.seqs if c.do_sample])
    msg, payload = link_message(sched.schedule(), torch.zeros(num_seqs, hidden))
    return msg.ByteSize() + len(payload)  # the header and the tensor's bytes (one frame, as a small microbatch travels)


# -- (c) the coordinator's CPU per decode step ------------------------------------------------------------
class InstantPipeline:
    """Answers every microbatch at once with token 7, after encoding it as the coordinator's Link would."""

    def __init__(self, num_blocks: int) -> None:
        from stagecoach.proto.link import encode_frames, link_message

        self.stages, self.num_blocks, self.block_size = [], num_blocks, 16
        self._frames, self._message = encode_frames, link_message
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()

    def submit(self, batch) -> None:
        from stagecoach.proto.types import Delivered, SampleResult

        self._frames(*self._message(batch, None))
        self._inbox.put(Delivered(batch.batch_id, [SampleResult(c.seq_id, 7) for c in batch.seqs if c.do_sample]))

    def wait(self, timeout=None):
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def wake(self) -> None:
        self._inbox.put(None)

    def health(self) -> list:
        return []


async def _stream_all(engine, tokenizer, metrics, prompts, steps: int) -> float:
    """Runs every sequence to steps + 1 tokens through the serving path; the process CPU seconds of the decode steps."""
    from stagecoach.coordinator.sequence_stream import Choice, SequenceStream
    from stagecoach.proto.types import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    added = await engine.add_requests([(p, params) for p in prompts])
    streams = [
        SequenceStream(tokenizer, metrics, Choice(i, seq.seq_id), ["\n\n"], q, time.monotonic(), engine.abort)
        for i, (seq, q) in enumerate(added)
    ]
    await asyncio.gather(*(s.next_delta() for s in streams))  # every sequence has its first token: prefill is over
    start = time.process_time()
    while any(s.choice.finish_reason is None for s in streams):
        await asyncio.gather(*(s.next_delta() for s in streams if s.choice.finish_reason is None))
    return time.process_time() - start


def coordinator_cpu(workdir: Path, context: int, num_seqs: int = 32, steps: int = 64) -> float:
    from stagecoach.coordinator.async_engine import AsyncEngine
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.random_checkpoint import write_tokenizer_files
    from stagecoach.coordinator.server_metrics import Metrics
    from stagecoach.coordinator.tokenizer import Tokenizer

    write_tokenizer_files(workdir / "tok")
    blocks = num_seqs * (-(-(context + steps + 2) // 16))
    engine = AsyncEngine(Engine(InstantPipeline(blocks), scheduler_config(blocks, 16, 8192, num_seqs), max_inflight=4))
    prompts = [[(i * 7 + j) % 300 + 3 for j in range(context - 1)] for i in range(num_seqs)]
    try:
        cpu = asyncio.run(_stream_all(engine, Tokenizer(workdir / "tok"), Metrics(dict), prompts, steps))
    finally:
        engine.stop()
    return cpu / steps


# -- (d) a tiny model's step time over 1, 2, 4 stages ---------------------------------------------------
def _stage_process(plan: dict, conn) -> None:
    """One real stage (StageWorker: the model, its KV cache, sequence state, servicer) in a process of its own."""
    import torch

    torch.set_num_threads(1)  # as Ray does for a 1-CPU actor
    from stagecoach.proto.control import Wiring
    from stagecoach.stage.worker import StageWorker

    worker = StageWorker(plan)
    worker.load()
    conn.send(worker.start(plan.num_blocks))
    worker.connect(Wiring(*conn.recv()))
    conn.recv()  # stop
    worker.stop()


def tiny_steps(workdir: Path, quick: bool) -> dict:
    import multiprocessing as mp

    from stagecoach.cluster.backends import stage_plans
    from stagecoach.cluster.config import ClusterConfig
    from stagecoach.cluster.grpc_pipeline import GrpcPipeline
    from stagecoach.cluster.partition import ranges_from_counts
    from stagecoach.coordinator.engine import Engine
    from stagecoach.proto.types import SamplingParams

    model = checkpoint(workdir / "tiny", TINY)
    config = ClusterConfig.from_dict(
        {
            "model": {"path": str(model)},
            "cache": {"num_blocks": 4096},
            "transport": {"host": "127.0.0.1"},
            "pipeline": {"max_batch_tokens": 4096},
        }
    )
    steps, out, ctx = (8 if quick else 16), {}, mp.get_context("spawn")
    for num_stages in (1, 2, 4):
        plans = stage_plans(config, ranges_from_counts([4 // num_stages] * num_stages, 4), link_token="")
        conns = [ctx.Pipe() for _ in plans]
        procs = [
            ctx.Process(target=_stage_process, args=(p, child), daemon=True)
            for p, (_, child) in zip(plans, conns, strict=False)
        ]
        for proc in procs:
            proc.start()
        addresses = [parent.recv() for parent, _ in conns]
        pipeline = GrpcPipeline("127.0.0.1")
        for i, (parent, _) in enumerate(conns):
            parent.send((addresses[i + 1] if i + 1 < num_stages else None, pipeline.address))
        pipeline.attach(addresses)
        try:
            for batch in (1, 64, 256):

                def run(
                    n: int, batch: int = batch, pipeline=pipeline, num_stages: int = num_stages
                ) -> tuple[float, Engine]:
                    engine = Engine(pipeline, scheduler_config(4096, 16, 4096), max_inflight=num_stages)
                    prompts = [[(i + j) % 300 + 3 for j in range(8)] for i in range(batch)]
                    t0 = time.perf_counter()
                    engine.generate(
                        prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _ in prompts]
                    )
                    return time.perf_counter() - t0, engine

                run(2)  # warm-up
                key = f"{num_stages} stages, batch {batch}"
                (long, engine), (short, _) = run(steps + 1), run(1)
                out[key] = (long - short) / steps * 1e3
                # Where a microbatch's time goes (p50 ms, each stage's own clock): its compute, its wait in the queue, its hop onward.
                rows = engine.timings.rows()
                out[f"{key}: breakdown"] = {
                    "coordinator_hop": (engine.timings.coordinator_hop() or {}).get("p50"),
                    "stages": [
                        {k: (r[k] or {}).get("p50") for k in ("compute_ms", "queue_ms", "hop_ms")} for r in rows
                    ],
                }
                print(f"  (d) tiny model, {key}: {out[key]:.2f} ms a step; {out[f'{key}: breakdown']}", flush=True)
        finally:
            for parent, _ in conns:
                parent.send("stop")
            for proc in procs:
                proc.join(timeout=10)
            pipeline.shutdown()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c", "d"])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "b" in args.only:
            result["decode_bytes"] = {str(c): decode_bytes(c) for c in (64, 4000)}
            print(f"  (b) decode microbatch bytes, stage 0 → 1: {result['decode_bytes']}", flush=True)
        if "c" in args.only:
            result["coordinator_cpu_ms"] = {str(c): coordinator_cpu(workdir, c) * 1e3 for c in (64, 4000)}
            print(f"  (c) coordinator CPU per decode step, 32 sequences: {result['coordinator_cpu_ms']}", flush=True)
        if "d" in args.only:
            result["tiny_step_ms"] = tiny_steps(workdir, args.quick)
        if "a" in args.only:
            result["overhead"] = distribution_overhead(workdir, args.quick)
            print(f"  (a) distribution overhead per token: {result['overhead']}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
