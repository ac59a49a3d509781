"""Layer partitioning: balanced by time, explicit overrides, clear refusals."""

from __future__ import annotations

import pytest

from stagecoach.cluster.partition import partition_layers, ranges_from_counts
from stagecoach.errors import PartitionError


def counts(ranges):
    return [e - s for s, e in ranges]


def test_ranges_are_contiguous_and_cover_all_layers():
    for layers in (1, 5, 24, 64):
        for stages in range(1, min(layers, 8) + 1):
            r = partition_layers(layers, stages, last_stage_extra=1.6)
            assert r[0][0] == 0 and r[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(r, r[1:], strict=False))
            assert all(e > s for s, e in r)


def test_qwen_32b_four_stages_gives_the_last_stage_fewer_layers():
    # lm_head is 0.78 B parameters against 0.4837 B per layer: about 1.6 layers of extra work.
    r = partition_layers(64, 4, last_stage_extra=778_567_680 / 483_665_920)
    assert counts(r)[-1] == 15 and sum(counts(r)) == 64
    assert max(counts(r)) == 17  # the slowest stage costs 17 layers, the best possible


def test_even_without_extra_costs():
    assert counts(partition_layers(64, 4)) == [16, 16, 16, 16]
    assert counts(partition_layers(5, 2)) in ([3, 2], [2, 3])


def test_balance_is_optimal_against_brute_force():
    import itertools

    for layers, stages, extra in [(7, 3, 1.5), (10, 4, 2.0), (9, 2, 0.6)]:
        best = min(
            max(c + (extra if i == stages - 1 else 0) for i, c in enumerate(split))
            for split in itertools.product(range(1, layers + 1), repeat=stages)
            if sum(split) == layers
        )
        got = counts(partition_layers(layers, stages, last_stage_extra=extra))
        assert max(c + (extra if i == stages - 1 else 0) for i, c in enumerate(got)) == best


def test_override():
    assert partition_layers(64, 4, layer_counts=[17, 16, 16, 15]) == [(0, 17), (17, 33), (33, 49), (49, 64)]
    assert ranges_from_counts([3, 1, 1], 5) == [(0, 3), (3, 4), (4, 5)]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ranges_from_counts([3, 1], 5), "sums to 4 but the model has 5 layers"),
        (lambda: ranges_from_counts([5, 0], 5), "at least one layer"),
        (lambda: partition_layers(4, 5), "5 stages cannot share 4 layers"),
        (lambda: partition_layers(4, 0), "at least 1"),
        (lambda: partition_layers(5, 2, layer_counts=[2, 2, 1]), "has 3 entries"),
    ],
)
def test_impossible_plans_are_refused(call, message):
    with pytest.raises(PartitionError, match=message):
        call()
