"""Rebalancing while serving: tokens/s of a pipeline with one slow stage, before and after `rebalance: auto` moves layers.

An 8-layer random Qwen2 on 4 Ray stages (127.0.0.1), each decoder layer holding its stage 2 ms per
microbatch (testing.layer_delay_ms: device time without using a core), stage 1 three times slower
(testing.stage_slowdown [1, 3, 1, 1]), starting from layers [2, 2, 2, 2]; 16 greedy requests in
flight at all times (each one replaced by a new one as it finishes). On one pipeline, in one run:

1. the starting split, rebalancing off;
2. `auto` (cooldown 5 s, so that the run is short; min gain 10 %), once settled: at least one
   rebalance applied and none in the last 30 s;
3. the starting split, the planner's (where auto settled) and its neighbours (one layer moved across
   one boundary; six where every stage keeps a layer), each applied through the same rebalance path
   with auto off, in interleaved rounds (each split's tokens/s is the mean of its windows; auto's
   split includes its window right after settling).

Then a second pipeline without the slowdown serves the same load for 5 minutes with `auto` on
(cooldown 5 s: sixty chances): it must apply nothing.

    python bench/rebalance.py [--window 20] [--steady 300] [--out bench/results/rebalance.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import finish

LAYERS, STAGES, START = 8, 4, [2, 2, 2, 2]
CONCURRENT, NEW_TOKENS, PROMPT = 16, 48, 16


class Load:
    """CONCURRENT greedy requests always in flight on the engine; `tokens` counts every token generated."""

    def __init__(self, engine) -> None:
        from stagecoach.proto.types import SamplingParams

        self.engine, self.tokens, self.started = engine, 0, 0
        self._sampling = lambda: SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        self._lock = threading.Lock()
        for _ in range(CONCURRENT):
            self._submit()

    def _submit(self) -> None:
        k = self.started
        self.started += 1
        prompt = [(7 * k + 3 * j) % 380 + 3 for j in range(PROMPT)]
        self.engine.submit_request([(prompt, self._sampling())], lambda seq_id: self._on_update)

    def _on_update(self, update) -> None:  # on the engine's thread
        with self._lock:
            self.tokens += len(update.token_ids)
        if update.finished:
            self._submit()

    def rate(self, seconds: float) -> float:
        """Tokens per second over the next `seconds`."""
        start, t0 = self.tokens, time.monotonic()
        time.sleep(seconds)
        return (self.tokens - start) / (time.monotonic() - t0)


def open_engine(model: Path, slowdown: list[float] | None, mode: str):
    from stagecoach.cluster.backends import open_pipeline
    from stagecoach.cluster.config import ClusterConfig
    from stagecoach.coordinator.compose import build_engine

    config = ClusterConfig.from_dict(
        {
            "model": {"path": str(model)},
            "pipeline": {
                "layers": START,
                "gpus_per_stage": 0,
                "cpus_per_stage": 0.5,
                "placement": "pack",
                "ray_address": "local",
                "rebalance": mode,
                "rebalance_min_gain": 0.10,
                "rebalance_cooldown_s": 5.0,
            },
            "cache": {"block_size": 16, "num_blocks": 512},
            "transport": {"host": "127.0.0.1"},
            "testing": {"layer_delay_ms": 2.0, "stage_slowdown": slowdown},
        }
    )
    pipeline = open_pipeline(config)
    engine = build_engine(pipeline, config, [], 512, 512)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        pipeline.wake()
        thread.join(timeout=30)
        pipeline.shutdown()

    return engine, close


def apply(engine, counts: list[int]) -> float:
    """Moves the pipeline onto `counts` through the engine's rebalance path (as the admin endpoint does); the pause."""
    record = engine.rebalancer.request(counts).result(timeout=300)
    return record["pause_s"]


def neighbours(counts: list[int]) -> list[list[int]]:
    """Each split with one layer moved across one boundary (every stage keeps one layer at least)."""
    out = []
    for b in range(len(counts) - 1):
        for src, dst in ((b, b + 1), (b + 1, b)):
            if counts[src] > 1:
                c = list(counts)
                c[src], c[dst] = c[src] - 1, c[dst] + 1
                out.append(c)
    return out


def slow_stage(engine, load: Load, window: float, rounds: int) -> dict:
    out: dict = {"start_split": START}
    time.sleep(5)  # the pipe fills, the first prompts are prefilled
    rates: dict[str, list[float]] = {}

    def measure(counts: list[int], settle: float = 3.0) -> None:
        time.sleep(settle)
        rates.setdefault(",".join(map(str, counts)), []).append(load.rate(window))

    measure(START, settle=0)
    # auto: the planner's proposal is applied once its predicted gain is >= 10 %, then again only after the cooldown.
    r = engine.rebalancer
    r.policy.mode = "auto"  # the cooldown from the start has passed
    t0, deadline = time.monotonic(), time.monotonic() + 240
    while not (r.applied and time.time() - r.history[-1]["at"] >= 30):
        if time.monotonic() > deadline:
            raise RuntimeError(f"auto did not settle within 240 s: {r.history}")
        time.sleep(1)
    out["auto_settled_after_s"] = round(time.monotonic() - t0, 1)
    r.policy.mode = "off"
    applied = [h for h in r.history if h["outcome"] == "applied"]
    out["auto_rebalances"] = [
        {k: h[k] for k in ("from", "to", "predicted_gain", "pause_s", "reprefilled")} for h in applied
    ]
    planner = applied[-1]["to"]  # where auto settled: its split is measured in the rounds below with the others
    out["planner_split"] = planner
    measure(planner, settle=0)
    # Interleaved rounds over the starting split, the planner's and its neighbours (this machine's rates drift by tens of %).
    splits = [START, planner, *neighbours(planner)]
    pauses = []
    for k in range(rounds):
        for counts in splits[k % len(splits) :] + splits[: k % len(splits)]:
            pauses.append(apply(engine, counts))
            measure(counts)
    apply(engine, START)
    out["tokens_per_s"] = {key: {"mean": sum(v) / len(v), "each": v} for key, v in rates.items()}
    mean = {key: v["mean"] for key, v in out["tokens_per_s"].items()}
    candidates = [",".join(map(str, c)) for c in splits[1:]]
    key = ",".join(map(str, planner))
    out["auto_over_start"] = mean[key] / mean[",".join(map(str, START))]
    out["auto_over_best_candidate"] = mean[key] / max(mean[c] for c in candidates)
    out["best_candidate"] = max(candidates, key=mean.get)
    out["pause_s"] = {"auto": [h["pause_s"] for h in applied], "by_hand": pauses}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=20.0, help="seconds each tokens/s is measured over")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the splits compared")
    parser.add_argument("--steady", type=float, default=300.0, help="seconds of steady load without a slowdown")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rebalance.json")
    args = parser.parse_args(argv)
    import logging

    import ray

    from stagecoach.coordinator.random_checkpoint import write_random_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_checkpoint(Path(tmp) / "model", num_hidden_layers=LAYERS, max_position_embeddings=512)
        engine, close = open_engine(model, [1, 3, 1, 1], "off")
        try:
            result = {"slow_stage": slow_stage(engine, Load(engine), args.window, args.rounds)}
        finally:
            close()
        engine, close = open_engine(model, None, "auto")
        try:
            load = Load(engine)
            time.sleep(args.steady)
            r = engine.rebalancer
            result["no_slowdown"] = {
                "seconds": args.steady,
                "tokens_generated": load.tokens,
                "rebalances_applied": r.applied,
                "proposal": r.stats(),
            }
        finally:
            close()
        ray.shutdown()
    s = result["slow_stage"]
    targets = {
        "auto >= 1.4x start split": s["auto_over_start"] >= 1.4,
        "auto >= 0.9x best of planner split and neighbours": s["auto_over_best_candidate"] >= 0.9,
        "no slowdown: nothing applied": result["no_slowdown"]["rebalances_applied"] == 0,
    }
    return finish(result, targets, started, args.out)


if __name__ == "__main__":
    sys.exit(main())
