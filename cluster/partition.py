"""Splits a model's decoder layers into contiguous per-stage ranges: a pure function, balanced by time."""

from __future__ import annotations

from stagecoach.errors import PartitionError
from stagecoach.proto.types import LayerRange


def ranges_from_counts(counts: list[int], num_layers: int) -> list[LayerRange]:
    """An explicit split such as [17, 16, 16, 15] → [(0, 17), (17, 33), (33, 49), (49, 64)]."""
    if not counts:
        raise PartitionError("the layer split is empty: give one layer count per stage, e.g. --layers 3,1,1")
    if any(c < 1 for c in counts):
        raise PartitionError(f"layer split {counts}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise PartitionError(
            f"layer split {counts} sums to {sum(counts)} but the model has {num_layers} layers; "
            f"make the counts add up to {num_layers}"
        )
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def partition_layers(
    num_layers: int,
    num_stages: int,
    last_stage_extra: float = 0.0,
    first_stage_extra: float = 0.0,
    layer_counts: list[int] | None = None,
) -> list[LayerRange]:
    """Contiguous layer ranges, one per stage.

    Costs are in units of one decoder layer's time: the last stage also pays `last_stage_extra`
    (its lm_head; 1.6 layers for Qwen1.5-32B), the first `first_stage_extra`. The default split
    minimises the slowest stage's cost and, among those, the spread (sum of squared costs).
    `layer_counts` overrides it.
    """
    if num_layers < 1:
        raise PartitionError(f"the model has {num_layers} layers; nothing to partition")
    if layer_counts is not None:
        if num_stages and len(layer_counts) != num_stages:
            raise PartitionError(f"{num_stages} stages asked for but the layer split {layer_counts} has {len(layer_counts)} entries")
        return ranges_from_counts(layer_counts, num_layers)
    if num_stages < 1:
        raise PartitionError(f"the number of stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise PartitionError(f"{num_stages} stages cannot share {num_layers} layers: use at most {num_layers} stages")

    def cost(stage: int, count: int) -> float:
        extra = (first_stage_extra if stage == 0 else 0.0) + (last_stage_extra if stage == num_stages - 1 else 0.0)
        return count + extra

    # best[s][n]: (max cost, sum of squares) of splitting the first n layers into s stages.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for n in range(s, num_layers - (num_stages - s) + 1):
            for count in range(1, n - (s - 1) + 1):
                prev = best[s - 1][n - count]
                if prev == inf:
                    continue
                c = cost(s - 1, count)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[s][n]:
                    best[s][n], choice[s][n] = cand, count
    counts, n = [], num_layers
    for s in range(num_stages, 0, -1):
        counts.append(choice[s][n])
        n -= choice[s][n]
    return ranges_from_counts(counts[::-1], num_layers)


def parse_layer_counts(text: str) -> list[int]:
    """'17,16,16,15' → [17, 16, 16, 15], with a clear error for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PartitionError(f"--layers {text!r}: give comma-separated layer counts, e.g. 17,16,16,15") from None
