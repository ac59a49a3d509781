"""Draft tokens for speculative decoding, proposed without a model: prompt lookup (n-gram).

For each decoding sequence the proposer looks for the longest recent suffix of its tokens (between `min_match` and
`max_match` long) that occurred earlier in its prompt + output, and proposes the up to `num_tokens` tokens that
followed that earlier occurrence (its latest one). An answer that repeats its input (code edits, quoting, summaries
with names) is proposed well; anything else proposes nothing and decodes as it would without speculation.

Cost: each sequence keeps an index from every n-gram it holds (n in min_match..max_match) to where that n-gram last
ended. A new token adds max_match − min_match + 1 entries and a proposal looks up as many suffixes, so both are
O(1) per token, never a scan of the context. Plain Python, no torch.

`Proposer` is the interface the engine asks; a draft model (say Qwen1.5-0.5B, which shares the 32B's tokenizer)
would be another implementation, running ahead of the pipeline on the coordinator's side.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Tokens = Callable[[int, int], list[int]]  # tokens(start, end): positions [start, end) of a sequence's prompt + output
COST_SMOOTHING = 0.2  # weight of a pass's time in its row count's moving average
NEIGHBOUR_SLOWDOWN = 0.05  # drafts may cost the sequences beside them at most this share of their tokens per second
EXPLORE_EVERY = 32  # of this many sequences declined in a row, the last one's drafts go through (figures stay current)


class Proposer(Protocol):
    """Proposes draft tokens for a sequence from its tokens so far."""

    def propose(self, seq_id: int, tokens: Tokens, length: int, max_tokens: int) -> list[int]: ...

    def forget(self, seq_id: int) -> None: ...


class NgramIndex:
    """One sequence's n-gram index: each n-gram (n in [min_match, max_match]) → the position right after its latest
    occurrence that has a token after it (so a lookup never finds the suffix it is looking up)."""

    __slots__ = ("min_match", "max_match", "ends", "length")

    def __init__(self, min_match: int, max_match: int) -> None:
        self.min_match, self.max_match = min_match, max_match
        self.ends: dict[tuple[int, ...], int] = {}
        self.length = 0  # tokens seen: every n-gram ending (exclusive) at a position below length is in `ends`

    def extend(self, tokens: Tokens, length: int) -> None:
        """Indexes the n-grams the tokens since the last call complete (reading only those and max_match before)."""
        first = max(self.length, 1)
        if first < length:
            base = max(first - self.max_match, 0)
            window = tokens(base, length)
            for end in range(first, length):  # the n-grams ending at `end` (exclusive) are followed by tokens[end]
                for n in range(self.min_match, min(self.max_match, end) + 1):
                    self.ends[tuple(window[end - n - base : end - base])] = end
        self.length = max(self.length, length)

    def propose(self, tokens: Tokens, length: int, num_tokens: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest suffix found (at most num_tokens of
        them; none without a match)."""
        self.extend(tokens, length)
        suffix = tokens(max(length - self.max_match, 0), length)
        for n in range(min(self.max_match, length - 1), self.min_match - 1, -1):
            end = self.ends.get(tuple(suffix[len(suffix) - n :]))
            if end is not None:
                return tokens(end, min(end + num_tokens, length))
        return []


class NgramProposer:
    """Prompt lookup over every sequence's own tokens (the module's docstring)."""

    def __init__(self, num_tokens: int, min_match: int, max_match: int) -> None:
        self.num_tokens, self.min_match, self.max_match = num_tokens, min_match, max_match
        self._index: dict[int, NgramIndex] = {}

    def propose(self, seq_id: int, tokens: Tokens, length: int, max_tokens: int) -> list[int]:
        index = self._index.get(seq_id)
        if index is None:
            index = self._index[seq_id] = NgramIndex(self.min_match, self.max_match)
        return index.propose(tokens, length, min(self.num_tokens, max_tokens)) if max_tokens > 0 else []

    def forget(self, seq_id: int) -> None:
        self._index.pop(seq_id, None)


class PassCost:
    """Each pass's compute time (its stages' compute added up) by its rows: a moving average per row count, plain decode
    passes (one row per sequence; they may run compiled) apart from passes holding longer chunks (verify or prefill,
    run eagerly). A row count's first pass is dropped (warm-up): a row count counts from its second."""

    def __init__(self) -> None:
        self._seconds: dict[bool, dict[int, list]] = {True: {}, False: {}}  # plain → rows → [seconds, passes]
        self._known: dict[bool, list[int]] = {True: [], False: []}  # row counts with a trusted figure, sorted

    def observe(self, rows: int, plain: bool, seconds: float) -> None:
        entry = self._seconds[plain].setdefault(rows, [seconds, 0])
        entry[1] += 1
        if entry[1] == 2:
            entry[0] = seconds
            bisect.insort(self._known[plain], rows)
        elif entry[1] > 2:
            entry[0] += COST_SMOOTHING * (seconds - entry[0])

    def estimate(self, rows: float, plain: bool) -> float | None:
        """Seconds a pass of `rows` rows takes: measured, or linear between the nearest measured row counts on either
        side; None where it has no figure on one side (unknown: the caller tries it, and it is measured)."""
        known, seconds = self._known[plain], self._seconds[plain]
        i = bisect.bisect_left(known, rows)
        if i < len(known) and known[i] == rows:
            return seconds[rows][0]
        if i == 0 or i == len(known):
            return None
        lo, hi = known[i - 1], known[i]
        w = (rows - lo) / (hi - lo)
        return seconds[lo][0] * (1 - w) + seconds[hi][0] * w


@dataclass(slots=True)
class PassPlan:
    """The microbatch being scheduled, as the cost model sees it."""

    rows: float  # rows it holds (the rows without drafts, then each verify chunk's drafts as they are added)
    tokens: float  # tokens it is expected to emit
    plain: bool  # one-token decode chunks only so far (a plain pass, which may run compiled)
    seqs: int  # sequences it holds
    proposals: dict[int, list[int]]  # seq_id → the drafts proposed for it this step (made once, here)
    min_gain: float  # of its sequences, the fewest tokens one expects from the pass (1: one without drafts)
    plain_seconds: float | None  # its time without drafts (None: not measured)


class Speculation:
    """When the scheduler verifies drafts and how it did: the proposer, the policy, the counts.

    Policy (the config's `speculative:` section), per sequence and per pass:
    - a sequence speculates while at most `max_running` sequences run, and while its recent acceptance (the share of
      its drafts accepted, a moving average over its last verify passes) is at least `min_acceptance`; a sequence
      below it decodes plainly for `backoff_steps` steps, then tries again;
    - with `cost_model` on, a sequence's drafts join a microbatch only where they are expected to raise its tokens per
      second: the pass's time comes from `PassCost` (each returned pass's compute time by its rows), the tokens from
      the sequence's acceptance (drafts × acceptance). Of its drafts it verifies the count (maybe none) that gives the
      microbatch the most tokens per second, and never so many that a sequence sharing the pass loses more than
      NEIGHBOUR_SLOWDOWN of its tokens per second (one without drafts gets nothing from the extra rows: the pass may
      grow by 5 % at most; in a batch of requests it is the one that sets when the batch ends); a row count not
      measured yet is tried, and of EXPLORE_EVERY sequences it would decline in a row the last is let through, so the
      figures stay current. A verify pass costs about one decode step where the products read weights (float32 at one
      request) and far more where they are compute-bound (many rows, or quantized weights on a CPU): this is where the
      policy tells the two apart.
    """

    def __init__(self, config) -> None:  # cluster.config_speculative.SpeculativeSection (or the same fields)
        self.config = config
        self.proposer: Proposer = NgramProposer(config.num_tokens, config.min_match, config.max_match)
        self.cost = PassCost()
        self._acceptance: dict[int, float] = {}  # seq_id → moving average of its drafts' acceptance
        self._resume_at: dict[int, int] = {}  # seq_id → the output length at which it speculates again
        self.passes = self.proposed = self.accepted = self.emitted = 0
        self.declined = self._declined_in_a_row = 0  # sequences whose drafts the cost model declined: all, and lately

    def plan(self, rows: int, seqs: int, plain: bool, proposals: dict[int, list[int]]) -> PassPlan:
        """The cost model's view of a microbatch about to be scheduled: its rows and sequences without drafts, and the
        drafts proposed for those that have some."""
        rows, seqs = max(rows, 1), max(seqs, 1)
        gains = [1 + len(d) * self._rate(seq_id) for seq_id, d in proposals.items()] + [1.0] * (seqs - len(proposals))
        plain_seconds = self.cost.estimate(rows, plain)
        return PassPlan(rows, seqs, plain, seqs, proposals, min(gains), plain_seconds)

    def _rate(self, seq_id: int) -> float:
        """The share of a sequence's drafts expected to be accepted: its recent acceptance, else everyone's so far."""
        return self._acceptance.get(seq_id, self.accepted / self.proposed if self.proposed else 1.0)

    def drafts(self, seq, budget: int, num_running: int, max_model_len: int, plan: PassPlan | None = None) -> list[int]:
        """Draft tokens for seq's next step (a decode step), or [] to decode plainly. At most budget - 1, and never
        more than its remaining max_tokens or max_model_len leave room for (the pass emits up to one more); with a
        plan (cost_model on), of the drafts proposed when it was made, as many as pay for their rows."""
        c = self.config
        if num_running > c.max_running or len(seq.output_token_ids) < self._resume_at.get(seq.seq_id, 0):
            return []
        room = min(
            budget - 1,
            seq.sampling.max_tokens - len(seq.output_token_ids) - 1,
            max_model_len - seq.num_tokens - 1,
        )
        if room <= 0:
            return []
        if plan is None:
            return self.proposer.propose(seq.seq_id, seq.tokens, seq.num_tokens, room)
        drafts = plan.proposals.get(seq.seq_id, [])[:room]
        return drafts[: self._worth(plan, seq.seq_id, len(drafts))] if drafts else []

    def _worth(self, plan: PassPlan, seq_id: int, num_drafts: int) -> int:
        """How many of a sequence's drafts to verify in the planned microbatch (the class's docstring); updates plan."""
        rate = self._rate(seq_id)
        base = self.cost.estimate(plan.rows, plan.plain)
        # beside other sequences, no sequence's tokens per second may drop by more than NEIGHBOUR_SLOWDOWN: the pass
        # may grow to min_gain times its time without drafts, and that much more (one without drafts: 5 % at most)
        limit = None
        if plan.seqs > 1 and plan.plain_seconds:
            limit = plan.plain_seconds * plan.min_gain * (1 + NEIGHBOUR_SLOWDOWN)
        best, best_speed = 0, plan.tokens / base if base else 0.0
        for d in range(1, num_drafts + 1):
            seconds = self.cost.estimate(plan.rows + d, False)
            if base is None or seconds is None:  # not measured yet: try it
                best = num_drafts
                break
            if limit is not None and seconds > limit:
                break
            if (speed := (plan.tokens + rate * d) / seconds) > best_speed:
                best, best_speed = d, speed
        if best == 0:
            self._declined_in_a_row += 1
            if self._declined_in_a_row < EXPLORE_EVERY:
                self.declined += 1
                return 0
            best = num_drafts
        self._declined_in_a_row = 0
        plan.rows, plan.tokens, plan.plain = plan.rows + best, plan.tokens + rate * best, False
        return best

    def observe(self, batch, timings) -> None:
        """A microbatch came back (proto.microbatch.MicroBatch, its stages' timing records): the cost model learns its
        compute time, the stages' added up, at its row count."""
        compute_ns = sum(t.compute_end_ns - t.compute_start_ns for t in timings)
        if compute_ns > 0:
            self.cost.observe(len(batch.token_ids), batch.is_decode_only, compute_ns / 1e9)

    def record(self, seq_id: int, num_drafts: int, num_emitted: int, output_len: int) -> None:
        """A verify pass came back: num_emitted tokens (the accepted drafts and one more)."""
        accepted = num_emitted - 1
        self.passes += 1
        self.proposed += num_drafts
        self.accepted += accepted
        self.emitted += num_emitted
        rate = 0.5 * self._acceptance.get(seq_id, 1.0) + 0.5 * accepted / num_drafts
        self._acceptance[seq_id] = rate
        if rate < self.config.min_acceptance:
            self._resume_at[seq_id] = output_len + self.config.backoff_steps
            self._acceptance[seq_id] = self.config.min_acceptance  # on resuming, one bad pass backs off again

    def forget(self, seq_id: int) -> None:
        self.proposer.forget(seq_id)
        self._acceptance.pop(seq_id, None)
        self._resume_at.pop(seq_id, None)

    def stats(self) -> dict:
        """/v1/stats' `engine.speculative` object (docs/stats.md)."""
        return {
            "method": self.config.method,
            "verify_passes": self.passes,
            "draft_tokens": self.proposed,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.accepted / self.proposed, 4) if self.proposed else 0.0,
            "tokens_per_pass": round(self.emitted / self.passes, 3) if self.passes else 0.0,
            "declined_by_cost": self.declined,
        }

    @staticmethod
    def stats_off() -> dict:
        """The same object where speculation is off."""
        counts = dict.fromkeys(("verify_passes", "draft_tokens", "accepted_tokens"), 0)
        return {"method": "off"} | counts | {"acceptance_rate": 0.0, "tokens_per_pass": 0.0, "declined_by_cost": 0}
