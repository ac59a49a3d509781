"""A stage's share of the config's `testing:` section: deliberate misbehaviour for tests and benchmarks. In production a
stage has none (`StagePlan.testing` is None), and each place that could misbehave checks that once and goes on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StageTesting:
    delay_ms: float = 0.0  # extra time added to every forward (testing.stage_delay_ms: a deliberately slow stage)
    layer_delay_ms: float = 0.0  # each decoder layer waits this long per microbatch (testing.layer_delay_ms)
    slowdown: float = 1.0  # compute takes this factor times its measured time (testing.stage_slowdown)
    # Raise on a microbatch holding a first prefill chunk of this many tokens from position 0 (testing.poison).
    poison_prefill_tokens: int | None = None
    crash_in_rebalance: bool = False  # the process exits while changing its layers (testing.rebalance_crash_stage)

    @property
    def is_idle(self) -> bool:
        """Nothing set: a stage behaves as without it."""
        return self == StageTesting()
