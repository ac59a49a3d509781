"""Splits a model's decoder layers into contiguous per-stage ranges: a pure function, balanced by time."""

from __future__ import annotations

from stagecoach.coordinator.planner import StageSpeed, Workload, plan_split
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
    num_layers: int, num_stages: int, last_stage_extra: float = 0.0, layer_counts: list[int] | None = None
) -> list[LayerRange]:
    """Contiguous layer ranges, one per stage.

    Costs are in units of one decoder layer's time: the last stage also pays `last_stage_extra`
    (its lm_head; 1.6 layers for Qwen1.5-32B). The default split
    minimises the slowest stage's cost and, among those, the spread (sum of squared costs).
    `layer_counts` overrides it.
    """
    if num_layers < 1:
        raise PartitionError(f"the model has {num_layers} layers; nothing to partition")
    if layer_counts is not None:
        if num_stages and len(layer_counts) != num_stages:
            raise PartitionError(
                f"{num_stages} stages asked for but the layer split {layer_counts} has {len(layer_counts)} entries"
            )
        return ranges_from_counts(layer_counts, num_layers)
    if num_stages < 1:
        raise PartitionError(f"the number of stages must be at least 1, got {num_stages}")
    if num_stages > num_layers:
        raise PartitionError(f"{num_stages} stages cannot share {num_layers} layers: use at most {num_layers} stages")

    # The rebalancing planner with every layer costing 1 and the ends' extras as fixed costs: the slowest
    # stage's cost as low as it goes, then the most even split.
    speeds = [
        StageSpeed(
            decode_layer_s=1.0, prefill_layer_s=0.0, decode_fixed_s=last_stage_extra if i == num_stages - 1 else 0.0
        )
        for i in range(num_stages)
    ]
    return ranges_from_counts(
        plan_split(num_layers, speeds, Workload(decode_batches=1, prefill_tokens=0), layer_bytes=1).counts, num_layers
    )
