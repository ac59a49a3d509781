"""The `speculative:` section of the cluster config (its settings are the coordinator's speculation policy,
coordinator/speculative.py)."""

from __future__ import annotations

from dataclasses import dataclass

from stagecoach.cluster.config_mapping import choose, setting
from stagecoach.errors import ConfigError

SPECULATIVE_METHODS = ("ngram", "off")


@dataclass(slots=True)
class SpeculativeSection:
    """Speculative decoding: draft tokens verified several at a time in one pass (coordinator/speculative.py)."""

    method: str = setting(
        "off",
        "ngram: drafts from the sequence's own earlier tokens (prompt lookup); off: one token per pass",
        "--speculative-method",
        SPECULATIVE_METHODS,
    )
    num_tokens: int = setting(4, "draft tokens verified per pass at most", "--speculative-num-tokens")
    min_match: int = setting(1, "shortest suffix of a sequence looked up among its earlier tokens")
    max_match: int = setting(3, "longest suffix looked up (the longest found proposes)")
    min_acceptance: float = setting(
        0.3,
        "a sequence whose recent drafts are accepted less than this decodes plainly for backoff_steps tokens",
        "--speculative-min-acceptance",
    )
    backoff_steps: int = setting(16, "tokens a sequence decodes plainly after its acceptance fell below the minimum")
    max_running: int = setting(
        8,
        "speculate only while at most this many sequences run (under load a verify pass's extra rows cost more "
        "than they save)",
        "--speculative-max-running",
    )
    cost_model: bool = setting(
        True,
        "verify a sequence's drafts only where they are expected to raise the microbatch's tokens per second and slow "
        "the sequences beside them by at most 5 %, by each pass's measured time per row count and the sequence's "
        "acceptance (false: whenever the limits above allow)",
        "--speculative-cost-model",
    )

    def __post_init__(self) -> None:
        choose("speculative.method", self.method, SPECULATIVE_METHODS)
        if self.num_tokens < 1 or self.backoff_steps < 0 or self.max_running < 1:
            raise ConfigError(
                "speculative: num_tokens and max_running must be at least 1 and backoff_steps at least 0, got "
                f"{self.num_tokens}, {self.max_running}, {self.backoff_steps}"
            )
        if not 1 <= self.min_match <= self.max_match:
            raise ConfigError(
                f"speculative: needs 1 <= min_match <= max_match, got min_match {self.min_match}, "
                f"max_match {self.max_match}"
            )
        if not 0 <= self.min_acceptance <= 1:
            raise ConfigError(f"speculative.min_acceptance must be in [0, 1], got {self.min_acceptance}")
