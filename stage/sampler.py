"""The last stage's sampler: penalties, temperature, top-k, top-p, seeded draws and logprobs, for the whole batch at once.

Semantics: repetition penalty, temperature, top-k and top-p as HF's logits processors (in HF's
order); presence and frequency penalties as OpenAI's (over generated tokens only). A draw depends
only on (seed, position, logits): its one uniform number is a counter-based hash of (seed, position),
turned into a token by inverse CDF over the row's surviving tokens in token-id order, and nothing a
row computes depends on the other rows. So what else shares the batch, or a re-prefill after a fault,
never changes the token.

How: the sampler kernel (sampler_kernel.py) reads each row of logits once and returns what the row
needs of the whole vocabulary (log-sum-exp, top raw values, top penalised values, the row's mass or a
whole-vocabulary draw); top-k and top-p then work on a few candidates per row. A row whose candidates
cannot decide (top-k of 256 or more, a tie at the k-th value, a nucleus wider than the candidates) and
every row where the kernel is absent (no compiler, other devices) takes the whole-row path: torch's
operators over [rows, vocab], HF's processors exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stagecoach.errors import RequestError
from stagecoach.proto.microbatch import ChunkKind, SeqChunk
from stagecoach.proto.types import SampleResult, SamplingParams
from stagecoach.stage import sampler_kernel
from stagecoach.stage.logits_processors import apply_penalties, draw, from_candidates, whole_rows

MAX_CANDIDATES = 256  # top-k below this (one more candidate for the tie check), and top-p's candidates
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) over the seed space
_M64 = (1 << 64) - 1


def draw_uniform(seed: int, position: int) -> float:
    """The draw's uniform number in [0, 1): splitmix64 of (seed, position), 53 bits."""
    z = (seed * _MIX + position + _MIX) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


class _Seen:
    """One sequence's distinct tokens (repetition penalty) and how often each was generated (presence/frequency).

    numpy arrays under torch views: a sampled token is two element writes from Python, not two tensor operations.
    """

    __slots__ = ("num_prompt", "length", "slot", "_ids", "_counts", "ids", "counts")

    def __init__(self, num_prompt: int) -> None:
        self.num_prompt = num_prompt  # the first num_prompt tokens are the prompt, the rest generated
        self.length = 0
        self.slot: dict[int, int] = {}  # token id -> its index in ids / counts
        self._grow(64)

    def _grow(self, size: int) -> None:
        n = len(self.slot)
        ids, counts = np.empty(size, np.int64), np.zeros(size, np.float32)
        if n:
            ids[:n], counts[:n] = self._ids[:n], self._counts[:n]
        self._ids, self._counts = ids, counts
        self.ids, self.counts = torch.from_numpy(ids), torch.from_numpy(counts)

    def extend(self, tokens: list[int]) -> None:
        slot, ids, counts = self.slot, self._ids, self._counts
        if len(slot) + len(tokens) > len(ids):
            self._grow(max(2 * len(ids), len(slot) + len(tokens)))
            ids, counts = self._ids, self._counts
        first_generated = self.num_prompt - self.length  # tokens[first_generated:] are generated
        for i, token in enumerate(tokens):
            s = slot.get(token)
            if s is None:
                s = slot[token] = len(slot)
                ids[s] = token
            if i >= first_generated:
                counts[s] += 1
        self.length += len(tokens)

    def fork(self, more: list[int]) -> _Seen:
        """A copy with `more` tokens added (a verify row's drafts before it); this one is left as it is."""
        fork = _Seen(self.num_prompt)
        fork.slot, fork.length = dict(self.slot), self.length
        fork._ids, fork._counts = self._ids.copy(), self._counts.copy()
        fork.ids, fork.counts = torch.from_numpy(fork._ids), torch.from_numpy(fork._counts)
        fork.extend(more)
        return fork

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.slot)
        return self.ids[:n], self.counts[:n]


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def process_logits(
    logits: torch.Tensor, params: SamplingParams, history: list[int], num_prompt_tokens: int
) -> torch.Tensor:
    """One row's logits [V] after penalties and, unless greedy, temperature, top-k and top-p: the whole-row path."""
    x = logits.float()[None].clone()
    if has_penalties(params) and history:
        seen = _Seen(num_prompt_tokens)
        seen.extend(history)
        apply_penalties(x, [0], [seen], [params])
    return whole_rows(x, [params])[0]


class Sampler:
    """Keeps each live sequence's sampling parameters and, where it has penalties, its seen tokens; turns logits into tokens.

    A sequence's first chunk brings its parameters and its history so far; later chunks
    bring the tokens the history lacks (prefill chunks); sampled tokens are appended here.
    """

    def __init__(self) -> None:
        self._params: dict[int, SamplingParams] = {}
        self._seen: dict[int, _Seen] = {}

    def observe(self, chunk: SeqChunk) -> None:
        """Records what a chunk adds to its sequence's history (a first chunk starts it anew)."""
        if chunk.is_first:  # its token_ids: the whole history so far, a cached prompt prefix included
            assert chunk.sampling is not None, "a first chunk brings its sampling parameters (check_chunk)"
            params = self._params[chunk.seq_id] = chunk.sampling
            self._seen.pop(chunk.seq_id, None)
            if has_penalties(params):
                self._seen_of(chunk.seq_id, chunk.num_prompt_tokens).extend(chunk.token_ids)
        elif chunk.token_ids and chunk.seq_id in self._seen and chunk.kind is not ChunkKind.VERIFY:
            self._seen[chunk.seq_id].extend(chunk.token_ids)  # (a verify chunk's drafts join only once accepted)

    def _seen_of(self, seq_id: int, num_prompt: int = 0) -> _Seen:
        seen = self._seen.get(seq_id)
        if seen is None:
            seen = self._seen[seq_id] = _Seen(num_prompt)
        return seen

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._params.pop(seq_id, None)
            self._seen.pop(seq_id, None)

    def forget_all(self) -> None:
        self._params.clear()
        self._seen.clear()

    @property
    def num_sequences(self) -> int:
        return len(self._params)

    def sample(self, logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleResult]:
        """logits: one row per sampling chunk, in order; a VERIFY chunk has one per position, its newest token's and
        each draft's. Each row is drawn as decoding one token at a time would draw it: the draw of the position it
        predicts, penalties over the history with the drafts before it. A VERIFY chunk's drafts are accepted while
        they equal those draws; its results are the accepted drafts and the draw after them, in order."""
        rows = [(c, i) for c in chunks for i in range(c.sampled_rows)]
        assert logits.shape[0] == len(rows)
        params = [self._params.get(c.seq_id) or c.sampling for c in chunks]
        if None in params:  # never a silent greedy draw
            seq_id = chunks[params.index(None)].seq_id
            raise RequestError(
                f"sequence {seq_id} has no sampling parameters on this stage: its first chunk brings them"
            )
        by_seq = {c.seq_id: p for c, p in zip(chunks, params, strict=True)}
        row_params = [by_seq[c.seq_id] for c, _ in rows]
        seen = [self._row_seen(c, i) if has_penalties(p) else None for (c, i), p in zip(rows, row_params, strict=True)]
        step = _Step(
            logits=logits.contiguous(),
            params=row_params,
            # the position each row's token takes: the one after the row's own
            uniform=torch.tensor(
                [
                    draw_uniform(p.seed or 0, c.start_pos + c.num_tokens - c.sampled_rows + i + 1)
                    for (c, i), p in zip(rows, row_params, strict=True)
                ],
                dtype=torch.float64,
            ),
            seen=seen,
            logprob_rows=[r for r, p in enumerate(row_params) if p.logprobs is not None],
        )
        out = _scan(step)
        tokens, lse, (top_values, top_ids) = out if out is not None else _whole_rows(step, list(range(len(rows))), True)
        token_list = tokens.tolist()
        emitted, r = [], 0  # the rows whose tokens are returned
        for c in chunks:
            n = c.sampled_rows
            accepted = 0
            while accepted < n - 1 and token_list[r + accepted] == c.token_ids[accepted]:
                accepted += 1
            emitted.extend(range(r, r + accepted + 1))
            if (s := self._seen.get(c.seq_id)) is not None:
                s.extend(token_list[r : r + accepted + 1])
            r += n
        results = [SampleResult(seq_id=rows[r][0].seq_id, token_id=token_list[r]) for r in emitted]
        wanted = [(k, r) for k, r in enumerate(emitted) if row_params[r].logprobs is not None]
        if wanted:
            at = torch.tensor([r for _, r in wanted], device=tokens.device)
            chosen = (step.logits[at, tokens[at]].float() - lse[at]).tolist()
            top_logprobs, top_ids = (top_values[at] - lse[at, None]).tolist(), top_ids[at].tolist()
            for i, (k, r) in enumerate(wanted):
                results[k].logprob = chosen[i]
                if n := row_params[r].logprobs:
                    results[k].top_logprobs = list(zip(top_ids[i][:n], top_logprobs[i][:n], strict=False))
        return results

    def _row_seen(self, chunk: SeqChunk, i: int) -> _Seen:
        """The seen tokens a row's penalties read: the sequence's, and for a verify chunk's row i its first i drafts."""
        seen = self._seen_of(chunk.seq_id)
        return seen.fork(chunk.token_ids[:i]) if i else seen


@dataclass(slots=True)
class _Step:
    """One call's rows: logits [R, V], each row's parameters, uniform number and (with penalties) seen tokens."""

    logits: torch.Tensor
    params: list[SamplingParams]
    uniform: torch.Tensor  # [R] float64
    seen: list[_Seen | None]
    logprob_rows: list[int]


_NO_SEEN = (torch.empty(0, dtype=torch.long), torch.empty(0))


def _scan(step: _Step) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]] | None:
    """Every row through the kernel and its candidates: (tokens [R], raw lse [R], top raw (values, ids)); None without a kernel."""
    if not sampler_kernel.prepare(step.logits.device):  # (cached) before building the kernel's CPU-side inputs
        return None
    vocab = step.logits.shape[1]
    params = step.params
    greedy = [p.is_greedy for p in params]
    no_top_k = [p.top_k <= 0 or p.top_k >= vocab for p in params]
    whole_draw = [
        not g and n and p.top_p >= 1.0 for g, n, p in zip(greedy, no_top_k, params, strict=False)
    ]  # the kernel draws it
    # Candidates per row: 1 for greedy, k + 1 for top-k (the tie check), all MAX_CANDIDATES for top-p alone; 0: too many.
    cap = min(vocab, MAX_CANDIDATES)
    width = [
        1 if g else cap if n else p.top_k + 1 if p.top_k < cap else 0
        for g, n, p in zip(greedy, no_top_k, params, strict=False)
    ]
    views = [s.views() if s is not None else _NO_SEEN for s in step.seen]
    penalties = torch.tensor(
        [[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params], dtype=torch.float32
    )
    inv_temp = torch.tensor(
        [1.0 / p.temperature if not g and n else 0.0 for g, n, p in zip(greedy, no_top_k, params, strict=False)]
    )
    n_raw = min(vocab, max([params[r].logprobs for r in step.logprob_rows] + [1])) if step.logprob_rows else 0
    n_top = max([w for w, d in zip(width, whole_draw, strict=False) if not d] + [0])
    out = sampler_kernel.scan(
        step.logits,
        [i for i, _ in views],
        [c for _, c in views],
        penalties,
        inv_temp,
        torch.where(torch.tensor(whole_draw), step.uniform, -1.0),
        bool(step.logprob_rows),
        n_raw,
        n_top,
    )
    if out is None:
        return None
    lse, raw_values, raw_ids, top_values, top_ids, masses, draws = out
    # greedy: the penalised argmax
    tokens = draws if n_top == 0 else torch.where(torch.tensor(whole_draw), draws, top_ids[:, 0])
    candidate_rows = [r for r in range(len(params)) if not greedy[r] and not whole_draw[r] and width[r]]
    undecided = [r for r in range(len(params)) if not greedy[r] and not whole_draw[r] and not width[r]]
    if candidate_rows:
        rows = torch.tensor(candidate_rows)
        processed, decided = from_candidates(
            top_values[rows], top_ids[rows], [params[r] for r in candidate_rows], masses[rows]
        )
        tokens[rows] = draw(processed, top_ids[rows], step.uniform[rows])
        undecided += [r for r, ok in zip(candidate_rows, decided.tolist(), strict=False) if not ok]
    if undecided:
        tokens[undecided] = _whole_rows(step, undecided, False)[0][undecided]
    return tokens, lse, (raw_values, raw_ids)


def _whole_rows(step: _Step, rows: list[int], with_logprobs: bool):
    """`rows` through torch's operators over the whole vocabulary: (tokens [R], filled at rows; raw lse [R]; top raw (values, ids))."""
    x = step.logits[rows].float()
    penalised = [i for i, r in enumerate(rows) if step.seen[r] is not None]
    if penalised:
        apply_penalties(
            x, penalised, [step.seen[rows[i]] for i in penalised], [step.params[rows[i]] for i in penalised]
        )
    row_params = [step.params[r] for r in rows]
    x = whole_rows(x, row_params)
    tokens = torch.zeros(step.logits.shape[0], dtype=torch.long, device=x.device)
    tokens[rows] = x.argmax(dim=1)
    sampled = [i for i, p in enumerate(row_params) if not p.is_greedy]
    if sampled:
        tokens[[rows[i] for i in sampled]] = draw(x[sampled], None, step.uniform[[rows[i] for i in sampled]])
    if not (with_logprobs and step.logprob_rows):
        return tokens, None, (None, None)
    raw = step.logits.float()
    top = torch.topk(raw, min(raw.shape[1], max(step.params[r].logprobs or 1 for r in step.logprob_rows)))
    return tokens, raw.logsumexp(dim=-1), (top.values, top.indices)
