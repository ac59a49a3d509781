"""Steady-state utilisation of each pipeline stage against the ideal, with synthetic stages of fixed compute time.

Every stage is its own process running the real stage transport (StageServicer, StageLoop,
gRPC on 127.0.0.1); only the runner is replaced by one that holds the stage for a fixed time
(a GPU kernel's wall time, without using a core) and returns a hidden-state tensor of the real
model's width. The coordinator is the real Engine + Scheduler + GrpcPipeline. The score is
pipeline efficiency: microbatches leaving the last stage per second times the stage compute
time, over the steady-state window (1.0 when one leaves every compute period; at most
min(1, M / S) with S stages and M microbatches in flight). A secondary view is each stage's
busy time over the window, from the timing records that travel with every microbatch, and a
breakdown of one round into its hops, queues and the engine's turnaround.

    python bench/pipeline_utilisation.py [--stages 4] [--compute-ms 10 3] [--inflight 1 2 4 8]
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

HIDDEN = 5120  # Qwen1.5-32B's residual stream


class SyntheticRunner:
    """Stands in for StageRunner: fixed compute time, real-sized outputs, no model."""

    def __init__(self, compute_s: float, is_first: bool, is_last: bool) -> None:
        from stagecoach.stage.sequences import SequenceTable

        self.compute_s, self.is_first, self.is_last = compute_s, is_first, is_last
        self.sequences = SequenceTable(100000, 16, 1 << 20)  # the real per-sequence state and its checks
        self.sampler = None  # no histories to keep

    def prepare(self, batch, inputs):
        from stagecoach.stage.runner import Prepared

        return Prepared(batch, inputs, self.sequences.admit(batch))

    def execute(self, prepared):
        import torch

        from stagecoach.proto.types import SampleResult
        from stagecoach.stage.runner import StageOutput

        batch = prepared.batch
        time.sleep(self.compute_s)
        if self.is_last:
            return StageOutput(samples=[SampleResult(c.seq_id, 7) for c in batch.seqs if c.do_sample])
        return StageOutput(hidden_states=torch.zeros(batch.num_tokens, HIDDEN, dtype=torch.bfloat16))


def stage_process(index: int, num_stages: int, compute_s: float, conn) -> None:
    import torch

    torch.set_num_threads(1)  # as Ray does for a 1-CPU actor; idle OpenMP threads would spin on shared cores
    from stagecoach.proto import stagecoach_pb2 as pb
    from stagecoach.proto.server import start_server
    from stagecoach.stage.loop import StageLoop
    from stagecoach.stage.servicer import StageServicer

    runner = SyntheticRunner(compute_s, index == 0, index == num_stages - 1)
    service = StageLoop(runner, index, 1 << 30)
    server, address = start_server(
        StageServicer(
            service,
            pb.StageInfo(index=index, num_kv_blocks=100000, block_size=16, schema_version=pb.SCHEMA_VERSION_CURRENT),
        ),
        "127.0.0.1",
        0,
        1 << 30,
    )
    conn.send(address)
    next_address, coordinator_address = conn.recv()
    service.connect(next_address, coordinator_address)
    cpu_start = time.process_time()
    conn.recv()  # stop
    conn.send((time.process_time() - cpu_start, service.batches_done))  # this process's CPU, all its threads
    server.stop(grace=0.5).wait()
    service.stop()


def start_stages(num_stages: int, compute_s: float):
    """The stage processes and a GrpcPipeline wired to them; returns (pipeline, pipes, processes)."""
    from stagecoach.cluster.grpc_pipeline import GrpcPipeline

    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for i in range(num_stages):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=stage_process, args=(i, num_stages, compute_s, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    addresses = [p.recv() for p in pipes]
    pipeline = GrpcPipeline("127.0.0.1")
    for i, p in enumerate(pipes):
        p.send((addresses[i + 1] if i + 1 < num_stages else None, pipeline.address))
    pipeline.attach(addresses)
    return pipeline, pipes, procs


def stop_stages(pipeline, pipes, procs) -> list[tuple[float, int]]:
    """Stops the stages; each one's (CPU seconds of all its threads since it was wired, microbatches it ran)."""
    for p in pipes:
        p.send("stop")
    cpu = [p.recv() for p in pipes]
    for proc in procs:
        proc.join(timeout=10)
    pipeline.shutdown()
    return cpu


def measure(num_stages: int, compute_s: float, inflight: int, num_seqs: int, new_tokens: int) -> dict:
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.proto.types import SamplingParams

    pipeline, pipes, procs = start_stages(num_stages, compute_s)
    deliveries, arrived, submitted = [], {}, {}  # (the engine's clock = every stage's: one machine)
    real_wait, real_submit = pipeline.wait, pipeline.submit

    def recording_wait(timeout=None):
        d = real_wait(timeout)
        if d is not None:
            arrived[d.batch_id] = time.monotonic_ns()
            deliveries.append(d)
        return d

    def recording_submit(batch):
        submitted[batch.batch_id] = time.monotonic_ns()
        real_submit(batch)

    pipeline.wait, pipeline.submit = recording_wait, recording_submit
    engine = Engine(
        pipeline,
        SchedulerConfig(
            num_blocks=100000,
            block_size=16,
            max_num_batched_tokens=4096,
            max_num_seqs=256,
            max_model_len=32768,
            prefix_caching=False,
        ),
        max_inflight=inflight,
    )
    prompts = [[3 + i % 50] * 8 for i in range(num_seqs)]
    start, cpu_start = time.perf_counter(), time.process_time()
    engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True) for _ in prompts])
    elapsed, coordinator_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stage_cpu = stop_stages(pipeline, pipes, procs)

    # Steady state: drop the first and last fifth of microbatches (pipe filling and draining).
    n = len(deliveries)
    window = deliveries[n // 5 : n - n // 5]
    per_stage = []
    for s in range(num_stages):
        spans = [(t.compute_start_ns, t.compute_end_ns) for d in window for t in d.timings if t.stage_index == s]
        t0, t1 = min(a for a, _ in spans), max(b for _, b in spans)
        per_stage.append(sum(b - a for a, b in spans) / (t1 - t0))
    # The score: microbatches leaving the last stage per second, times the compute period (1.0: one every period).
    ends = sorted(d.timings[-1].compute_end_ns for d in window)
    efficiency = (len(ends) - 1) / ((ends[-1] - ends[0]) / 1e9) * compute_s
    hops = [t.prev_send_ns / 1e6 for d in window for t in d.timings if t.prev_send_ns]  # each timed by its sender
    ideal = min(1.0, inflight / num_stages)
    return {
        "stages": num_stages,
        "compute_ms": compute_s * 1e3,
        "inflight": inflight,
        "microbatches": n,
        "peak_inflight": engine.peak_inflight,
        "efficiency": round(efficiency, 3),
        "utilisation": [round(u, 3) for u in per_stage],
        "ideal": ideal,
        "min_ratio_to_ideal": round(min(per_stage) / ideal, 3),
        "hop_ms_median": round(statistics.median(hops), 3) if hops else None,
        "round_ms": round_breakdown(window, submitted, arrived),
        # What the transport costs in CPU on a machine whose cores every process shares (the compute is a sleep).
        "cpu_us_per_microbatch": {
            "stages": [round(c / max(1, b) * 1e6) for c, b in stage_cpu],
            "coordinator": round(coordinator_cpu / max(1, engine.num_batches) * 1e6),
        },
        "tokens_per_s": round(num_seqs * new_tokens / elapsed, 1),
    }


def round_breakdown(window, submitted: dict, arrived: dict) -> dict:
    """Medians of each part of a microbatch's round, in ms, from its timing records and the engine's clock.

    A round: the engine submits; stage 0 receives; each stage queues, computes and hands on to the
    next stage's receipt; the last stage's compute end until the engine has the delivery; and the
    engine's turnaround, from having a delivery until it submits the next microbatch.
    """
    parts: dict[str, list] = {"coordinator to stage 0": [], "delivery to the engine": [], "engine turnaround": []}
    num_stages = len(window[0].timings)
    for s in range(num_stages):
        parts[f"stage {s} queue"], parts[f"stage {s} compute"] = [], []
        if s + 1 < num_stages:
            parts[f"hop {s} to {s + 1}"] = []
    submits = sorted(submitted.values())
    for d in window:
        ts = d.timings
        parts["coordinator to stage 0"].append(ts[0].received_ns - submitted[d.batch_id])
        for s, t in enumerate(ts):
            parts[f"stage {s} queue"].append(t.compute_start_ns - t.received_ns)
            parts[f"stage {s} compute"].append(t.compute_end_ns - t.compute_start_ns)
            if s + 1 < len(ts):
                parts[f"hop {s} to {s + 1}"].append(ts[s + 1].received_ns - t.compute_end_ns)
        parts["delivery to the engine"].append(arrived[d.batch_id] - ts[-1].compute_end_ns)
        i = bisect.bisect_left(submits, arrived[d.batch_id])
        if i < len(submits):
            parts["engine turnaround"].append(submits[i] - arrived[d.batch_id])
    return {k: round(statistics.median(v) / 1e6, 3) if v else None for k, v in parts.items()}


def measure_prefill(num_stages: int, compute_s: float, microbatches: int, prompt_tokens: int = 256) -> dict:
    """M prompts prefilled as M microbatches (one prompt each) against GPipe's schedule.

    With S stages each taking t per microbatch, GPipe finishes M microbatches in (M + S - 1) t:
    each stage idles for the bubble fraction (S - 1) / (M + S - 1). Measured: the wall time from
    the first submission to the last delivery, and the bubble it implies, 1 - M t / wall.
    """
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.proto.types import SamplingParams

    pipeline, pipes, procs = start_stages(num_stages, compute_s)
    try:
        engine = Engine(
            pipeline,
            SchedulerConfig(
                num_blocks=100000,
                block_size=16,
                max_num_batched_tokens=prompt_tokens,
                max_num_seqs=256,
                max_model_len=32768,
                prefix_caching=False,
            ),
            max_inflight=microbatches,
        )
        engine.generate([[5] * 8], [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)])  # warm the links
        prompts = [[3 + i] * prompt_tokens for i in range(microbatches)]
        start = time.perf_counter()
        engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True) for _ in prompts])
        wall = time.perf_counter() - start
    finally:
        stop_stages(pipeline, pipes, procs)
    ideal = (microbatches + num_stages - 1) * compute_s
    return {
        "stages": num_stages,
        "compute_ms": compute_s * 1e3,
        "microbatches": microbatches,
        "prompt_tokens": prompt_tokens,
        "wall_ms": round(wall * 1e3, 2),
        "gpipe_wall_ms": round(ideal * 1e3, 2),
        "gpipe_bubble": round((num_stages - 1) / (microbatches + num_stages - 1), 3),
        "measured_bubble": round(1 - microbatches * compute_s / wall, 3),
        "gpipe_over_measured": round(ideal / wall, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--compute-ms", type=float, nargs="+", default=[10.0, 3.0])
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seqs", type=int, default=32, help="concurrent sequences")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--json-out", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(
        f"{'stages':>6} {'compute':>8} {'inflight':>8} {'efficiency':>10} {'per-stage utilisation':>30} {'ideal':>6} {'min/ideal':>9} {'hop ms':>7} {'tok/s':>8}"
    )
    for compute_ms in args.compute_ms:
        for inflight in args.inflight:
            r = measure(args.stages, compute_ms / 1e3, inflight, args.seqs, args.new_tokens)
            rows.append(r)
            util = " ".join(f"{u:.3f}" for u in r["utilisation"])
            print(
                f"{r['stages']:>6} {compute_ms:>6.1f}ms {inflight:>8} {r['efficiency']:>10.3f} {util:>30} {r['ideal']:>6.2f} {r['min_ratio_to_ideal']:>9.3f} {r['hop_ms_median']:>7.3f} {r['tokens_per_s']:>8.1f}",
                flush=True,
            )
            print("    round (ms):", ", ".join(f"{k} {v}" for k, v in r["round_ms"].items()), flush=True)
            print("    CPU per microbatch (us):", r["cpu_us_per_microbatch"], flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
