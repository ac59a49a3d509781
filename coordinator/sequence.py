"""A request's sequence as the coordinator tracks it (tokens, progress through the pipeline, KV blocks), and the updates
its listener gets."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from stagecoach.errors import StagecoachError
from stagecoach.proto.types import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(
        default_factory=list
    )  # content keys of the table's full blocks (block_manager.commit)
    num_cached_tokens: int | None = None  # prompt tokens its first admission found cached (None: not admitted yet)
    num_scheduled_tokens: int = 0  # tokens sent into the pipeline (their K/V will be written)
    num_computed_tokens: int = 0  # tokens whose microbatch has come back
    is_awaiting_sample: bool = False  # a chunk that samples is in flight: wait for its token
    num_blocks_sent: int = 0  # blocks of block_table the stages already hold
    num_history_sent: int = 0  # tokens the last stage holds in the sequence's history
    num_preemptions: int = 0
    num_failures: int = 0  # failed microbatches since its last token: above 0, it runs in microbatches of its own
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without joining the two (a decode step's costs nothing per token of context)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_in_flight(self) -> bool:
        return self.num_scheduled_tokens > self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(slots=True)
class TokenUpdate:
    """New tokens of one sequence since the last update; finished=True carries its finish reason."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    finished: bool = False
    finish_reason: str | None = None
    error: StagecoachError | None = None  # the request cannot finish (mapped to a status by errors.ERROR_TABLE)
    # prompt tokens found in the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0


Listener = Callable[[TokenUpdate], None]
