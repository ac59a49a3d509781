"""The last stage's sampler against HF's logits processors, OpenAI's penalties and its own seeding contract."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from stagecoach.errors import RequestError
from stagecoach.proto.microbatch import SeqChunk
from stagecoach.proto.types import SamplingParams
from stagecoach.stage.sampler import Sampler, process_logits

VOCAB = 1000
QWEN_CHAT = dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05)


def rand_logits(seed: int, rows: int = 1, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).float()


def rand_history(seed: int, n: int = 80, high: int = 60) -> list[int]:
    """Ids drawn from a small range, so most appear several times."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, high, (n,), generator=g).tolist()
    assert len(set(ids)) < len(ids)  # repeats present
    return ids


def chunk(seq_id, start_pos, num_tokens=1, sampling=None, history=None, num_prompt=0) -> SeqChunk:
    """history: tokens the chunk brings to the last stage's history (a first chunk's are the sequence's start)."""
    return SeqChunk(
        seq_id=seq_id,
        start_pos=start_pos,
        num_tokens=num_tokens,
        do_sample=True,
        sampling=sampling,
        num_prompt_tokens=num_prompt,
        token_ids=list(history or []),
    )


def assert_same_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-exact: the same -inf positions and identical finite values (same float32 ops in the same order)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours, ref), (ours - ref).abs()[torch.isfinite(ref)].max()


# --- 1. HF parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_matches_hf(penalty):
    logits = rand_logits(0)
    history = rand_history(1)
    seen = torch.tensor(sorted(set(history)))
    # Both signs among the penalised logits, so both branches (multiply / divide) are exercised.
    assert (logits[0, seen] < 0).any() and (logits[0, seen] > 0).any()

    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), logits.clone())
    ours = process_logits(logits[0], SamplingParams(temperature=0.0, repetition_penalty=penalty), history, len(history))

    assert_same_logits(ours, ref[0])
    # Non-trivial: exactly the seen ids moved (once each, despite repeats), the rest untouched.
    changed = (ours != logits[0]).nonzero().flatten()
    assert torch.equal(changed, seen[logits[0, seen] != 0])
    expected = torch.where(logits[0, seen] < 0, logits[0, seen] * penalty, logits[0, seen] / penalty)
    assert torch.equal(ours[seen], expected)


def test_repetition_penalty_noop_cases():
    logits = rand_logits(2)[0]
    for penalty, history in ((1.0, [1, 2, 3]), (1.3, [])):
        row = process_logits(logits, SamplingParams(temperature=0.0, repetition_penalty=penalty), history, len(history))
        assert torch.equal(row, logits)


def hf_chain(logits: torch.Tensor, history: list[int], **p) -> torch.Tensor:
    """HF generate's order: repetition penalty, then temperature, top-k, top-p."""
    ids = torch.tensor([history])
    scores = logits.clone()
    if p.get("repetition_penalty", 1.0) != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p["repetition_penalty"])(ids, scores)
    if p.get("temperature", 1.0) != 1.0:
        scores = TemperatureLogitsWarper(p["temperature"])(ids, scores)
    if p.get("top_k", 0) > 0:
        scores = TopKLogitsWarper(p["top_k"])(ids, scores)
    if p.get("top_p", 1.0) < 1.0:
        scores = TopPLogitsWarper(p["top_p"])(ids, scores)
    return scores


@pytest.mark.parametrize("seed", range(5))
def test_process_logits_qwen_chat_defaults_match_hf_chain(seed):
    logits = rand_logits(100 + seed, scale=2.0)
    # Random repeated ids plus a few of the strongest tokens (twice), so the penalty reaches the survivors.
    history = rand_history(200 + seed, high=VOCAB // 4) + torch.topk(logits[0], 3).indices.tolist() * 2
    params = SamplingParams(**QWEN_CHAT, seed=seed)

    ours = process_logits(logits[0], params, history, num_prompt_tokens=10)
    ref = hf_chain(logits, history, **QWEN_CHAT)[0]

    assert_same_logits(ours, ref)
    kept = torch.isfinite(ours).sum().item()
    assert 1 < kept <= 20  # top-k bounded it; top-p had room to act
    # The warpers changed the surviving values (temperature) and the penalty was applied before them.
    unpenalised = hf_chain(logits, [], **{**QWEN_CHAT, "repetition_penalty": 1.0})[0]
    assert not torch.equal(ours, unpenalised)


def test_top_p_bites_inside_top_k():
    """With flat-ish logits top-p (0.8) removes tokens that top-k (20) kept, so the chain order matters."""
    logits = rand_logits(7, scale=0.5)
    params = SamplingParams(**QWEN_CHAT)
    ours = process_logits(logits[0], params, [], 0)
    only_k = process_logits(logits[0], SamplingParams(temperature=0.7, top_k=20), [], 0)
    assert torch.isfinite(ours).sum() < torch.isfinite(only_k).sum() == 20
    assert_same_logits(ours, hf_chain(logits, [1], temperature=0.7, top_k=20, top_p=0.8)[0])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.8, 0.95, 0.999])
def test_top_p_alone_matches_hf(top_p):
    logits = rand_logits(11)
    ours = process_logits(logits[0], SamplingParams(top_p=top_p), [], 0)
    ref = TopPLogitsWarper(top_p)(torch.tensor([[0]]), logits.clone())[0]
    assert_same_logits(ours, ref)
    assert torch.isinf(ours).any() and torch.isfinite(ours).any()


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_top_p_boundary_matches_hf(top_p):
    """Uniform logits: cumulative probs are exact multiples of 1/8, so some equal 1 - top_p exactly; HF drops those (<=)."""
    logits = torch.zeros(1, 8)
    ours = process_logits(logits[0], SamplingParams(top_p=top_p), [], 0)
    assert_same_logits(ours, TopPLogitsWarper(top_p)(torch.tensor([[0]]), logits.clone())[0])
    assert torch.isfinite(ours).sum() == round(8 * top_p)


@pytest.mark.parametrize("top_k", [1, 5, 20, 999])
def test_top_k_alone_matches_hf(top_k):
    logits = rand_logits(12)
    ours = process_logits(logits[0], SamplingParams(top_k=top_k), [], 0)
    ref = TopKLogitsWarper(top_k)(torch.tensor([[0]]), logits.clone())[0]
    assert_same_logits(ours, ref)
    assert torch.isfinite(ours).sum() == top_k


@pytest.mark.parametrize("top_k", [0, -1, VOCAB, VOCAB + 5])
def test_top_k_off(top_k):
    logits = rand_logits(13)[0]
    assert torch.equal(process_logits(logits, SamplingParams(top_k=top_k), [], 0), logits)


def test_temperature_matches_hf():
    logits = rand_logits(14)
    for t in (0.3, 0.7, 1.5):
        ours = process_logits(logits[0], SamplingParams(temperature=t), [], 0)
        assert torch.equal(ours, TemperatureLogitsWarper(t)(torch.tensor([[0]]), logits.clone())[0])


def test_process_logits_does_not_modify_input():
    logits = rand_logits(15)[0]
    before = logits.clone()
    process_logits(logits, SamplingParams(**QWEN_CHAT, presence_penalty=1.0, frequency_penalty=1.0), [1, 2, 2, 3], 1)
    assert torch.equal(logits, before)


# --- 2. OpenAI presence / frequency penalties ---------------------------------------------------


def openai_reference(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """Straightforward per-token loop in float64."""
    out = logits.double().clone()
    for j, count in Counter(generated).items():
        out[j] -= count * frequency + (1.0 if count > 0 else 0.0) * presence
    return out


# float32 vs the float64 loop: results agree to a few float32 ulps of |logit| <= ~15 (1e-5 is ~10 ulps).
PF_ATOL = 1e-5


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.2, 0.3), (-0.5, 1.5), (2.0, -2.0)])
def test_presence_frequency_penalty_openai(presence, frequency):
    logits = rand_logits(20)[0]
    generated = rand_history(21, n=100, high=40)
    assert max(Counter(generated).values()) >= 3

    ours = process_logits(
        logits, SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency), generated, 0
    )
    ref = openai_reference(logits, generated, presence, frequency)
    torch.testing.assert_close(ours.double(), ref, atol=PF_ATOL, rtol=0)
    # Untouched outside the generated ids, exactly.
    unseen = torch.ones(VOCAB, dtype=torch.bool)
    unseen[list(set(generated))] = False
    assert torch.equal(ours[unseen], logits[unseen])


def test_presence_frequency_counts_only_generated_tokens():
    logits = rand_logits(22)[0]
    prompt = [500, 501, 502, 500, 7]  # 500..502 only in the prompt; 7 in both
    generated = [7, 7, 8, 9, 9, 9]
    history = prompt + generated
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)

    ours = process_logits(logits, params, history, num_prompt_tokens=len(prompt))
    ref = openai_reference(logits, generated, 0.5, 0.25)
    torch.testing.assert_close(ours.double(), ref, atol=PF_ATOL, rtol=0)
    assert torch.equal(ours[[500, 501, 502]], logits[[500, 501, 502]])
    # 7 appears once in the prompt and twice generated: counted 2, not 3.
    assert ours[7].item() == pytest.approx(logits[7].item() - 2 * 0.25 - 0.5, abs=PF_ATOL)
    assert ours[9].item() == pytest.approx(logits[9].item() - 3 * 0.25 - 0.5, abs=PF_ATOL)
    # With the whole history counted as generated the answer differs (the test can tell).
    everything = process_logits(logits, params, history, num_prompt_tokens=0)
    assert not torch.equal(everything, ours)


def test_presence_frequency_composes_with_repetition_penalty():
    """Repetition penalty over the whole history, then OpenAI penalties over generated tokens."""
    logits = rand_logits(23)[0]
    prompt, generated = [3, 4, 5], [4, 6, 6]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    ours = process_logits(logits, params, prompt + generated, len(prompt))
    rep = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + generated]), logits[None].clone())[0]
    torch.testing.assert_close(ours.double(), openai_reference(rep, generated, 0.4, 0.2), atol=PF_ATOL, rtol=0)


# --- 3. Sampler ---------------------------------------------------------------------------------


def run_sequence(sampler: Sampler, params: SamplingParams, logits: torch.Tensor, seq_id=1, prompt=None) -> list[int]:
    """Prefill chunk with history, then one decode chunk per remaining row."""
    prompt = prompt if prompt is not None else [1, 2, 3, 4]
    first = chunk(seq_id, 0, len(prompt), params, history=list(prompt), num_prompt=len(prompt))
    sampler.observe(first)
    tokens = [sampler.sample(logits[:1], [first])[0].token_id]
    for i in range(1, logits.shape[0]):
        c = chunk(seq_id, len(prompt) + i - 1, 1, params)
        sampler.observe(c)
        tokens.append(sampler.sample(logits[i : i + 1], [c])[0].token_id)
    return tokens


def test_fixed_seed_reproduces_across_fresh_samplers():
    logits = rand_logits(30, rows=60, scale=1.0)
    params = SamplingParams(**QWEN_CHAT, presence_penalty=0.3, seed=1234)
    a = run_sequence(Sampler(), params, logits)
    b = run_sequence(Sampler(), params, logits)
    assert a == b
    # It really sampled: not simply the argmax every time.
    assert a != logits.argmax(dim=-1).tolist()


# One of each way a row is decided: the kernel's candidates (top-k, top-p), its whole-vocabulary draw, the whole-row path.
TARGETS = {
    "top-k, top-p, every penalty": SamplingParams(**QWEN_CHAT, presence_penalty=0.4, frequency_penalty=0.3, seed=77),
    "top-p over the whole vocabulary": SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=77),
    "top-p within the candidates": SamplingParams(temperature=0.5, top_p=0.6, seed=77),
    "temperature only": SamplingParams(temperature=0.9, frequency_penalty=0.5, seed=77),
    "top-k beyond the candidates": SamplingParams(temperature=1.0, top_k=400, seed=77),
}


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
def test_seeded_token_independent_of_batch_neighbours(target):
    steps = 40
    target_logits = rand_logits(31, rows=steps, scale=0.7 if target.temperature == 1.0 else 2.0)
    others = rand_logits(32, rows=3 * steps, scale=0.7).view(steps, 3, VOCAB)
    prompt = [9, 8, 7]

    alone, shared = Sampler(), Sampler()
    alone_tokens, shared_tokens = [], []
    # Neighbours whose top-k widen the batch's candidates, one greedy with a penalty, one with logprobs.
    neighbour_params = [
        SamplingParams(temperature=1.2, top_k=250, seed=1),
        SamplingParams(temperature=0.7, top_k=3, seed=2, logprobs=5),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
    ]
    for step in range(steps):
        first = step == 0
        start, n = (0, len(prompt)) if first else (len(prompt) + step - 1, 1)
        hist = list(prompt) if first else None
        t = chunk(5, start, n, target, history=hist, num_prompt=len(prompt))
        # Neighbours: different ids, positions, seeds and logits.
        nb = [
            chunk(100 + k, 3 * k + start + 11, 1, neighbour_params[k], history=[k] if first else None) for k in range(3)
        ]
        alone.observe(t)
        for c in [t, *nb]:
            shared.observe(c)
        alone_tokens.append(alone.sample(target_logits[step : step + 1], [t])[0].token_id)
        batch = torch.stack([others[step, 0], others[step, 1], target_logits[step], others[step, 2]])
        results = shared.sample(batch, [nb[0], nb[1], t, nb[2]])
        assert [r.seq_id for r in results] == [100, 101, 5, 102]
        shared_tokens.append(results[2].token_id)
    assert alone_tokens == shared_tokens
    assert len(set(alone_tokens)) > 5  # genuinely random draws, not a degenerate argmax
    assert alone_tokens != target_logits.argmax(dim=-1).tolist()


def whole_row_tokens(monkeypatch, logits, chunks):
    """The same chunks sampled with the kernel absent: every row on the whole-row path."""
    from stagecoach.stage import sampler_kernel

    with monkeypatch.context() as m:
        m.setattr(sampler_kernel, "scan", lambda *args: None)
        s = Sampler()
        for c in chunks:
            s.observe(c)
        return [r.token_id for r in s.sample(logits, chunks)]


def test_candidates_decide_as_the_whole_row_path(monkeypatch):
    """The kernel's candidates and whole-vocabulary draw pick the token the whole-row path (HF's processors) picks."""
    rows = 240
    logits = rand_logits(40, rows=rows, vocab=5000, scale=2.5)
    kinds = [
        dict(temperature=0.8, top_k=20, top_p=0.8),
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.6, top_p=0.7),
        dict(temperature=1.3),
        dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.5),
        dict(temperature=0.0, frequency_penalty=1.0),
        dict(temperature=1.0, top_k=300),
        dict(temperature=0.0),
    ]
    chunks = []
    for i in range(rows):
        params = SamplingParams(**kinds[i % len(kinds)], seed=i)
        strongest = torch.topk(logits[i], 3).indices.tolist()  # seen, so that the penalties change the candidates
        chunks.append(chunk(i, 0, 4, params, history=strongest + strongest[:1], num_prompt=2))
    s = Sampler()
    for c in chunks:
        s.observe(c)
    ours = [r.token_id for r in s.sample(logits, chunks)]
    assert ours == whole_row_tokens(monkeypatch, logits, chunks)
    assert ours != logits.argmax(dim=-1).tolist()
    # Each row's token survives HF's chain for its parameters.
    for i in range(0, rows, 7):
        p = chunks[i].sampling
        processed = process_logits(logits[i], p, chunks[i].token_ids, 2)
        assert torch.isfinite(processed[ours[i]])


def test_sampler_fallback_when_the_kernel_cannot_build(monkeypatch, caplog):
    import logging

    import torch.utils.cpp_extension

    from stagecoach.stage import sampler_kernel

    logits = rand_logits(41, rows=6, scale=2.0)
    chunks = [chunk(i, 0, 1, SamplingParams(**QWEN_CHAT, seed=i, logprobs=2), history=[i]) for i in range(6)]
    expected = Sampler().sample(logits, chunks)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    sampler_kernel.cpu_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="stagecoach.stage.sampler_kernel"):
            assert not sampler_kernel.prepare(torch.device("cpu"))
            got = Sampler().sample(logits, chunks)
            Sampler().sample(logits, chunks)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "could not be built" in lines[0] and "no C++ compiler here" in lines[0], lines
        assert [r.token_id for r in got] == [r.token_id for r in expected]
        for a, b in zip(got, expected, strict=False):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]
    finally:
        monkeypatch.undo()
        sampler_kernel.cpu_kernel.cache_clear()


def test_different_seeds_give_different_draws():
    vocab, positions = 50, 300
    logits = torch.zeros(positions, vocab)  # uniform: each draw is a fair 1-in-50
    draws = {}
    for seed in (1, 2, 3):
        s = Sampler()
        chunks = [chunk(i, i, 1, SamplingParams(seed=seed)) for i in range(positions)]
        draws[seed] = [r.token_id for r in s.sample(logits, chunks)]
        assert len(set(draws[seed])) > 35  # varies with position under one seed
    for a, b in ((1, 2), (1, 3), (2, 3)):
        matches = sum(x == y for x, y in zip(draws[a], draws[b], strict=False))
        assert matches < 20, (a, b, matches)  # ~6 expected by chance; identical streams would give 300


def test_unseeded_and_seed_zero_are_deterministic():
    logits = rand_logits(33, rows=20, scale=0.5)
    a = run_sequence(Sampler(), SamplingParams(), logits)
    b = run_sequence(Sampler(), SamplingParams(), logits)
    assert a == b


def test_top_k_1_equals_greedy():
    rows = 300
    logits = rand_logits(34, rows=rows, scale=1.0)
    chunks = [chunk(i, 10 + i, 1, SamplingParams(temperature=1.0, top_k=1, seed=i)) for i in range(rows)]
    tokens = [r.token_id for r in Sampler().sample(logits, chunks)]
    assert tokens == logits.argmax(dim=-1).tolist()
    # Control: without top_k the same seeds do not reproduce argmax.
    free = [chunk(i, 10 + i, 1, SamplingParams(temperature=1.0, seed=i)) for i in range(rows)]
    assert [r.token_id for r in Sampler().sample(logits, free)] != tokens


def test_temperature_zero_is_argmax_even_with_filters():
    rows = 200
    logits = rand_logits(35, rows=rows, scale=0.3)  # flat: sampling would rarely pick the argmax
    chunks = [chunk(i, i, 1, SamplingParams(temperature=0.0, top_p=0.9, top_k=50, seed=i)) for i in range(rows)]
    assert [r.token_id for r in Sampler().sample(logits, chunks)] == logits.argmax(dim=-1).tolist()
    # A sequence whose parameters this sampler never saw is an error, not a silent greedy draw.
    chunks = [chunk(i, i, 1, None) for i in range(rows)]
    with pytest.raises(RequestError, match="sequence 0 has no sampling parameters on this stage"):
        Sampler().sample(logits, chunks)


def test_logprobs_are_raw_log_softmax_with_sorted_top_entries():
    logits = rand_logits(36, rows=3, scale=2.0)
    raw_lp = torch.log_softmax(logits, dim=-1)
    top_id = int(logits[0].argmax())
    # Penalise the raw argmax and warp heavily, so processed and raw log-probs disagree.
    params = SamplingParams(temperature=0.5, top_k=5, repetition_penalty=3.0, seed=3, logprobs=3)
    s = Sampler()
    c0 = chunk(1, 0, 2, params, history=[top_id, 11], num_prompt=2)
    c1 = chunk(2, 0, 1, SamplingParams(temperature=0.0, logprobs=0), history=[5], num_prompt=1)
    c2 = chunk(3, 0, 1, SamplingParams(temperature=0.0), history=[5], num_prompt=1)
    for c in (c0, c1, c2):
        s.observe(c)
    r0, r1, r2 = s.sample(logits, [c0, c1, c2])

    assert r0.logprob == pytest.approx(raw_lp[0, r0.token_id].item(), abs=1e-6)
    processed = torch.log_softmax(process_logits(logits[0], params, [top_id, 11], 2), dim=-1)
    assert abs(processed[r0.token_id].item() - r0.logprob) > 1e-3  # raw, not processed
    assert r0.top_logprobs is not None and len(r0.top_logprobs) == 3
    ids = [i for i, _ in r0.top_logprobs]
    vals = [v for _, v in r0.top_logprobs]
    assert vals == sorted(vals, reverse=True)
    ref_vals, ref_ids = torch.topk(raw_lp[0], 3)
    assert ids == ref_ids.tolist() and ids[0] == top_id  # the raw argmax leads though it was penalised
    assert vals == pytest.approx(ref_vals.tolist(), abs=1e-6)
    assert all(isinstance(i, int) and isinstance(v, float) for i, v in r0.top_logprobs)

    assert r1.logprob == pytest.approx(raw_lp[1, r1.token_id].item(), abs=1e-6) and r1.top_logprobs is None
    assert r2.logprob is None and r2.top_logprobs is None


def test_logprobs_from_half_precision_logits():
    logits = rand_logits(37, rows=1).to(torch.bfloat16)
    c = chunk(1, 0, 1, SamplingParams(temperature=0.0, logprobs=2), history=[0])
    (r,) = Sampler().sample(logits, [c])
    assert r.token_id == int(logits[0].float().argmax())
    assert r.logprob == pytest.approx(torch.log_softmax(logits.float(), -1)[0, r.token_id].item(), abs=1e-6)


def peaked_logits(a: int = 5, b: int = 7, vocab: int = 32) -> torch.Tensor:
    row = torch.full((1, vocab), -10.0)
    row[0, a], row[0, b] = 2.0, 1.9
    return row


def test_repetition_penalty_uses_history_and_sampled_tokens():
    logits = peaked_logits()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s = Sampler()
    first = chunk(1, 0, 3, params, history=[1, 2, 3], num_prompt=3)
    s.observe(first)
    assert s.sample(logits, [first])[0].token_id == 5
    c = chunk(1, 3, 1, params)
    s.observe(c)  # no history: keeps the recorded one
    # 5 was sampled: 2.0 / 2 = 1.0 < 1.9, so 7 wins.
    assert s.sample(logits, [c])[0].token_id == 7
    c = chunk(1, 4, 1, params)
    s.observe(c)
    # Both penalised: 1.0 vs 0.95.
    assert s.sample(logits, [c])[0].token_id == 5

    # History sent with the first chunk counts too (5 in the prompt).
    s2 = Sampler()
    first = chunk(2, 0, 2, params, history=[5, 1], num_prompt=2)
    s2.observe(first)
    assert s2.sample(logits, [first])[0].token_id == 7


def test_presence_penalty_via_sampler_counts_generated_only():
    logits = peaked_logits()
    params = SamplingParams(temperature=0.0, presence_penalty=0.5)
    s = Sampler()
    first = chunk(1, 0, 3, params, history=[5, 5, 5], num_prompt=3)  # 5 only in the prompt: not penalised
    s.observe(first)
    assert s.sample(logits, [first])[0].token_id == 5
    c = chunk(1, 3, 1, params)
    s.observe(c)
    assert s.sample(logits, [c])[0].token_id == 7  # now 5 was generated: 1.5 < 1.9


def test_reprefill_history_replaces_recorded_history():
    logits = peaked_logits()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s = Sampler()
    first = chunk(1, 0, 2, params, history=[1, 2], num_prompt=2)
    s.observe(first)
    assert s.sample(logits, [first])[0].token_id == 5
    # Re-prefill after a fault: the coordinator resends the whole history, which drops the 5.
    again = chunk(1, 0, 3, params, history=[1, 2, 9], num_prompt=2)
    s.observe(again)
    assert s.sample(logits, [again])[0].token_id == 5


def test_forget_drops_state():
    logits = peaked_logits()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    s = Sampler()
    first = chunk(1, 0, 2, params, history=[5, 1], num_prompt=2)
    s.observe(first)
    s.observe(chunk(2, 0, 1, params, history=[3], num_prompt=1))
    assert s.num_sequences == 2
    assert s.sample(logits, [first])[0].token_id == 7
    s.forget([1, 999])  # unknown ids are ignored
    assert s.num_sequences == 1
    # A decode chunk for the forgotten id starts from an empty history: 5 no longer penalised.
    assert s.sample(logits, [chunk(1, 2, 1, params)])[0].token_id == 5
    s.forget([1, 2])
    assert s.num_sequences == 0


def test_sampled_frequencies_follow_softmax():
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    n = 2000
    logits = base.expand(n, -1).contiguous()
    probs = torch.softmax(base.double(), dim=-1)
    s = Sampler()
    chunks = [chunk(i, i, 1, SamplingParams(temperature=1.0, seed=424242)) for i in range(n)]
    tokens = torch.tensor([r.token_id for r in s.sample(logits, chunks)])
    counts = torch.bincount(tokens, minlength=len(base)).double()
    freq = counts / n
    assert (freq - probs).abs().max().item() < 0.05
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum().item()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001

    # Temperature sharpens as expected: at 0.5 the top token's share rises to about softmax(2 * logits)[0].
    chunks = [chunk(i, i, 1, SamplingParams(temperature=0.5, seed=424242)) for i in range(n)]
    tokens = torch.tensor([r.token_id for r in Sampler().sample(logits, chunks)])
    sharp = torch.softmax(base.double() * 2, dim=-1)
    freq = torch.bincount(tokens, minlength=len(base)).double() / n
    assert (freq - sharp).abs().max().item() < 0.05


# --- 4. SamplingParams validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("max_tokens", 0),
        ("logprobs", 21),
        ("logprobs", -1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("seed", -1),
        ("seed", 2**63),
    ],
)
def test_sampling_params_validation(field, value):
    with pytest.raises(RequestError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


def test_sampling_params_boundaries_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, max_tokens=1, logprobs=20, seed=2**63 - 1)
    SamplingParams(top_k=0, logprobs=0, presence_penalty=-2.0, frequency_penalty=2.0, seed=0)
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams(temperature=1e-3).is_greedy
