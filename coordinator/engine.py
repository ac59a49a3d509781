"""The engine loop: schedule a microbatch, run it through the stages, apply the sampled tokens, repeat."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stagecoach.coordinator.partition import LayerRange
from stagecoach.coordinator.scheduler import Scheduler, SchedulerConfig
from stagecoach.coordinator.sequence import Sequence
from stagecoach.stage.batch import MicroBatch, SampleResult, SamplingParams


@dataclass(slots=True)
class StageInfo:
    index: int
    layers: LayerRange


class Pipeline(Protocol):
    """Runs a microbatch through every stage and returns the last stage's samples."""

    stages: list[StageInfo]
    num_blocks: int
    block_size: int

    def execute(self, batch: MicroBatch) -> list[SampleResult]: ...


class LocalPipeline:
    """All stages in this process, run one after another: the reference for the distributed pipeline."""

    def __init__(self, runners: list, ranges: list[LayerRange]) -> None:
        self.runners = runners
        self.stages = [StageInfo(i, r) for i, r in enumerate(ranges)]
        self.num_blocks = runners[0].kv_cache.num_blocks
        self.block_size = runners[0].kv_cache.block_size
        self.last_logits = None  # the last stage's full logits when a batch asked for them

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        ranges: list[LayerRange],
        dtype: str = "float32",
        device: str = "cpu",
        num_blocks: int = 256,
        block_size: int = 16,
    ) -> LocalPipeline:
        from stagecoach.stage.kv_cache import KVCache
        from stagecoach.stage.loader import DTYPES, load_stage_model
        from stagecoach.stage.model import ModelConfig
        from stagecoach.stage.runner import StageRunner

        config = ModelConfig.from_pretrained(model_dir)
        runners = []
        for start, end in ranges:
            model = load_stage_model(model_dir, start, end, DTYPES[dtype], device, config)
            cache = KVCache(end - start, num_blocks, block_size, config.num_key_value_heads, config.head_dim, DTYPES[dtype], device)
            runners.append(StageRunner(model, cache))
        return cls(runners, ranges)

    def execute(self, batch: MicroBatch) -> list[SampleResult]:
        hidden = None
        for runner in self.runners:
            out = runner.execute(batch, hidden)
            hidden = out.hidden_states
        self.last_logits = out.logits
        return out.samples


def sampling_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (HF semantics: do_sample false → greedy)."""
    path = Path(model_dir) / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if gen.get(k) is not None}
    if not gen.get("do_sample", False):
        defaults["temperature"] = 0.0
    return defaults


class Engine:
    """Continuous batching over a pipeline: requests join and leave between microbatches."""

    def __init__(self, pipeline: Pipeline, scheduler_config: SchedulerConfig, stop_token_ids: list[int] | None = None) -> None:
        self.pipeline = pipeline
        self.scheduler = Scheduler(scheduler_config)
        self.stop_token_ids = list(stop_token_ids or [])

    def add_request(self, prompt_token_ids: list[int], sampling: SamplingParams) -> Sequence:
        if sampling.seed is None:
            # Every draw is seeded from (seed, position): a request without a seed gets a random
            # one, so that recomputing it after a preemption or a fault gives the same tokens.
            sampling.seed = random.getrandbits(63)
        if not sampling.stop_token_ids:
            sampling.stop_token_ids = list(self.stop_token_ids)
        return self.scheduler.add_request(prompt_token_ids, sampling)

    def step(self) -> list[Sequence]:
        """One microbatch through the pipeline; returns the sequences that got a token."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        samples = self.pipeline.execute(batch)
        return self.scheduler.process_results(batch, samples)

    def run(self) -> None:
        while self.scheduler.has_unfinished:
            self.step()

    def generate(self, prompts: list[list[int]], sampling: list[SamplingParams]) -> list[Sequence]:
        seqs = [self.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
        self.run()
        return seqs
