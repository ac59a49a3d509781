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
from torch.nn.utils.rnn import pad_sequence

from stagecoach.errors import RequestError
from stagecoach.proto.microbatch import SeqChunk
from stagecoach.proto.types import SampleResult, SamplingParams
from stagecoach.stage import sampler_kernel

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

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.slot)
        return self.ids[:n], self.counts[:n]


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _column(
    values: list[float], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None]


def penalised_values(
    logits: torch.Tensor, rows: list[int], seen: list[_Seen], params: list[SamplingParams]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seen tokens of each of `rows` and their logits after the penalties: ids [P, L] (-1: padding), values [P, L].

    HF's repetition penalty (over the whole history), then OpenAI's presence and frequency penalties (over
    generated tokens), each as the same float32 operations as HF's and OpenAI's, per row at once.
    """
    device = logits.device
    views = [s.views() for s in seen]
    ids = pad_sequence([i for i, _ in views], batch_first=True, padding_value=-1).to(device)  # [P, L]
    counts = pad_sequence([c for _, c in views], batch_first=True).to(device)
    flat = torch.tensor(rows, device=device)[:, None] * logits.shape[1] + ids.clamp(min=0)
    raw = torch.take(logits.contiguous(), flat).float()
    rep = _column([p.repetition_penalty for p in params], device=device)
    values = torch.where(raw < 0, raw * rep, raw / rep)
    frequency = _column([p.frequency_penalty for p in params], device=device)
    presence = _column([p.presence_penalty for p in params], device=device)
    return ids, values - (frequency * counts + presence * (counts > 0).float())


def apply_penalties(x: torch.Tensor, rows: list[int], seen: list[_Seen], params: list[SamplingParams]) -> None:
    """Writes the penalised values of `rows`' seen tokens into x [R, V], in place, all rows at once."""
    ids, values = penalised_values(x, rows, seen, params)
    valid = ids >= 0  # padding is -1
    x[torch.tensor(rows, device=x.device)[:, None].expand_as(ids)[valid], ids[valid]] = values[valid]


def whole_rows(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """HF's warpers on [R, V] (penalties already applied), each row with its own temperature, top-k and top-p.

    Greedy rows come back as they are (their argmax is the token).
    """
    vocab, device = x.shape[1], x.device
    sampled = torch.tensor([not p.is_greedy for p in params], device=device)[:, None]
    x = torch.where(sampled, x / _column([p.temperature if not p.is_greedy else 1.0 for p in params], device=device), x)
    ks = [p.top_k if not p.is_greedy and 0 < p.top_k < vocab else 0 for p in params]
    if any(ks):
        values = torch.topk(x, max(ks)).values  # HF: everything below the k-th largest goes
        k = torch.tensor(ks, device=device)[:, None]
        kth = values.gather(1, (k - 1).clamp(min=0)).masked_fill(k == 0, -float("inf"))
        x = x.masked_fill(x < kth, -float("inf"))
    ps = [p.top_p if not p.is_greedy else 1.0 for p in params]
    if any(p < 1.0 for p in ps):
        rows = [r for r, p in enumerate(ps) if p < 1.0]
        sub = x[rows]
        # HF: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, keep at least the largest.
        sorted_logits, sorted_indices = torch.sort(sub, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cumulative <= _column(
            [1 - ps[r] for r in rows], device=device
        )  # 1 - top_p in double, then float32, as HF
        sorted_remove[..., -1:] = False
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
        x[rows] = sub.masked_fill(remove, -float("inf"))
    return x


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


def draw(values: torch.Tensor, ids: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF per row over the surviving tokens (-inf: removed) in token-id order: the token ids [R].

    values [R, W] processed logits; ids [R, W] their token ids (None: the column is the id); uniform [R] float64.
    The running sum is sequential along the row, so a row's draw does not depend on how wide the batch is padded.
    """
    uniform = uniform.to(values.device)
    if ids is not None:
        order = ids.argsort(dim=1)
        values, ids = values.gather(1, order), ids.gather(1, order)
    weights = (values.double() - values.max(dim=1, keepdim=True).values.double()).exp_()  # [R, W]; 0 where removed
    cdf = weights.cumsum(dim=1)
    pick = torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:], right=True)
    # rounding never picks past it
    last = weights.shape[1] - 1 - (weights.flip(1) > 0).int().argmax(dim=1, keepdim=True)
    pick = torch.minimum(pick, last)
    return (ids.gather(1, pick) if ids is not None else pick).squeeze(1)


def from_candidates(
    values: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams], masses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p on each row's largest penalised logits [C, W] (descending): (processed, decided [C]).

    A row is undecided where its k-th value ties the next (HF keeps every tied token) or, for top-p without
    top-k, where the candidates hold less than top_p of the row's mass (masses: the kernel's, at the row's temperature).
    """
    width = values.shape[1]
    v = values / _column([p.temperature for p in params])  # HF: scores / temperature
    ks = torch.tensor([p.top_k if 0 < p.top_k < width else width for p in params])
    top_k = torch.tensor([0 < p.top_k < width for p in params])
    kth = v.gather(1, (ks - 1)[:, None]).squeeze(1)
    after = v.gather(1, ks.clamp(max=width - 1)[:, None]).squeeze(1)
    decided = ~(top_k & (after == kth))
    v = v.masked_fill(torch.arange(width)[None, :] >= ks[:, None], -float("inf"))
    weights = (v.double() - v[:, :1].double()).exp_()  # exp(v - max): the candidates are in descending order
    running = weights.cumsum(dim=1)
    total = torch.where(top_k, running.gather(1, (ks - 1)[:, None]).squeeze(1), masses)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    decided &= top_k | (running[:, -1] > top_p * total * (1 + 1e-6))
    # HF's rule in descending order: a token's ascending cumulative probability is 1 - (the mass above it) / total.
    above = running - weights
    remove = (1 - above / total[:, None]) <= _column([1 - p.top_p for p in params], torch.float64)
    remove[:, 0] = False
    return v.masked_fill(remove & (top_p < 1)[:, None], -float("inf")), decided


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
        elif chunk.token_ids and chunk.seq_id in self._seen:
            self._seen[chunk.seq_id].extend(chunk.token_ids)

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
        """logits: [len(chunks), vocab], one row per sampling chunk, in order."""
        assert logits.shape[0] == len(chunks)
        params = [self._params.get(c.seq_id) or c.sampling for c in chunks]
        if None in params:  # never a silent greedy draw
            seq_id = chunks[params.index(None)].seq_id
            raise RequestError(
                f"sequence {seq_id} has no sampling parameters on this stage: its first chunk brings them"
            )
        step = _Step(
            logits=logits.contiguous(),
            params=params,
            uniform=torch.tensor(
                [draw_uniform(p.seed or 0, c.start_pos + c.num_tokens) for c, p in zip(chunks, params, strict=False)],
                dtype=torch.float64,
            ),  # the new token's position
            seen=[self._seen_of(c.seq_id) if has_penalties(p) else None for c, p in zip(chunks, params, strict=False)],
            logprob_rows=[r for r, p in enumerate(params) if p.logprobs is not None],
        )
        out = _scan(step)
        tokens, lse, (top_values, top_ids) = (
            out if out is not None else _whole_rows(step, list(range(len(chunks))), True)
        )
        token_list = tokens.tolist()
        for s, token in zip(step.seen, token_list, strict=False):
            if s is not None:
                s.extend([token])
        results = [SampleResult(seq_id=c.seq_id, token_id=t) for c, t in zip(chunks, token_list, strict=False)]
        if step.logprob_rows:
            rows = torch.tensor(step.logprob_rows, device=tokens.device)
            chosen = (step.logits[rows, tokens[rows]].float() - lse[rows]).tolist()
            top_logprobs, top_ids = (top_values[rows] - lse[rows, None]).tolist(), top_ids[rows].tolist()
            for i, r in enumerate(step.logprob_rows):
                results[r].logprob = chosen[i]
                if n := params[r].logprobs:
                    results[r].top_logprobs = list(zip(top_ids[i][:n], top_logprobs[i][:n], strict=False))
        return results


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
