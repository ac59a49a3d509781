"""The rebalancing planner: plain Python, tested without torch, Ray or gRPC."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from stagecoach.coordinator.planner import Plan, StageSpeed, Workload, plan_split, stage_seconds
from stagecoach.errors import PartitionError

DECODE = Workload(decode_batches=1000, prefill_tokens=0)


def speeds(*factors: float, **kw) -> list[StageSpeed]:
    return [StageSpeed(decode_layer_s=f * 1e-3, prefill_layer_s=f * 1e-5, **kw) for f in factors]


def brute_force(num_layers: int, sp: list[StageSpeed], work: Workload, layer_bytes: int) -> float:
    best = float("inf")
    for cuts in itertools.combinations(range(1, num_layers), len(sp) - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, num_layers), strict=False)]
        if all(
            c * layer_bytes + s.fixed_bytes <= (s.memory_bytes or float("inf"))
            for c, s in zip(counts, sp, strict=False)
        ):
            best = min(best, max(stage_seconds(s, c, work) for s, c in zip(sp, counts, strict=False)))
    return best


def test_the_planner_does_not_import_torch():
    code = "import sys\nimport stagecoach.coordinator.planner\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_slow_stage_gets_fewer_layers():
    plan = plan_split(8, speeds(1, 3, 1, 1), DECODE, layer_bytes=1, current=[2, 2, 2, 2])
    assert plan.counts == [3, 1, 2, 2] or plan.counts == [2, 1, 3, 2] or plan.counts == [2, 1, 2, 3]
    assert max(plan.stage_seconds) == pytest.approx(3.0)  # one slow layer (3 ms × 1000) or three fast ones
    assert plan.gain == pytest.approx(1.0)  # the slow stage took 6 s for two layers
    assert plan.layers_moved == 1  # one layer across one boundary: the fewest moves among the equally fast splits


def test_optimal_against_brute_force_with_uneven_speeds_and_a_mixed_workload():
    work = Workload(decode_batches=300, prefill_tokens=20_000)
    for num_layers, factors in [(9, (1.0, 2.5, 0.7)), (12, (1.3, 1.0, 4.0, 1.1)), (7, (0.5, 0.5))]:
        sp = [StageSpeed(f * 1e-3, g * 1e-5) for f, g in zip(factors, reversed(factors), strict=False)]
        current = [num_layers // len(sp)] * len(sp)
        current[-1] += num_layers - sum(current)
        plan = plan_split(num_layers, sp, work, 1, current)
        assert max(plan.stage_seconds) == pytest.approx(brute_force(num_layers, sp, work, 1))
        assert sum(plan.counts) == num_layers and min(plan.counts) >= 1


def test_fixed_costs_at_the_ends_take_layers_off_the_first_and_last_stages():
    sp = speeds(1, 1, 1, 1)
    sp[0].decode_fixed_s = 1e-3  # embedding: one layer's worth
    sp[-1].decode_fixed_s = 2e-3  # norm, lm_head and sampling: two layers' worth
    plan = plan_split(11, sp, DECODE, 1, [4, 3, 2, 2])
    assert max(plan.current_seconds) == pytest.approx(5.0) and max(plan.stage_seconds) == pytest.approx(4.0)
    assert plan.counts == [3, 4, 2, 2]  # of the splits as fast, the one that moves a single layer


def test_memory_limits_bind_and_are_never_exceeded():
    sp = speeds(3, 1, 1)  # the fast stages would take everything, but stage 1 holds at most 2 layers
    sp[1].memory_bytes, sp[2].memory_bytes, sp[2].fixed_bytes = 200, 500, 200
    plan = plan_split(9, sp, DECODE, layer_bytes=100, current=[3, 3, 3])
    assert plan.counts[1] <= 2 and plan.counts[2] <= 3
    assert plan.counts == [4, 2, 3]
    assert max(plan.stage_seconds) == pytest.approx(brute_force(9, sp, DECODE, 100))


def test_a_stage_too_small_for_any_layer_is_refused_with_the_numbers():
    sp = speeds(1, 1)
    sp[1].memory_bytes, sp[1].fixed_bytes = 150, 100
    with pytest.raises(
        PartitionError,
        match=r"stage 1 cannot hold a single layer: of its 150 bytes, 100 hold fixed weights, and one layer needs 80",
    ):
        plan_split(4, sp, DECODE, layer_bytes=80, current=[2, 2])
    sp[0].memory_bytes = sp[1].memory_bytes = 260
    with pytest.raises(PartitionError, match=r"hold at most \[3, 2\] layers \(5 in all\), but the model has 6"):
        plan_split(6, sp, DECODE, layer_bytes=80, current=[3, 3])


def test_ties_keep_the_current_split():
    sp = speeds(1, 1, 1, 1)
    for current in ([2, 2, 2, 2], [1, 2, 2, 3]):
        plan = plan_split(8, sp, DECODE, 1, current)
        assert plan.counts == [2, 2, 2, 2] and plan.gain == pytest.approx(0 if current == [2, 2, 2, 2] else 0.5)
    # 7 layers on 2 equal stages: [3, 4] and [4, 3] are equally fast; the current one stays.
    assert plan_split(7, speeds(1, 1), DECODE, 1, [4, 3]).counts == [4, 3]
    assert plan_split(7, speeds(1, 1), DECODE, 1, [3, 4]).counts == [3, 4]
    assert plan_split(7, speeds(1, 1), DECODE, 1, [3, 4]).gain == 0


def test_a_bad_current_split_is_refused():
    with pytest.raises(PartitionError, match="does not give 8 layers to 2 stages"):
        plan_split(8, speeds(1, 1), DECODE, 1, [4, 3])
    assert isinstance(plan_split(2, speeds(1, 1), DECODE, 1, [1, 1]), Plan)


def test_the_stages_reported_memory_bounds_the_proposal():
    """The proposal from measured records, within the budgets the stages report (weights per layer plus the KV cache each
    layer keeps at the pipeline's block count), and the refusal reported, not raised, when no split fits."""
    from stagecoach.coordinator.planner import StageMemory, StageRates
    from stagecoach.proto import stagecoach_pb2 as pb
    from stagecoach.proto.microbatch import MicroBatch, SeqChunk
    from stagecoach.proto.types import StageSummary

    rates = StageRates()
    batch = MicroBatch(0, [SeqChunk(seq_id=0, start_pos=5, num_tokens=1)], [7])
    for _ in range(40):  # stage 0 three times slower per layer
        timings = [
            pb.StageTiming(stage_index=i, compute_start_ns=0, compute_end_ns=n * 1_000_000, layers_ns=n * 1_000_000)
            for i, n in enumerate((9, 3, 3))
        ]
        rates.add(batch, timings, [3, 3, 3])
    # Each layer: 100 bytes of weights + 10 blocks x 5 bytes of KV = 150; stage 2 also holds 200 bytes of fixed weights.
    stages = [
        StageSummary(
            i,
            (3 * i, 3 * i + 3),
            weight_bytes=300 + 200 * (i == 2),
            memory_total_bytes=budget,
            kv_block_layer_bytes=5,
            layer_weight_bytes=[100] * 3,
        )
        for i, budget in enumerate((10_000, 10_000, 650))
    ]
    memory = StageMemory.of(stages, num_blocks=10)
    assert (
        memory.layer_bytes == [150] * 9
        and memory.fixed_bytes == [0, 0, 200]
        and memory.budgets == [10_000, 10_000, 650]
    )
    assert rates.propose([3, 3, 3]).counts == [1, 4, 4]  # unbounded
    assert rates.propose([3, 3, 3], memory).counts == [1, 5, 3]  # stage 2 holds (650 - 200) // 150 = 3 layers
    assert StageMemory.of([StageSummary(0, (0, 9))], 10) is None  # the in-process backend reports no sizes
    stages[1].memory_total_bytes = stages[0].memory_total_bytes = 400  # 2 + 2 + 3 layers at most: 9 do not fit
    refused = rates.proposal([3, 3, 3], StageMemory.of(stages, num_blocks=10))
    assert (
        refused["proposed"] == [3, 3, 3]
        and refused["predicted_gain"] == 0.0
        and "hold at most [2, 2, 3] layers" in refused["refused"]
    )


def test_layers_of_different_sizes_bound_each_stage_by_their_own_bytes():
    """Quantized checkpoints mix types per layer: a stage's memory holds the bytes of the layers it is given, so the
    plan avoids giving the small stage the large layers (the stages report each layer's bytes)."""
    from stagecoach.coordinator.planner import StageMemory
    from stagecoach.proto.types import StageSummary

    # Layers 0-3 take 100 bytes each, layers 4-7 take 300 (weights; KV 0). Stage 1 has room for 400 bytes.
    stages = [
        StageSummary(0, (0, 4), weight_bytes=400, memory_total_bytes=10_000, layer_weight_bytes=[100] * 4),
        StageSummary(1, (4, 8), weight_bytes=1200, memory_total_bytes=1300, layer_weight_bytes=[300] * 4),
    ]
    memory = StageMemory.of(stages, num_blocks=10)
    assert memory.layer_bytes == [100] * 4 + [300] * 4 and memory.fixed_bytes == [0, 0]
    sp = speeds(3, 1)  # stage 1 is three times faster and would take 6 layers, but 6 of the large ones do not fit
    for speed, budget, fixed in zip(sp, memory.budgets, memory.fixed_bytes, strict=True):
        speed.memory_bytes, speed.fixed_bytes = budget, fixed
    # Layers 3-7 take 1,300 bytes: they fit; layers 2-7 (1,400) do not, though six of the small ones would.
    assert plan_split(8, sp, DECODE, memory.layer_bytes, [4, 4]).counts == [3, 5]
    sp[1].memory_bytes = 1400
    assert plan_split(8, sp, DECODE, memory.layer_bytes, [4, 4]).counts == [2, 6]
    sp[1].memory_bytes = 250  # no layer from 4 on fits stage 1: the last layer cannot be placed
    with pytest.raises(PartitionError, match="no contiguous split of the 8 layers"):
        plan_split(8, sp, DECODE, memory.layer_bytes, [4, 4])
