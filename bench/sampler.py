"""The last stage's sampler at Qwen1.5-32B's vocabulary (151,936), batch 1 and 64, against reading the batch's logits once.

Every option on (temperature 0.7, top-k 20, top-p 0.8, repetition 1.05, presence 0.5, frequency 0.5,
logprobs 5, a seed), each sequence with a 1,000-token prompt and 100 generated tokens behind it; then
each way a row can be decided on its own (greedy, temperature only, top-p only, top-k only). The floor
is the logits' bytes over this machine's read bandwidth, measured in the same run by summing a 1 GiB
tensor with the same thread count. A last row shows the whole-row path: top-p over flat logits, whose
nucleus is wider than the kernel's 256 candidates, is sorted whole as HF does.

    python bench/sampler.py [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from attention import read_bandwidth, timed  # the same timing and floor as the attention benchmark

VOCAB, PROMPT, GENERATED = 151936, 1000, 100
EVERY_OPTION = dict(
    temperature=0.7,
    top_k=20,
    top_p=0.8,
    repetition_penalty=1.05,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    logprobs=5,
)
ALONE = {
    "greedy": dict(temperature=0.0),
    "temperature only": dict(temperature=0.8),
    "top-p only": dict(temperature=0.7, top_p=0.8),
    "top-k only": dict(temperature=0.7, top_k=20),
}
WIDE = dict(temperature=1.0, top_p=0.95)  # over flat logits: a nucleus of tens of thousands, beyond the candidates


def setup(batch: int, options: dict, seed: int = 0, flat: bool = False, sampler_class=None):
    """A sampler holding `batch` sequences (prompt and generated tokens observed), their decode chunks and one step's logits."""
    import torch

    from stagecoach.proto.microbatch import SeqChunk
    from stagecoach.proto.types import SamplingParams
    from stagecoach.stage.sampler import Sampler

    Sampler = sampler_class or Sampler
    g = torch.Generator().manual_seed(seed)
    sampler, chunks = Sampler(), []
    for i in range(batch):
        params = SamplingParams(**options, seed=i)
        history = torch.randint(0, VOCAB, (PROMPT + GENERATED,), generator=g).tolist()
        sampler.observe(SeqChunk(i, 0, len(history), [], True, params, PROMPT, history))
        chunks.append(SeqChunk(i, len(history), 1, [], True))
    # Logits shaped like a language model's: a few strong tokens over a long tail (or only the tail: flat).
    logits = torch.randn(batch, VOCAB, generator=g) * (0.5 if flat else 1.5)
    if not flat:
        logits[:, :50] += 12.0
    return sampler, chunks, logits


def measure() -> dict:
    import torch

    bandwidth = read_bandwidth()
    rows = []
    cases = [("every option", EVERY_OPTION, (1, 64), False)] + [(k, v, (64,), False) for k, v in ALONE.items()]
    for name, options, batches, flat in cases + [("top-p, wide nucleus", WIDE, (1,), True)]:
        for batch in batches:
            sampler, chunks, logits = setup(batch, options, flat=flat)
            floor = logits.numel() * 4 / bandwidth
            # Each call appends the sampled token to the histories: a long-running sequence, as in serving.
            t = timed(lambda s=sampler, x=logits, c=chunks: s.sample(x, c), 20 if batch == 1 else 10)
            rows.append(
                {
                    "options": name,
                    "batch": batch,
                    "ms": round(t * 1e3, 3),
                    "floor_ms": round(floor * 1e3, 3),
                    "over_floor": round(t / floor, 2),
                }
            )
            print(
                f"  {name:>19}, batch {batch:>2}: {t * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms (x{t / floor:.1f})",
                flush=True,
            )
    return {
        "vocab": VOCAB,
        "threads": torch.get_num_threads(),
        "read_gb_per_s": round(bandwidth / 1e9, 2),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    import torch

    from stagecoach.stage import sampler_kernel

    sampler_kernel.prepare(torch.device("cpu"))  # a first build is not the sampler's time
    result = measure()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
