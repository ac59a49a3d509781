"""Tokenising beside the server's event loop: how long a long prompt stalls the loop, and where a thread starts to pay.

Qwen's own tokenizer (`../shared/data/qwen1.5-32b-chat/tokenizer.json`, or --tokenizer DIR). An event loop
ticks every millisecond while a 2 MB text is tokenised on a thread, once with `encode` (which holds the GIL for
the whole call) and once with `encode_batch` (which releases it); the loop's longest gap between ticks is the
stall every other request would see. Then texts of 100 to 16,000 characters, tokenised inline on the loop and
on a thread with `encode_batch`, in interleaved rounds: the API tokenises inline below
`coordinator.api.INLINE_TOKENIZE_CHARS` characters.

    python bench/tokenizing.py [--out bench/results/tokenizing.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from report import finish

SIZES = (100, 300, 1000, 4000, 16000)
ROUNDS = 5


def text(n: int) -> str:
    line = "def reverse(s: str) -> str:\n    return s[::-1]  # the quick brown fox jumps over the lazy dog, 123\n"
    return (line * (n // len(line) + 1))[:n]


async def longest_gap(work) -> float:
    """The event loop's longest gap between 1 ms ticks while `work` runs on a thread."""
    loop, gaps, done = asyncio.get_running_loop(), [], asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)
    await loop.run_in_executor(None, work)
    done.set()
    await ticker
    return max(gaps)


async def per_call_ms(tokenizer, s: str, on_thread: bool, reps: int = 100) -> float:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    for _ in range(reps):
        if on_thread:
            await loop.run_in_executor(None, tokenizer.encode_batch, [s])
        else:
            tokenizer.encode(s)
    return (time.perf_counter() - start) / reps * 1e3


async def main_async(tokenizer) -> dict:
    big = text(2 * 2**20)
    assert tokenizer.encode_batch([big])[0] == tokenizer.encode(big)
    stall = {"encode": [], "encode_batch": []}
    for _ in range(2):
        stall["encode"].append(await longest_gap(lambda: tokenizer.encode(big)))
        stall["encode_batch"].append(await longest_gap(lambda: tokenizer.encode_batch([big])))
    inline = {n: [] for n in SIZES}
    thread = {n: [] for n in SIZES}
    for _ in range(ROUNDS):
        for n in SIZES:
            inline[n].append(await per_call_ms(tokenizer, text(n), False))
            thread[n].append(await per_call_ms(tokenizer, text(n), True))
    return {
        "loop_stall_2mb_s": {k: round(min(v), 3) for k, v in stall.items()},
        "per_call_ms": {
            str(n): {"inline": round(statistics.median(inline[n]), 3), "thread": round(statistics.median(thread[n]), 3)}
            for n in SIZES
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen1.5-32b-chat"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tokenizing.json")
    args = parser.parse_args()
    from stagecoach.coordinator.api import INLINE_TOKENIZE_CHARS
    from stagecoach.coordinator.tokenizer import Tokenizer

    started = time.monotonic()
    result = asyncio.run(main_async(Tokenizer(args.tokenizer)))
    result["inline_below_chars"] = INLINE_TOKENIZE_CHARS
    calls = result["per_call_ms"]
    targets = {
        # a long prompt on a thread with encode_batch leaves the loop free (under 0.1 s of stall for 2 MB)
        "2mb_on_a_thread_stalls_the_loop_under_0.1_s": result["loop_stall_2mb_s"]["encode_batch"] < 0.1,
        # below the threshold inline is no slower than the hop to a thread
        "inline_no_slower_at_100_chars": calls["100"]["inline"] <= calls["100"]["thread"],
    }
    return finish(result, targets, started, args.out)


if __name__ == "__main__":
    sys.exit(main())
