"""End to end on the demo model (float32): Stagecoach's HTTP API against transformers' `generate`, same prompts, in one run.

Stagecoach runs as `stagecoach serve` with the demo config (2 stages, Ray actors of 1 CPU each,
every socket on 127.0.0.1). For each concurrency c, c streaming requests start together, each a
distinct prompt of PROMPT_TOKENS ids, OUTPUT_TOKENS tokens out (ignore_eos, greedy); output
tokens/s is c × OUTPUT_TOKENS over the wall time until the last stream ends. Time to first token
and inter-token gaps come from the streams' chunk arrival times (a chunk may carry several
tokens, when text is held back until it decodes cleanly). The baseline is transformers'
`generate` on the same prompt ids as one batch of c, float32, same output length, with all
cores, and (c = 1) with one thread: each stage's share of the cores.

    python bench/end_to_end.py [--concurrency 1 4 16] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT_TOKENS = 64
OUTPUT_TOKENS = 32


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, min(vocab, 100000)) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def stream_one(port: int, prompt: list[int], out: dict) -> None:
    """One streaming completion; records the send time and every chunk's arrival."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": OUTPUT_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    out["start"] = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:500]
    arrivals = []  # a chunk may carry several tokens (text is held back until it decodes cleanly)
    for line in resp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
    out["arrivals"] = arrivals
    conn.close()


def run_stagecoach(
    model: str, concurrency: list[int], rounds: int, compile_mode: str = "auto", stages_out: list | None = None
) -> dict:
    """tokens/s, TTFT and ITL per concurrency; stages_out, if given, gets each stage's weight bytes by format and its
    process's resident memory (VmRSS) at the end."""
    import socket
    from urllib.request import urlopen

    from stagecoach.proto.model_config import ModelConfig

    with socket.socket() as s:  # a free port on 127.0.0.1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(REPO / "bench" / "results" / "end_to_end_server.log", "w")
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    server = subprocess.Popen(
        [
            str(BIN / "stagecoach"),
            "serve",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--model",
            model,
            "--ray-address",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--compile",
            compile_mode,
            "--no-prefix-caching",
        ],  # rounds repeat prompts: transformers computes each whole, so do we here
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None and time.monotonic() < deadline, (
                "the server did not come up (bench/results/end_to_end_server.log)"
            )
            try:
                if urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        vocab = ModelConfig.from_pretrained(model).vocab_size
        stream_one(port, prompts(1, vocab, seed=99)[0], {})  # warm-up
        results = {}
        for c in concurrency:
            walls, ttft, itl = [], [], []
            for r in range(rounds):
                outs = [{} for _ in range(c)]
                threads = [
                    threading.Thread(target=stream_one, args=(port, p, o))
                    for p, o in zip(prompts(c, vocab, seed=r), outs, strict=False)
                ]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                walls.append(time.perf_counter() - t0)
                for o in outs:
                    assert o.get("tokens") == OUTPUT_TOKENS, f"a stream gave {o.get('tokens')} tokens"
                    ttft.append(o["arrivals"][0] - o["start"])
                    itl += [b - a for a, b in zip(o["arrivals"], o["arrivals"][1:], strict=False)]
            wall = statistics.median(walls)
            results[c] = {
                "tokens_per_s": c * OUTPUT_TOKENS / wall,
                "wall_s": wall,
                "ttft_ms": {"p50": percentile(ttft, 0.5) * 1e3, "p99": percentile(ttft, 0.99) * 1e3},
                "itl_ms": {"p50": percentile(itl, 0.5) * 1e3, "p99": percentile(itl, 0.99) * 1e3},
            }
            print(
                f"  stagecoach c={c}: {results[c]['tokens_per_s']:.1f} tok/s, TTFT p50 {results[c]['ttft_ms']['p50']:.0f} ms, "
                f"ITL p50 {results[c]['itl_ms']['p50']:.1f} ms p99 {results[c]['itl_ms']['p99']:.1f} ms",
                flush=True,
            )
        if stages_out is not None:
            stats = json.loads(urlopen(f"http://127.0.0.1:{port}/v1/stats", timeout=10).read())
            for s in stats["stages"]:
                status = Path(f"/proc/{s['pid']}/status").read_text()
                rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
                stages_out.append({"weight_formats": s["weight_formats"], "rss_bytes": rss})
        return results
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def run_transformers(model: str, concurrency: list[int], threads: int, rounds: int) -> dict:
    """transformers' generate in a fresh process with `threads` intra-op threads."""
    code = f"""
import json, sys, time, statistics, torch
sys.path.insert(0, {str(REPO / "bench")!r})
from end_to_end import prompts, OUTPUT_TOKENS
from transformers import AutoModelForCausalLM
torch.set_num_threads({threads})
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
vocab = model.config.vocab_size
out = {{}}
with torch.inference_mode():
    model.generate(torch.tensor(prompts(1, vocab, seed=99)), max_new_tokens=4, do_sample=False)
    for c in {concurrency!r}:
        walls = []
        for r in range({rounds}):
            ids = torch.tensor(prompts(c, vocab, seed=r))
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS,
                                 do_sample=False, pad_token_id=0)
            walls.append(time.perf_counter() - t0)
            assert gen.shape[1] == ids.shape[1] + OUTPUT_TOKENS
        out[c] = c * OUTPUT_TOKENS / statistics.median(walls)
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--model", default=None, help="the demo checkpoint (default: stagecoach fetch-demo-model --dequantize)"
    )
    parser.add_argument(
        "--compile", default="auto", choices=("auto", "on", "off"), help="pipeline.compile of the stages"
    )
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    model = (
        args.model
        or subprocess.run(
            [str(BIN / "stagecoach"), "fetch-demo-model", "--dequantize"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    stages = 2  # configs/demo.yaml
    ours = run_stagecoach(model, args.concurrency, args.rounds, args.compile)
    hf_all = run_transformers(model, args.concurrency, cores, args.rounds)
    hf_share = run_transformers(model, [1], max(1, cores // stages), args.rounds)
    result = {
        "model": Path(model).name,
        "dtype": "float32",
        "compile": args.compile,
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "cores": cores,
        "stages": stages,
        "stagecoach": ours,
        "transformers_all_cores": hf_all,
        "transformers_stage_share": {"threads": max(1, cores // stages), **hf_share},
    }
    for c in args.concurrency:
        print(
            f"  transformers c={c}: {hf_all[c]:.1f} tok/s ({cores} threads); ratio {ours[c]['tokens_per_s'] / hf_all[c]:.2f}"
        )
    print(
        f"  transformers c=1, {max(1, cores // stages)} thread(s): {hf_share[1]:.1f} tok/s; ratio {ours[1]['tokens_per_s'] / hf_share[1]:.2f}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
