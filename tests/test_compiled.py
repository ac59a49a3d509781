"""The compiled decode step (stage/compiled.py): equal to the eager step and to HF, padded, and never recompiled once warm."""

from __future__ import annotations

import pytest
import torch
from defaults import scheduler_config
from helpers import make_hf_checkpoint
from test_model_parity import ATOL, NEW_TOKENS, RecordingPipeline, check_against_hf

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator.engine import Engine
from stagecoach.proto.types import SamplingParams
from stagecoach.stage.compiled import compile_enabled, compiled_batch_sizes

BLOCK = 8
# Five prompts, at most four sequences per microbatch: decode batches of 4 and 1 run padded to the one compiled size (4);
# contexts grow from 1 to 6 blocks, so the block tables' width takes 2, 4 and 8.
PROMPTS = [
    [5, 77, 123, 9, 301, 42, 42, 7, 250, 11, 3, 199, 64],
    [17],
    list(range(30, 50)),
    [1, 2, 3, 4, 5, 6],
    [400, 9],
]


def generate(pipe, max_num_seqs: int) -> list:
    engine = Engine(pipe, scheduler_config(96, block_size=BLOCK, max_num_seqs=max_num_seqs))
    return engine.generate(
        PROMPTS, [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True) for _ in PROMPTS]
    )


def test_compiled_decode_equals_eager_and_hf_and_never_recompiles(hf_checkpoint):
    model_dir, hf_model = hf_checkpoint("compiled", num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    ranges = ranges_from_counts([2, 1], 3)  # a first and a last stage
    compiled = RecordingPipeline(
        LocalPipeline.load(model_dir, ranges, num_blocks=96, block_size=BLOCK, compile_batch_sizes=[4])
    )
    runners = compiled.inner.runners
    assert [r.compiled.compiles for r in runners] == [1, 1]  # warm-up: one graph per stage, for its one batch size

    seqs = generate(compiled, max_num_seqs=4)
    assert [r.compiled.compiles for r in runners] == [1, 1], "the steady state compiled again"
    # Every decode microbatch ran compiled: 5 sequences in microbatches of at most 4, NEW_TOKENS - 1 decode steps each.
    assert all(r.compiled.steps >= 2 * (NEW_TOKENS - 1) for r in runners), [r.compiled.steps for r in runners]
    check_against_hf(hf_model, seqs, compiled.logits, PROMPTS)

    eager = RecordingPipeline(LocalPipeline.load(model_dir, ranges, num_blocks=96, block_size=BLOCK))
    eager_seqs = generate(eager, max_num_seqs=4)
    assert [s.output_token_ids for s in eager_seqs] == [s.output_token_ids for s in seqs]
    for a, b in zip(seqs, eager_seqs, strict=False):
        err = (torch.stack(compiled.logits[a.seq_id]) - torch.stack(eager.logits[b.seq_id])).abs().max().item()
        assert err <= ATOL, f"compiled vs eager: max abs logit error {err:.3g} > {ATOL}"

    # Five sequences in one microbatch: larger than every compiled size, so those steps run eagerly, and still match.
    before = [r.compiled.steps for r in runners]
    compiled.logits.clear()
    seqs = generate(compiled, max_num_seqs=5)
    check_against_hf(hf_model, seqs, compiled.logits, PROMPTS)
    assert [r.compiled.compiles for r in runners] == [1, 1]
    assert [r.compiled.steps for r in runners] == before  # the five decode together to the end: all eager


def test_the_compile_switch():
    assert compile_enabled("auto", "cuda") and not compile_enabled("auto", "cpu")
    assert compile_enabled("on", "cpu") and not compile_enabled("off", "cuda")
    assert compiled_batch_sizes([1, 2, 4, 8, 16, 32, 64], 12) == [1, 2, 4, 8]
    assert compiled_batch_sizes([16, 32], 8) == [16]  # none fits: the smallest, so that batches up to it still compile


@pytest.mark.slow
def test_compiled_stages_survive_a_stage_killed_mid_stream(ray_cluster, tmp_path_factory):
    """Three Ray stages, each compiled at start (one batch size, 4): the replacement compiles again, nothing is lost."""
    from test_recovery import PROMPTS as RECOVERY_PROMPTS
    from test_recovery import complete_at_once, config_file, run_with_kill
    from test_serve import Server

    tmp = tmp_path_factory.mktemp("compiled_recovery")
    make_hf_checkpoint(tmp / "model", num_hidden_layers=3, max_position_embeddings=1024)
    prompts = RECOVERY_PROMPTS[:4]  # two greedy, two seeded with every sampling option
    server = Server(
        [
            "--config",
            config_file(tmp, tmp / "model", compile="on", compile_batch_sizes=[4]),
            "--ray-address",
            ray_cluster.address,
        ],
        tmp / "server.log",
    )
    try:
        server.wait_ready(timeout=300)
        assert "decode step compiled for batch sizes [4]" in server.log.read_text()
        # The fault-free reference, the four at once (test_recovery checks that one alone gives the same)
        reference = complete_at_once(server.port, len(prompts))
        out, _ = run_with_kill(server, prompts, kill_stage=1, after_batches=30)
        for i, ref in enumerate(reference):
            text, events = out[i]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
            assert text == ref, f"request {i} differs after the recovery"
    finally:
        server.stop()
