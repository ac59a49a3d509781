"""The microbatch contract: what a sequence's chunk can be, what the drop list means, and what each stage does with each.

The scheduler picks each chunk's kind (`ChunkKind.of`), the codec carries it, and every stage checks each chunk it
admits against its kind (`check_chunk`, from its sequence table, in-process or over the wire) before its sequence table
and sampler act on it. Plain Python, no torch. What each stage does, per microbatch:

1. **Drops first.** `drop_seq_ids` (finished, aborted or preempted since the previous microbatch): every stage forgets
   them, its block table and (the last stage) its sampling state, before this microbatch's chunks.
2. **Then each chunk, by kind** (rows in chunk order; `start_pos` is where the chunk's tokens go):
   - `FIRST` starts (or restarts) the sequence on every stage: at 0, or after a cached prefix of whole blocks whose
     K/V the stages hold already, listed first in `new_blocks`. It brings the sampling parameters and the prompt's
     length; its `token_ids` are the whole history so far, which the last stage keeps (for penalties).
   - `PREFILL` continues the sequence exactly where each stage's copy ends; its `token_ids` are its own tokens.
   - `DECODE` is one token, the one the last stage sampled and kept itself: no `token_ids`.
   - `VERIFY` (speculative decoding): the sequence's newest token (sampled and kept by the last stage, as a `DECODE`
     brings it) and after it the draft tokens in `token_ids`. The last stage samples every row with the draw it would
     have used one token at a time and returns the drafts it accepts and one more token (coordinator/speculative.py).
     The sequence's next chunk starts after the accepted ones: on every stage the positions after it are void (their
     K/V is overwritten later) and its block table keeps only the blocks that cover it.
   Every stage writes the chunk's K/V into its blocks; stage 0 embeds its token ids; the last stage samples the
   next token of each chunk with `do_sample`.
3. **Scored rows** (`score_rows`, reserved for prompt log-probabilities): the last stage computes every row's logits,
   not only the sampled one's. In-process runs return them (`StageOutput.logits`); the wire refuses the request until
   deliveries carry row scores.

A kind or request a stage does not serve is refused naming its field, so a new kind needs no new schema version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from stagecoach.errors import RequestError
from stagecoach.proto.types import SamplingParams


class ChunkKind(IntEnum):
    """A chunk's kind; the values are the wire's (stagecoach.proto's ChunkKind)."""

    FIRST = 1
    PREFILL = 2
    DECODE = 3
    VERIFY = 4

    @classmethod
    def of(cls, first: bool, num_tokens: int, num_history: int) -> ChunkKind:
        """The kind of a sequence's next chunk: its first (since it last started), else one token whose history the
        last stage holds already (a decode step), else a prefill."""
        if first:
            return cls.FIRST
        return cls.DECODE if num_tokens == 1 and num_history == 0 else cls.PREFILL


SERVED_KINDS = frozenset({ChunkKind.FIRST, ChunkKind.PREFILL, ChunkKind.DECODE, ChunkKind.VERIFY})


@dataclass(slots=True)
class SeqChunk:
    """One sequence's part of a microbatch: tokens [start_pos, start_pos + num_tokens), and only what it adds.

    kind None: the kind the fields imply (a first chunk starts at 0, or brings sampling parameters and a prompt length;
    one token and no history is a decode step).
    """

    seq_id: int
    start_pos: int
    num_tokens: int
    new_blocks: list[int] = field(default_factory=list)  # appended to the sequence's block table
    do_sample: bool = False  # the chunk ends the known tokens: sample the next one
    sampling: SamplingParams | None = None  # a first chunk's
    num_prompt_tokens: int = 0  # a first chunk: the first num_prompt_tokens tokens are the prompt
    token_ids: list[int] = field(default_factory=list)  # what the last stage's history lacks (see the module)
    kind: ChunkKind | None = None
    score_rows: bool = False  # the last stage returns every row's logits (in-process only, today)

    def __post_init__(self) -> None:
        if self.kind is None:
            first = self.start_pos == 0 or (self.sampling is not None and self.num_prompt_tokens > 0)
            self.kind = ChunkKind.of(first, self.num_tokens, len(self.token_ids))

    @property
    def is_first(self) -> bool:
        return self.kind is ChunkKind.FIRST

    @property
    def sampled_rows(self) -> int:
        """The rows a sampling chunk's last stage draws, its last ones: every position of a VERIFY chunk, else one."""
        return self.num_tokens if self.kind is ChunkKind.VERIFY else 1


@dataclass(slots=True)
class MicroBatch:
    batch_id: int
    seqs: list[SeqChunk]
    token_ids: list[int]  # stage 0's input: the chunks' tokens, concatenated in seqs order
    # finished, aborted or preempted: every stage forgets them first
    drop_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_decode_only(self) -> bool:
        """Every chunk one token (plain decode steps): the microbatch a compiled decode step can run."""
        return bool(self.seqs) and all(c.num_tokens == 1 for c in self.seqs)


def check_chunk(chunk: SeqChunk, i: int) -> None:
    """Raises RequestError naming the field of seqs[i] that its kind forbids; what the stage holds is checked by the
    stage (stage/sequences.py)."""
    kind = chunk.kind
    if kind not in SERVED_KINDS:
        name = kind.name if isinstance(kind, ChunkKind) else kind
        raise RequestError(
            f"seqs[{i}].kind {name} is not served by this stage (it serves FIRST, PREFILL, DECODE and VERIFY)"
        )
    if kind is ChunkKind.FIRST:
        if chunk.sampling is None:
            raise RequestError(
                f"seqs[{i}].sampling is missing: a sequence's first chunk brings its sampling parameters"
            )
        most = chunk.start_pos + chunk.num_tokens
    else:
        if chunk.start_pos == 0:
            raise RequestError(f"seqs[{i}].kind {kind.name} at start_pos 0: a sequence starts with a FIRST chunk")
        if chunk.sampling is not None or chunk.num_prompt_tokens:
            raise RequestError(f"seqs[{i}].sampling: only a FIRST chunk brings sampling parameters and a prompt length")
        most = {ChunkKind.DECODE: 0, ChunkKind.VERIFY: chunk.num_tokens - 1}.get(kind, chunk.num_tokens)
        if kind is ChunkKind.DECODE and chunk.num_tokens != 1:
            raise RequestError(f"seqs[{i}].num_tokens {chunk.num_tokens}: a DECODE chunk is one token")
        if kind is ChunkKind.VERIFY and (len(chunk.token_ids) != most or most < 1 or not chunk.do_sample):
            raise RequestError(
                f"seqs[{i}].token_ids: a VERIFY chunk of {chunk.num_tokens} tokens brings its {most} drafts "
                f"(got {len(chunk.token_ids)}) and samples"
            )
    if len(chunk.token_ids) > most:
        raise RequestError(
            f"seqs[{i}].token_ids has {len(chunk.token_ids)} tokens for a {kind.name} chunk of {chunk.num_tokens} "
            f"at {chunk.start_pos}"
        )
