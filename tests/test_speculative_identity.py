"""Speculative decoding gives token for token what decoding one at a time gives: greedy, seeded sampling with every
option, stop tokens and max_tokens landing inside an accepted run, logprobs, prefix caching, over 2 in-process
stages. A greedy difference right after a near-tie (HF's top-1 minus top-2 logit below 1e-4) is inconclusive, not a
failure: k + 1 rows in one pass may round differently from one."""

from __future__ import annotations

import pytest
import torch
from defaults import scheduler_config

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.config_speculative import SpeculativeSection
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.speculative import Speculation
from stagecoach.proto.microbatch import ChunkKind
from stagecoach.proto.types import SamplingParams
from stagecoach.stage.testing_knobs import StageTesting

MODEL = dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=5)
# Prompts whose continuations repeat: a random tiny model falls into loops that its own earlier tokens predict.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12] * 4, [100, 101, 102, 103, 104, 100, 101, 102], list(range(40, 70))]
NEAR_TIE = 1e-4
EVERY_OPTION = dict(
    temperature=0.8,
    top_k=40,
    top_p=0.9,
    repetition_penalty=1.1,
    presence_penalty=0.2,
    frequency_penalty=0.1,
    seed=11,
)


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return hf_checkpoint("spec_gqa2", **MODEL)


class Foresight:
    """A proposer that knows what decoding one token at a time gave (`expected`, per sequence) and proposes it with
    every third proposal's last draft wrong: drafts accepted, and rejected at every place, whatever the sampling."""

    def __init__(self, prompts: list[list[int]], expected: list[list[int]]) -> None:
        self.prompts, self.expected, self.calls = prompts, expected, 0

    def propose(self, seq_id: int, tokens, length: int, max_tokens: int) -> list[int]:
        self.calls += 1
        done = length - len(self.prompts[seq_id])
        drafts = self.expected[seq_id][done : done + min(max_tokens, 1 + self.calls % 4)]
        if drafts and self.calls % 3 == 0:
            drafts[-1] = (drafts[-1] + 1) % 512
        return drafts

    def forget(self, seq_id: int) -> None:
        pass


def make_engine(model_dir, speculate: bool, prompts=PROMPTS, prefix_caching=False, foresight=None) -> Engine:
    """2 in-process stages; speculation forced on (every pass it can), or off. foresight: the outputs the Foresight
    proposer proposes from."""
    pipe = LocalPipeline.load(model_dir, ranges_from_counts([2, 2], 4), num_blocks=96, block_size=8)
    section = SpeculativeSection(method="ngram", num_tokens=4, min_acceptance=0.0, max_running=64, cost_model=False)
    speculation = Speculation(section) if speculate else None
    if foresight is not None:
        speculation.proposer = Foresight(prompts, foresight)
    return Engine(pipe, scheduler_config(96, block_size=8, prefix_caching=prefix_caching), speculation=speculation)


def generate(model_dir, params, speculate: bool, prompts=PROMPTS, prefix_caching=False, foresight=None):
    """The sequences and speculation's stats."""
    engine = make_engine(model_dir, speculate, prompts, prefix_caching, foresight)
    seqs = engine.generate(prompts, params)
    return seqs, engine.stats()["speculative"]


def near_tie_at(hf_model, prompt: list[int], output: list[int], step: int) -> bool:
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + output[:step]])).logits[0, -1]
    top = logits.topk(2).values
    return float(top[0] - top[1]) < NEAR_TIE


def assert_same(hf_model, base, spec, prompts=PROMPTS, greedy=True):
    for b, s, prompt in zip(base, spec, prompts, strict=True):
        if b.output_token_ids != s.output_token_ids:
            step = next(
                i for i, (x, y) in enumerate(zip(b.output_token_ids, s.output_token_ids, strict=False)) if x != y
            )
            assert greedy and near_tie_at(hf_model, prompt, b.output_token_ids, step), (
                f"sequence {b.seq_id} differs at step {step}: {b.output_token_ids} vs {s.output_token_ids}"
            )
            continue
        assert b.finish_reason == s.finish_reason
        if b.output_logprobs and b.output_logprobs[0] is not None:
            torch.testing.assert_close(
                torch.tensor(s.output_logprobs), torch.tensor(b.output_logprobs), atol=1e-4, rtol=0
            )
            for x, y in zip(b.output_top_logprobs, s.output_top_logprobs, strict=True):
                assert [t for t, _ in x] == [t for t, _ in y]


@pytest.mark.parametrize(
    "options",
    [dict(temperature=0.0), dict(temperature=0.0, logprobs=3), EVERY_OPTION, EVERY_OPTION | dict(logprobs=2)],
    ids=["greedy", "greedy-logprobs", "every-option", "every-option-logprobs"],
)
def test_tokens_equal_one_at_a_time(model, options):
    model_dir, hf_model = model
    params = [SamplingParams(max_tokens=40, ignore_eos=True, **options) for _ in PROMPTS]
    base, _ = generate(model_dir, params, speculate=False)
    greedy = options["temperature"] == 0
    # greedy: the n-gram proposer (this model loops); sampled: drafts from foresight, so that some are accepted
    foresight = None if greedy else [s.output_token_ids for s in base]
    spec, stats = generate(model_dir, params, speculate=True, foresight=foresight)
    assert stats["verify_passes"] > 0 and 0 < stats["accepted_tokens"] < stats["draft_tokens"], stats
    assert_same(hf_model, base, spec, greedy=greedy)


def test_a_stop_token_and_max_tokens_inside_an_accepted_run(model):
    model_dir, hf_model = model
    free = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True) for _ in PROMPTS]
    base, _ = generate(model_dir, free, speculate=False)
    # each sequence stops at the first occurrence of its 13th token, or runs out at 9 tokens
    stops = [SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[b.output_token_ids[12]]) for b in base]
    lengths = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True) for _ in PROMPTS]
    for params in (stops, lengths):
        expected, _ = generate(model_dir, params, speculate=False)
        spec, stats = generate(model_dir, params, speculate=True, foresight=[b.output_token_ids for b in base])
        assert stats["accepted_tokens"] > 0
        assert_same(hf_model, expected, spec)
    assert [len(s.output_token_ids) for s in expected] == [9, 9, 9]


def test_prefix_caching_on(model):
    model_dir, hf_model = model
    prompts = [PROMPTS[0], PROMPTS[0] + [1, 2], PROMPTS[0]]  # shared blocks, one fully cached but for its last token
    params = [SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True) for _ in prompts]
    base, _ = generate(model_dir, params, speculate=False, prompts=prompts, prefix_caching=True)
    spec, stats = generate(model_dir, params, speculate=True, prompts=prompts, prefix_caching=True)
    assert stats["accepted_tokens"] > 0
    assert_same(hf_model, base, spec, prompts=prompts)


def decode_until_accepted(engine: Engine, params) -> list:
    """Starts PROMPTS and decodes until drafts have been accepted; the sequences."""
    seqs = engine.add_requests(list(zip(PROMPTS, params, strict=True)))
    for _ in range(40):
        if engine.scheduler.speculation.accepted:
            break
        engine.step(1.0)
    assert engine.scheduler.speculation.accepted
    return seqs


def in_flight(engine: Engine) -> set[int]:
    """Submits the next microbatch (one in flight at a time) and checks it holds a verify chunk; its sequences' ids."""
    engine.fill()
    ((batch, _),) = engine.inflight.values()
    assert any(c.kind is ChunkKind.VERIFY for c in batch.seqs)
    return {c.seq_id for c in batch.seqs}


def test_a_poisoned_request_fails_alone_with_drafts_in_flight(model):
    model_dir, hf_model = model
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True) for _ in PROMPTS]
    base, _ = generate(model_dir, params, speculate=False)
    engine = make_engine(model_dir, speculate=True)
    # raises on a first chunk of 90 tokens: longer than any innocent sequence re-prefilled (prompt + 40 tokens at most)
    engine.pipeline.runners[1].testing = StageTesting(poison_prefill_tokens=90)
    seqs = decode_until_accepted(engine, params)
    poisoned = engine.add_request([(3 * j) % 500 + 3 for j in range(90)], params[0])
    assert poisoned.seq_id in in_flight(engine)  # its first chunk beside the verify chunks
    engine.run()
    assert poisoned.finish_reason == "error"
    assert_same(hf_model, base, seqs)
    stats = engine.stats()
    assert stats["requests_failed"] == {"stage_error": 1} and stats["microbatch_failures"] >= 2
    assert stats["kv_blocks_used"] == 0 and stats["isolating"] == 0


def test_a_rebalance_with_drafts_in_flight_keeps_every_token(model):
    model_dir, hf_model = model
    params = [SamplingParams(max_tokens=40, ignore_eos=True, **EVERY_OPTION) for _ in PROMPTS]
    base, _ = generate(model_dir, params, speculate=False)
    engine = make_engine(model_dir, speculate=True, foresight=[b.output_token_ids for b in base])
    seqs = decode_until_accepted(engine, params)
    in_flight(engine)
    engine.reconfigure(ranges_from_counts([1, 3], 4))  # voids the verify pass in flight; every sequence re-prefilled
    passes = engine.scheduler.speculation.passes
    engine.run()
    assert [tuple(s.layers) for s in engine.pipeline.stages] == [(0, 1), (1, 4)]
    assert engine.scheduler.speculation.passes > passes
    assert_same(hf_model, base, seqs, greedy=False)
