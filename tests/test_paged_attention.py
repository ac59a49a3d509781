"""Decode attention read from the paged cache in place: the kernel against the gather path, its fallback, HF parity over scattered blocks."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from defaults import scheduler_config
from test_model_parity import CONFIGS, NEW_TOKENS, RecordingPipeline, check_against_hf

from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.sequence import Sequence
from stagecoach.proto.types import SamplingParams
from stagecoach.stage import paged_attention
from stagecoach.stage.paged_attention import (
    decode_attention,
    gathered_decode,
    gathered_prefill,
    paged_decode,
    paged_prefill,
    prefill_attention,
)


def scattered_case(
    seed: int, batch: int, heads: int, kv_heads: int, head_dim: int, block_size: int, lens: list[int], dtype
):
    """Random K/V in a pool of blocks, each sequence's table a random, non-contiguous draw from it."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = batch * max_blocks + 5
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, heads, head_dim, generator=g)
    return q, k, v, tables, torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (10, 2)])
def test_kernel_equals_the_gather_path(dtype, heads, kv_heads):
    # Lengths across chunk edges (the kernel splits contexts into 128-token chunks) and block edges.
    lens = [1, 7, 16, 17, 127, 128, 129, 700]
    q, k, v, tables, context_lens = scattered_case(len(lens) + heads, len(lens), heads, kv_heads, 32, 16, lens, dtype)
    ours = paged_decode(q, k, v, tables, context_lens, 32**-0.5)
    assert ours is not None, "the CPU kernel did not build here"
    ref = gathered_decode(q, k.float(), v.float(), tables, context_lens, 32**-0.5)
    assert ours.shape == ref.shape == (len(lens), heads, 32)
    assert (ours - ref).abs().max().item() < 1e-5


def test_fallback_when_the_kernel_cannot_build(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    q, k, v, tables, lens = scattered_case(0, 3, 8, 2, 32, 16, [5, 40, 90], torch.float32)
    chunk_q = torch.randn(20, 8, 32)  # a prefill chunk at positions 70..89 of the third sequence
    expected = decode_attention(q, k, v, tables, lens, 0.2)
    expected_prefill = prefill_attention(chunk_q, k, v, tables[2], 70, 0.2)
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    paged_attention.cpu_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="stagecoach.stage.paged_attention"):
            assert paged_decode(q, k, v, tables, lens, 0.2) is None
            assert paged_prefill(chunk_q, k, v, tables[2], 70, 0.2) is None
            got = decode_attention(q, k, v, tables, lens, 0.2)
            got_prefill = prefill_attention(chunk_q, k, v, tables[2], 70, 0.2)
            decode_attention(q, k, v, tables, lens, 0.2)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "could not be built" in lines[0] and "no C++ compiler here" in lines[0], lines
        assert (got - expected).abs().max().item() < 1e-5
        assert (got_prefill - expected_prefill).abs().max().item() < 1e-5
    finally:
        monkeypatch.undo()
        paged_attention.cpu_kernel.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (10, 2)])
def test_prefill_kernel_equals_the_gather_path(dtype, heads, kv_heads):
    """Chunks over cached prefixes of every shape the kernel tiles: prefixes across its 128-key tiles, chunks across its
    128-query tiles and block edges, a one-token chunk."""
    g = torch.Generator().manual_seed(heads)
    block_size, head_dim = 16, 32
    for start, n in [(0, 1), (0, 7), (5, 16), (127, 2), (128, 129), (129, 300), (700, 40), (31, 1)]:
        num_blocks = -(-(start + n) // block_size)
        pool = 2 * num_blocks + 3
        k = torch.randn(pool, block_size, kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(pool, block_size, kv_heads, head_dim, generator=g).to(dtype)
        blocks = torch.randperm(pool, generator=g)[:num_blocks]
        q = torch.randn(n, heads, head_dim, generator=g)
        ours = paged_prefill(q, k, v, blocks, start, head_dim**-0.5)
        assert ours is not None, "the CPU kernel did not build here"
        ref = gathered_prefill(q, k.float(), v.float(), blocks, start, head_dim**-0.5)
        assert ours.shape == ref.shape == (n, heads, head_dim)
        assert (ours - ref).abs().max().item() < 1e-5, (start, n)


@pytest.mark.parametrize(
    "budget", [512, 12], ids=["decode over scattered blocks", "prefill chunks over a cached prefix"]
)
def test_scattered_blocks_match_hf(hf_checkpoint, budget):
    """Small blocks handed out in a shuffled order: every context spans many non-contiguous blocks. With a budget of 12
    tokens per microbatch each prompt is prefilled in chunks, each over a prefix of several cached blocks."""
    from stagecoach.cluster.backends import LocalPipeline

    model_dir, hf_model = hf_checkpoint("gqa5_untied", **CONFIGS["gqa5_untied"])
    num_blocks, block_size = 96, 4
    pipe = RecordingPipeline(
        LocalPipeline.load(model_dir, ranges_from_counts([3, 2], 5), num_blocks=num_blocks, block_size=block_size)
    )
    engine = Engine(pipe, scheduler_config(num_blocks, block_size=block_size, max_num_batched_tokens=budget))
    # Shuffle the free list: one sequence takes every block, its table is shuffled, and freeing hands them back in
    # that order.
    holder, blocks = Sequence(-1, [0], SamplingParams()), engine.scheduler.block_manager
    blocks.grow(holder, num_blocks * block_size)
    random.Random(7).shuffle(holder.block_table)
    blocks.free(holder)
    tables: dict[int, list[int]] = {}  # every sequence's block table, as its chunks grew it
    submit = pipe.submit

    prefix_starts = []  # first positions of prefill chunks that follow a cached prefix

    def recording_submit(batch):
        for chunk in batch.seqs:
            tables.setdefault(chunk.seq_id, []).extend(chunk.new_blocks)
            if chunk.num_tokens > 1 and chunk.start_pos > 0:
                prefix_starts.append(chunk.start_pos)
        submit(batch)

    pipe.submit = recording_submit
    prompts = [[(13 * i + 5) % 500 + 3 for i in range(41)], [9, 8, 7], list(range(100, 160))]
    seqs = engine.generate(
        prompts, [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True) for _ in prompts]
    )
    for seq in seqs:
        t = tables[seq.seq_id]
        assert len(t) >= 8 and sum(b - a != 1 for a, b in zip(t, t[1:], strict=False)) >= len(t) // 2, (
            t
        )  # mostly non-adjacent blocks
    if budget == 12:
        assert max(prefix_starts) >= 48, prefix_starts  # a chunk over twelve cached blocks
    check_against_hf(hf_model, seqs, pipe.logits, prompts)
