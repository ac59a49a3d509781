"""Stage model vs HF transformers Qwen2ForCausalLM: logits of prefill and every decode step, greedy ids."""

from __future__ import annotations

import pytest
import torch
from defaults import scheduler_config
from helpers import hf_greedy

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto.types import Delivered, SamplingParams

NEW_TOKENS = 32
ATOL = 1e-4


class RecordingPipeline:
    """The real LocalPipeline, asking the last stage for every row's logits and keeping them."""

    def __init__(self, inner: LocalPipeline) -> None:
        self.inner = inner
        self.stages, self.num_blocks, self.block_size = inner.stages, inner.num_blocks, inner.block_size
        self.logits: dict[int, list[torch.Tensor]] = {}  # seq id → logits rows in position order

    def submit(self, batch):
        for chunk in batch.seqs:
            chunk.score_rows = True  # every row's logits, not only the sampled ones
        samples = self.inner.execute(batch)
        self.done = Delivered(batch.batch_id, samples)
        row = 0
        for chunk in batch.seqs:
            rows = self.inner.last_logits[row : row + chunk.num_tokens]
            self.logits.setdefault(chunk.seq_id, []).extend(rows)
            row += chunk.num_tokens

    def wait(self, timeout=None):
        return self.done


def top2_gap(logits: torch.Tensor) -> float:
    top = logits.topk(2).values
    return float(top[0] - top[1])


def run_ours(model_dir, counts, prompts, max_batch_tokens=512, num_blocks=64, block_size=8):
    ranges = ranges_from_counts(counts, sum(counts))
    pipe = RecordingPipeline(LocalPipeline.load(model_dir, ranges, num_blocks=num_blocks, block_size=block_size))
    engine = Engine(pipe, scheduler_config(num_blocks, block_size=block_size, max_num_batched_tokens=max_batch_tokens))
    greedy = dict(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    seqs = engine.generate(prompts, [SamplingParams(**greedy) for _ in prompts])
    return seqs, pipe.logits


def check_against_hf(hf_model, seqs, logits_by_seq, prompts):
    for seq, prompt in zip(seqs, prompts, strict=False):
        ref_ids, ref_logits = hf_greedy(hf_model, prompt, NEW_TOKENS)
        ours = torch.stack(logits_by_seq[seq.seq_id])
        # Our rows: every prompt position, then one per decode step (the last sampled token is not fed back).
        assert ours.shape == ref_logits.shape, (ours.shape, ref_logits.shape)
        if seq.output_token_ids != ref_ids:
            step = next(i for i, (a, b) in enumerate(zip(seq.output_token_ids, ref_ids, strict=False)) if a != b)
            gap = top2_gap(ref_logits[len(prompt) - 1 + step])
            pytest.fail(
                f"greedy ids diverge at step {step}: ours {seq.output_token_ids[step]}, HF {ref_ids[step]}; HF top-1/top-2 gap there {gap:.3g}"
            )
        err = (ours - ref_logits).abs().max().item()
        assert err <= ATOL, f"max abs logit error {err:.3g} > {ATOL}"
        # Cache vs no cache: HF's full forward over the whole sequence gives the same rows.
        with torch.no_grad():
            full = hf_model(torch.tensor([prompt + seq.output_token_ids[:-1]])).logits[0]
        assert (ours - full).abs().max().item() <= ATOL


CONFIGS = {
    # key: (config kwargs)
    "gqa2_untied": dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2),
    "gqa1_tied": dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa5_untied": dict(num_hidden_layers=5, hidden_size=80, num_attention_heads=10, num_key_value_heads=2),
    "gqa2_tied": dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, seed=3
    ),
    # A GGUF file, tensors in every served type, held quantized (hidden 256: K-types need rows of 256).
    "gguf_mixed": dict(num_hidden_layers=5),
    # GPTQ and AWQ checkpoints, every decoder linear packed (tests/packed_files.py; hidden 256: groups of 128 fit).
    "gptq_4bit_g128_actorder": dict(num_hidden_layers=5, packing=dict(bits=4, group=128, act_order=True)),
    "gptq_8bit_g32_sym_v2": dict(num_hidden_layers=5, packing=dict(bits=8, group=32, sym=True, v2=True)),
    # symmetric zeros at the midpoint under v1's label: read as v2
    "gptq_4bit_channel_midpoint": dict(num_hidden_layers=5, packing=dict(group=-1, sym=True, v2=True, label_v2=False)),
    "awq_4bit_g64": dict(num_hidden_layers=5, packing=dict(group=64)),
}
PROMPT = [5, 77, 123, 9, 301, 42, 42, 7, 250, 11, 3, 199, 64]


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("split", ["one", "even", "uneven"])
def test_single_prompt_matches_hf(hf_checkpoint, key, split):
    cfg = CONFIGS[key]
    model_dir, hf_model = hf_checkpoint(key, **cfg)
    layers = cfg["num_hidden_layers"]
    counts = {"one": [layers], "even": [layers // 2, layers - layers // 2], "uneven": [layers - 2, 1, 1]}[split]
    seqs, logits = run_ours(model_dir, counts, [PROMPT])
    check_against_hf(hf_model, seqs, logits, [PROMPT])


@pytest.mark.parametrize("key", ["gqa2_untied", "gqa5_untied", "gqa1_tied", "gguf_mixed"])
def test_batch_of_four_prompts_decoded_together(hf_checkpoint, key):
    cfg = CONFIGS[key]
    model_dir, hf_model = hf_checkpoint(key, **cfg)
    prompts = [PROMPT, [17], [200, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377] * 3, [1, 2, 3, 4, 5, 6]]
    seqs, logits = run_ours(model_dir, [3, 1, 1], prompts)
    check_against_hf(hf_model, seqs, logits, prompts)


def test_chunked_prefill_matches_hf(hf_checkpoint):
    """A prompt longer than the microbatch token budget is split into chunks and still matches."""
    model_dir, hf_model = hf_checkpoint("gqa2_untied", **CONFIGS["gqa2_untied"])
    prompts = [list(range(3, 90)), PROMPT]
    seqs, logits = run_ours(model_dir, [2, 3], prompts, max_batch_tokens=16)
    check_against_hf(hf_model, seqs, logits, prompts)


def test_preemption_recomputes_the_same_ids(hf_checkpoint):
    """A KV pool too small for all requests at once: sequences are preempted, recomputed, and unchanged."""
    model_dir, hf_model = hf_checkpoint("gqa2_untied", **CONFIGS["gqa2_untied"])
    prompts = [PROMPT, [9, 8, 7, 6, 5, 4, 3], list(range(40, 60)), [300, 301]]
    ranges = ranges_from_counts([3, 2], 5)
    num_blocks, block_size = 14, 8  # 112 slots; the four requests need 166 at their longest
    pipe = LocalPipeline.load(model_dir, ranges, num_blocks=num_blocks, block_size=block_size)
    engine = Engine(pipe, scheduler_config(num_blocks, block_size=block_size))
    seqs = engine.generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True) for _ in prompts]
    )
    assert engine.scheduler.num_preemptions > 0
    for seq, prompt in zip(seqs, prompts, strict=False):
        assert seq.output_token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)[0]
