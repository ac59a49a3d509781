"""Stages that share a host: one torch thread each (Ray's default for a 1-CPU actor) against every core of the host.

The demo model through `stagecoach serve` (configs/demo.yaml: 2 CPU stages as Ray actors on this machine, float32),
as bench/end_to_end.py drives it (1 and 16 concurrent streams, greedy, 64 prompt and 32 output tokens), in interleaved
rounds of each setting. The stages' thread count is set through the environment the server's local Ray cluster hands its
workers: Ray keeps an OMP_NUM_THREADS it finds there (else it sets 1 for a 1-CPU actor), and torch reads it at import.
A third setting adds OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep at once instead of spinning on the cores the
other stage is using).

    python bench/stage_threads.py [--rounds 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import end_to_end  # noqa: E402  (bench/ is not a package)

SETTINGS = {
    "1 thread per stage": {"OMP_NUM_THREADS": "1"},
    "all cores per stage": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))},
    "all cores, passive waits": {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0))), "OMP_WAIT_POLICY": "PASSIVE"},
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every setting")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    from stagecoach.coordinator.demo_model import fetch_demo_model

    model = str(fetch_demo_model(dequantize=True))
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        for _ in range(args.rounds):
            for name, env in SETTINGS.items():
                for key in saved:
                    os.environ.pop(key, None)
                os.environ.update(env)
                result = end_to_end.run_stagecoach(model, [1, 16], rounds=2, compile_mode="off")
                runs[name].append({c: result[c]["tokens_per_s"] for c in (1, 16)})
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    base = {c: statistics.mean(r[c] for r in runs["1 thread per stage"]) for c in (1, 16)}
    out = {"cores": len(os.sched_getaffinity(0)), "settings": {}}
    for name, rows in runs.items():
        mean = {c: statistics.mean(r[c] for r in rows) for c in (1, 16)}
        out["settings"][name] = {
            "tokens_per_s": {str(c): [round(r[c], 2) for r in rows] for c in (1, 16)},
            "ratio_to_1_thread": {str(c): round(mean[c] / base[c], 3) for c in (1, 16)},
        }
        print(
            f"{name:26s} c=1 {mean[1]:6.2f} tok/s ({mean[1] / base[1]:.2f}x)   c=16 {mean[16]:6.2f} ({mean[16] / base[16]:.2f}x)"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
