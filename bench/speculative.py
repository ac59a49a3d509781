"""Speculative decoding (n-gram drafts) against one token per pass, on the demo model through `stagecoach serve`.

Servers run side by side on the demo's config (2 stages, the thread backend: each stage behind its own gRPC server
in the server's process) and take turns: each round sends the same requests to each in turn (interleaved rounds;
medians reported). One runs without speculation, one with `--speculative-method ngram` and the defaults (the cost
model on, at most 8 sequences running), and two with up to 64 running, with the cost model and without it (there it
alone decides whether a pass under load verifies drafts).

1. One request whose answer repeats much of its input: "add type hints to this function" over a ~300-token Python
   function (chat template, greedy, 256 tokens): tokens/s with speculation / without (goal >= 1.8, beyond >= 2.5),
   the acceptance rate and tokens per verify pass (the server's /v1/stats), and whether the texts are identical.
2. 16 concurrent mixed requests (the same edit, other questions, shorter and longer answers): tokens/s ratio
   (goal >= 0.95).

The float32 conversion (the bars above) and the GGUF file as it is (reported, no bar).

    python bench/speculative.py [--rounds 3] [--quick] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

FUNCTION = '''def merge_intervals(intervals, min_gap=0, label=None):
    """Merge overlapping intervals; intervals closer than min_gap are merged too."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: (pair[0], pair[1]))
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1] + min_gap:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    result = []
    for start, end in merged:
        if label is not None:
            result.append((label, start, end))
        else:
            result.append((start, end))
    return result


def total_covered(intervals, min_gap=0):
    """The total length covered by the intervals once merged."""
    covered = 0
    for start, end in merge_intervals(intervals, min_gap):
        covered += end - start
    return covered


def find_gaps(intervals, lower, upper):
    """The parts of [lower, upper) that no interval covers."""
    gaps = []
    cursor = lower
    for start, end in merge_intervals(intervals):
        if start > cursor:
            gaps.append((cursor, min(start, upper)))
        cursor = max(cursor, end)
        if cursor >= upper:
            break
    if cursor < upper:
        gaps.append((cursor, upper))
    return gaps
'''
EDIT = f"Add type hints to every function below. Reply with the whole code only.\n\n```python\n{FUNCTION}```"
OTHERS = [
    "Explain in a few sentences what a hash map is.",
    "Write a haiku about compilers.",
    "List five uses of the Python itertools module, one line each.",
    "What is the difference between a process and a thread?",
]


def chat(port: int, content: str, max_tokens: int, out: dict) -> None:
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    conn = HTTPConnection("127.0.0.1", port, timeout=900)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = json.loads(conn.getresponse().read())
    conn.close()
    if "choices" not in resp:
        out["error"] = resp
        return
    out["text"] = resp["choices"][0]["message"]["content"]
    out["tokens"] = resp["usage"]["completion_tokens"]


# The servers compared: speculation off, on with the defaults (cost model on, at most 8 running), and on with up to 64
# running, with the cost model and without it (where it alone decides under load).
VARIANTS = {
    "off": ["--speculative-method", "off"],
    "ngram": ["--speculative-method", "ngram"],
    "ngram, max_running 64": ["--speculative-method", "ngram", "--speculative-max-running", "64"],
    "ngram, max_running 64, no cost model": [
        "--speculative-method",
        "ngram",
        "--speculative-max-running",
        "64",
        "--no-speculative-cost-model",
    ],
}


def start_server(model: str, variant: str, log_name: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(REPO / "bench" / "results" / log_name, "w")
    args = [str(BIN / "stagecoach"), "serve", "--config", str(REPO / "configs" / "demo.yaml"), "--model", model]
    args += ["--backend", "thread", "--host", "127.0.0.1", "--port", str(port), "--no-prefix-caching"]
    args += VARIANTS[variant] + ["--compile", "off"]
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    return server, port


def wait_ready(server: subprocess.Popen, port: int) -> None:
    from urllib.request import urlopen

    deadline = time.monotonic() + 300
    while True:
        assert server.poll() is None and time.monotonic() < deadline, "a server did not come up (bench/results/)"
        try:
            if urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return
        except OSError:
            time.sleep(0.5)


def stats(port: int) -> dict:
    from urllib.request import urlopen

    return json.loads(urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=10).read())["engine"]["speculative"]


def one_round(port: int, requests: list[tuple[str, int]]) -> tuple[float, list[dict]]:
    outs = [{} for _ in requests]
    threads = [threading.Thread(target=chat, args=(port, c, n, o)) for (c, n), o in zip(requests, outs, strict=True)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [o["error"] for o in outs if "error" in o]
    assert not failed, f"{len(failed)} requests failed (bench/results/speculative_*.log), the first: {failed[0]}"
    return time.perf_counter() - start, outs


def compare(model: str, rounds: int, single_tokens: int, mixed_tokens: int, variants: list[str]) -> dict:
    """Each variant's server up; interleaved rounds of the single request, then of the 16 mixed ones."""
    servers = {name: start_server(model, name, f"speculative_{i}.log") for i, name in enumerate(variants)}
    try:
        for server, port in servers.values():
            wait_ready(server, port)
        single = [(EDIT, single_tokens)]
        mixed = [(EDIT if i % 4 == 0 else OTHERS[i % len(OTHERS)], mixed_tokens // (1 + i % 2)) for i in range(16)]
        for _, port in servers.values():
            one_round(port, [(OTHERS[0], 8)])  # warm-up
        out = {}
        for label, requests in (("1 request", single), ("16 mixed", mixed)):
            walls = {name: [] for name in servers}
            texts = {}
            before = {name: stats(port) for name, (_, port) in servers.items()}
            for _ in range(rounds):
                for name, (_, port) in servers.items():
                    wall, outs = one_round(port, requests)
                    walls[name].append(sum(o["tokens"] for o in outs) / wall)
                    texts[name] = [o["text"] for o in outs]
            tps = {name: statistics.median(v) for name, v in walls.items()}
            out[label] = {"tokens_per_s": {name: [round(x, 2) for x in v] for name, v in walls.items()}}
            for name, (_, port) in servers.items():
                if name == "off":
                    continue
                after = stats(port)
                passes, drafts, accepted, declined = (
                    after[k] - before[name][k]
                    for k in ("verify_passes", "draft_tokens", "accepted_tokens", "declined_by_cost")
                )
                r = out[label][name] = {
                    "speedup": round(tps[name] / tps["off"], 3),
                    "acceptance_rate": round(accepted / drafts, 3) if drafts else 0.0,
                    "tokens_per_pass": round((passes + accepted) / passes, 3) if passes else 0.0,
                    "verify_passes": passes,
                    "declined_by_cost": declined,
                    "texts_identical": texts[name] == texts["off"],
                }
                print(
                    f"  {label}, {name}: {tps[name]:.2f} tok/s, off {tps['off']:.2f}: {r['speedup']:.2f}x; acceptance "
                    f"{r['acceptance_rate']:.2f}, {r['tokens_per_pass']:.2f} tokens a pass, {passes} passes, {declined} "
                    f"declined by the cost model; texts identical: {r['texts_identical']}",
                    flush=True,
                )
        return out
    finally:
        for server, _ in servers.values():
            server.terminate()
        for server, _ in servers.values():
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, shorter answers, float32 only")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--variants", default=";".join(VARIANTS), help=f"of: {' | '.join(VARIANTS)} (separated by ;)")
    parser.add_argument("--only", choices=("float32", "gguf"), default=None, help="one of the two models")
    args = parser.parse_args(argv)
    variants = args.variants.split(";")
    if variants[0] != "off" or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: 'off' first, then any of: {' | '.join(VARIANTS)} (separated by ;)")
    from stagecoach.coordinator.demo_model import fetch_demo_model

    (REPO / "bench" / "results").mkdir(exist_ok=True)
    models = {}
    if args.only != "gguf":
        models["float32"] = str(fetch_demo_model(dequantize=True))
    if not args.quick and args.only != "float32":
        models["q4_k_m (GGUF)"] = str(fetch_demo_model())
    result = {}
    for name, path in models.items():
        print(f"speculative decoding, demo {name}:", flush=True)
        rounds = 1 if args.quick else args.rounds
        result[name] = compare(path, rounds, 96 if args.quick else 256, 48 if args.quick else 128, variants)
        if args.json_out:  # what is measured so far, should a later part fail
            Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if "float32" in result:
        f = result["float32"]
        result["goal_1_request_1_8x"] = f["1 request"]["ngram"]["speedup"] >= 1.8
        result["goal_16_mixed_0_95x"] = f["16 mixed"]["ngram"]["speedup"] >= 0.95
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
