"""Prefix caching: time to first token with a shared system prompt and over a 4-turn chat, and preemptions under KV pressure.

The demo model (Qwen2.5-Coder-0.5B-Instruct, float32; `make demo` fetches it) on 2 in-process stages
(the local backend: the same runner, KV cache, sequence tables and sampler as a Ray stage, without
the hops, so the prefill itself is what is timed), the real engine and scheduler. Each figure is
measured with caching on and off in one run, the two engines taking turns.

1. A 2,000-token system prompt and a 20-token question, then the same system prompt and another
   question: the second request's time to first token against the first's.
2. A 4-turn chat: each turn sends the whole conversation again (about 200 tokens of question and
   answer more each time); time to first token of turn 4 against turn 1.
3. More sequences than the KV cache holds (24 requests sharing a 128-token prefix, 64 blocks of 16):
   preemptions with caching against without.

    python bench/prefix_cache.py [--out bench/results/prefix_cache.json]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from report import finish

SYSTEM_TOKENS, QUESTION_TOKENS, TURN_QUESTION, TURN_ANSWER = 2000, 20, 100, 100


def engine_for(model_dir: Path, caching: bool, num_blocks: int = 1024):
    from stagecoach.cluster.backends import LocalPipeline
    from stagecoach.cluster.partition import ranges_from_counts
    from stagecoach.coordinator.engine import Engine
    from stagecoach.coordinator.scheduler import SchedulerConfig
    from stagecoach.proto.model_config import ModelConfig

    config = ModelConfig.from_pretrained(model_dir)
    layers = config.num_hidden_layers
    pipeline = LocalPipeline.load(
        model_dir, ranges_from_counts([layers // 2, layers - layers // 2], layers), num_blocks=num_blocks, block_size=16
    )
    scheduler = SchedulerConfig(
        num_blocks=num_blocks,
        block_size=16,
        max_num_batched_tokens=512,
        max_num_seqs=64,
        max_model_len=4096,
        vocab_size=config.vocab_size,
        prefix_caching=caching,
    )
    return Engine(pipeline, scheduler)


def ttft(engine, prompt: list[int], max_tokens: int = 1) -> tuple[float, list[int], int]:
    """Seconds from submitting the prompt to its first token, its tokens, and how many prompt tokens were cached."""
    from stagecoach.proto.types import SamplingParams

    start = time.perf_counter()
    seq = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    first = None
    while not seq.is_finished:
        engine.step(60)
        if first is None and seq.output_token_ids:
            first = time.perf_counter() - start
    return first, seq.output_token_ids, seq.num_cached_tokens


def shared_system_prompt(engines: dict, rng: random.Random, vocab: int) -> dict:
    system = [rng.randrange(1000, vocab) for _ in range(SYSTEM_TOKENS)]
    out = {}
    for name, engine in engines.items():
        questions = [[rng.randrange(1000, vocab) for _ in range(QUESTION_TOKENS)] for _ in range(2)]
        first, _, _ = ttft(engine, system + questions[0])
        second, _, cached = ttft(engine, system + questions[1])
        out[name] = {
            "first_ttft_s": first,
            "second_ttft_s": second,
            "second_cached_tokens": cached,
            "speedup": first / second,
        }
    return out


def chat(engines: dict, rng: random.Random, vocab: int) -> dict:
    out = {name: {"ttft_s": [], "prompt_tokens": [], "cached_tokens": []} for name in engines}
    history = {name: [] for name in engines}
    questions = [
        [rng.randrange(1000, vocab) for _ in range(TURN_QUESTION + (TURN_ANSWER if turn == 0 else 0))]
        for turn in range(4)
    ]
    for turn in range(4):
        for name, engine in engines.items():  # taking turns: both see the machine in the same state
            prompt = history[name] + questions[turn]
            seconds, answer, cached = ttft(engine, prompt, max_tokens=TURN_ANSWER)
            history[name] = prompt + answer
            row = out[name]
            row["ttft_s"].append(seconds)
            row["prompt_tokens"].append(len(prompt))
            row["cached_tokens"].append(cached)
    for row in out.values():
        row["turn4_over_turn1"] = row["ttft_s"][3] / row["ttft_s"][0]
    return out


def pressure(model_dir: Path, rng: random.Random, vocab: int) -> dict:
    """24 requests sharing a 128-token prefix on a 64-block cache (6 fit unshared, and their growth does not): preemptions
    and the tokens, caching on and off."""
    from stagecoach.proto.types import SamplingParams

    prefix = [rng.randrange(1000, vocab) for _ in range(128)]
    prompts = [prefix + [rng.randrange(1000, vocab) for _ in range(24)] for _ in range(24)]
    out = {}
    for name, caching in (("on", True), ("off", False)):
        engine = engine_for(model_dir, caching, num_blocks=64)
        start = time.perf_counter()
        seqs = engine.generate(
            prompts, [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True) for _ in prompts]
        )
        out[name] = {
            "preemptions": engine.scheduler.num_preemptions,
            "seconds": time.perf_counter() - start,
            "tokens": [s.output_token_ids for s in seqs],
        }
        engine.pipeline.shutdown()
    out["same_tokens"] = out["on"].pop("tokens") == out["off"].pop("tokens")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_cache.json")
    args = parser.parse_args(argv)
    import torch

    from stagecoach.coordinator.demo_model import fetch_demo_model
    from stagecoach.proto.model_config import ModelConfig

    torch.set_num_threads(2)
    model_dir = fetch_demo_model(dequantize=True)  # cached after the first time (make demo)
    vocab = ModelConfig.from_pretrained(model_dir).vocab_size
    rng = random.Random(0)
    started = time.monotonic()
    engines = {"on": engine_for(model_dir, True), "off": engine_for(model_dir, False)}
    ttft(engines["on"], [5] * 64)  # warm both: the first prefill pays for allocations
    ttft(engines["off"], [5] * 64)
    result = {"system_prompt": shared_system_prompt(engines, rng, vocab), "chat": chat(engines, rng, vocab)}
    for engine in engines.values():
        engine.pipeline.shutdown()
    result["kv_pressure"] = pressure(model_dir, rng, vocab)
    targets = {
        "second request ttft >= 5x lower": result["system_prompt"]["on"]["speedup"] >= 5,
        "chat turn 4 ttft <= 1.5x turn 1": result["chat"]["on"]["turn4_over_turn1"] <= 1.5,
        "no more preemptions with caching": result["kv_pressure"]["on"]["preemptions"]
        <= result["kv_pressure"]["off"]["preemptions"],
        "same tokens under pressure": result["kv_pressure"]["same_tokens"],
    }
    return finish(result, targets, started, args.out)


if __name__ == "__main__":
    sys.exit(main())
