"""The last stage's sampler: penalties, temperature, top-k, top-p and seeded draws, one row per sequence.

Semantics: repetition penalty, temperature, top-k and top-p as HF's logits processors (in HF's
order); presence and frequency penalties as OpenAI's (over generated tokens only). A seeded draw
depends only on (seed, position, logits): each sequence gets a generator seeded from both, so
what else shares the batch, or a re-prefill after a fault, never changes the token.
"""

from __future__ import annotations

import torch

from stagecoach.proto.types import SamplingParams, SampleResult, SeqChunk

_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) over the seed space


def draw_seed(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) % (2**63)


def apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> None:
    """HF RepetitionPenaltyLogitsProcessor on one row, in place."""
    if penalty == 1.0 or not token_ids:
        return
    ids = torch.tensor(token_ids, dtype=torch.long, device=logits.device)
    score = logits.gather(0, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.scatter_(0, ids, score)


def apply_presence_frequency_penalty(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> None:
    """OpenAI's penalties on one row, in place: logit -= frequency * count + presence * (count > 0)."""
    if (presence == 0.0 and frequency == 0.0) or not generated:
        return
    ids = torch.tensor(generated, dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)
    logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF TopKLogitsWarper: everything below the k-th largest logit becomes -inf."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF TopPLogitsWarper: drop the least likely tokens whose cumulative probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False  # keep at least one token
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, -float("inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, history: list[int], num_prompt_tokens: int) -> torch.Tensor:
    """One row's logits after penalties and, unless greedy, temperature, top-k and top-p."""
    logits = logits.clone()
    apply_repetition_penalty(logits, history, params.repetition_penalty)
    apply_presence_frequency_penalty(logits, history[num_prompt_tokens:], params.presence_penalty, params.frequency_penalty)
    if params.is_greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    return apply_top_p(logits, params.top_p)


_GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    """Keeps each live sequence's sampling parameters and token history (for penalties); turns logits rows into tokens.

    A sequence's first chunk (start_pos 0) brings its parameters and its first tokens; later chunks
    bring the tokens the history lacks (prefill chunks); sampled tokens are appended here.
    """

    def __init__(self) -> None:
        self._history: dict[int, list[int]] = {}
        self._num_prompt: dict[int, int] = {}
        self._params: dict[int, SamplingParams] = {}

    def observe(self, chunk: SeqChunk) -> None:
        """Records what a chunk adds to its sequence's history (a first chunk starts it anew)."""
        if chunk.start_pos == 0:
            self._history[chunk.seq_id] = list(chunk.token_ids)
            self._num_prompt[chunk.seq_id] = chunk.num_prompt_tokens
            if chunk.sampling is not None:
                self._params[chunk.seq_id] = chunk.sampling
        elif chunk.token_ids:
            self._history.setdefault(chunk.seq_id, []).extend(chunk.token_ids)

    def forget(self, seq_ids: list[int]) -> None:
        for seq_id in seq_ids:
            self._history.pop(seq_id, None)
            self._num_prompt.pop(seq_id, None)
            self._params.pop(seq_id, None)

    def reset(self) -> None:
        self._history.clear()
        self._num_prompt.clear()
        self._params.clear()

    @property
    def num_sequences(self) -> int:
        return len(self._history)

    def sample(self, logits: torch.Tensor, chunks: list[SeqChunk]) -> list[SampleResult]:
        """logits: [len(chunks), vocab], one row per sampling chunk, in order."""
        assert logits.shape[0] == len(chunks)
        logits = logits.float()
        params_of = [self._params.get(c.seq_id) or c.sampling or _GREEDY for c in chunks]
        want_logprobs = any(p.logprobs is not None for p in params_of)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        # Greedy rows without penalties are their raw argmax: one call for all of them, not one per row.
        plain = [row for row, p in enumerate(params_of) if p.is_greedy and not _has_penalties(p)]
        argmax = dict(zip(plain, logits[plain].argmax(dim=-1).tolist())) if plain else {}
        results = []
        for row, (chunk, params) in enumerate(zip(chunks, params_of)):
            history = self._history.setdefault(chunk.seq_id, [])
            token = argmax[row] if row in argmax else self._draw(logits[row], params, chunk, history)
            history.append(token)
            result = SampleResult(seq_id=chunk.seq_id, token_id=token)
            if raw_logprobs is not None and params.logprobs is not None:
                result.logprob = float(raw_logprobs[row, token])
                if params.logprobs > 0:
                    values, indices = torch.topk(raw_logprobs[row], params.logprobs)
                    result.top_logprobs = [(int(i), float(v)) for i, v in zip(indices, values)]
            results.append(result)
        return results

    def _draw(self, row: torch.Tensor, params: SamplingParams, chunk: SeqChunk, history: list[int]) -> int:
        processed = process_logits(row, params, history, self._num_prompt.get(chunk.seq_id, 0))
        if params.is_greedy:
            return int(torch.argmax(processed))
        generator = torch.Generator(device=row.device)
        generator.manual_seed(draw_seed(params.seed or 0, chunk.start_pos + chunk.num_tokens))  # the new token's position
        return int(torch.multinomial(torch.softmax(processed, dim=-1), 1, generator=generator))


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
