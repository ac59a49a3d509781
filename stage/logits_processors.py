"""HF's logits processors on whole rows and on a row's candidates, and the inverse-CDF draw: the sampler's maths
(stage/sampler.py says when each runs). Plain torch."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from stagecoach.proto.types import SamplingParams


def _column(
    values: list[float], dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None]


def penalised_values(
    logits: torch.Tensor, rows: list[int], seen: list, params: list[SamplingParams]
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


def apply_penalties(x: torch.Tensor, rows: list[int], seen: list, params: list[SamplingParams]) -> None:
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
