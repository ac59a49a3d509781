"""What a stage is asked to do: a microbatch of sequence chunks with their cache addresses. Plain Python, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stagecoach.errors import RequestError


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling; HF semantics for temperature/top-k/top-p/repetition penalty, OpenAI for the others."""

    temperature: float = 1.0  # 0 means greedy (penalties still apply)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 or -1: no top-k filter
    repetition_penalty: float = 1.0  # HF: divides positive / multiplies negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    seed: int | None = None  # the coordinator fills one in when the request gives none
    max_tokens: int = 16  # new tokens to generate at most
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: also the top n

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, rule: str) -> RequestError:
            return RequestError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", ">= 0 (0 means greedy)")
        if not (0 < self.top_p <= 1):
            raise bad("top_p", "in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "-1, 0 (both: off) or a positive count")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "> 0 (1 is off)")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "in [-2, 2]")
        if self.max_tokens < 1:
            raise bad("max_tokens", ">= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "between 0 and 20")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "in [0, 2**63)")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class SeqChunk:
    """One sequence's part of a microbatch: tokens [start_pos, start_pos + num_tokens)."""

    seq_id: int
    start_pos: int
    num_tokens: int
    slot_mapping: list[int]  # cache slot of each of the num_tokens tokens
    block_table: list[int]  # blocks holding positions 0 .. start_pos + num_tokens - 1
    do_sample: bool = False  # the chunk ends the known tokens: sample the next one
    sampling: SamplingParams | None = None
    # Sent with a sequence's first chunk (and again after a re-prefill): every token so far,
    # so the last stage can apply penalties. The first num_prompt_tokens are the prompt.
    token_history: list[int] | None = None
    num_prompt_tokens: int = 0


@dataclass(slots=True)
class MicroBatch:
    batch_id: int
    seqs: list[SeqChunk]
    token_ids: list[int]  # stage 0's input: the chunks' tokens, concatenated in seqs order
    finished_seq_ids: list[int] = field(default_factory=list)  # the last stage may forget these
    want_all_logits: bool = False  # tests: return logits for every row, not only sampled ones

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


@dataclass(slots=True)
class SampleResult:
    seq_id: int
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
