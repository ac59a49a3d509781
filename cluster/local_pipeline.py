"""The in-process backend (every stage in this process, one after another: the reference) and the inbox every backend delivers to."""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.model_config import ModelConfig
from stagecoach.proto.types import Delivered, LayerRange, SampleResult, StageSummary
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.loader import DTYPES, change_layers, load_stage_model
from stagecoach.stage.runner import StageRunner

log = logging.getLogger(__name__)

_WAKE = object()


class Inbox:
    """Finished microbatches in the order they come back; `wake` interrupts a waiting engine."""

    def __init__(self) -> None:
        self._inbox: queue.Queue = queue.Queue()

    def wait(self, timeout: float | None = None) -> Delivered | None:
        """The next finished microbatch; None after timeout seconds or when woken."""
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if item is _WAKE else item

    def wake(self) -> None:
        self._inbox.put(_WAKE)


class StageFailed(Exception):
    """An in-process stage raised on a microbatch (LocalPipeline): which stage, and its error."""

    def __init__(self, stage: int, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class LocalPipeline(Inbox):
    """All stages in this process, run one after another when submitted: the reference backend."""

    def __init__(
        self,
        runners: list,
        ranges: list[LayerRange],
        model_dir: str | Path = "",
        compile_batch_sizes: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.model_dir = model_dir  # where a rebalance reads the layers a stage gains
        self.compile_batch_sizes = compile_batch_sizes
        self.runners = runners
        self.stages = [StageSummary(i, r) for i, r in enumerate(ranges)]
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
        *,
        num_blocks: int,
        block_size: int,
        compile_batch_sizes: list[int] | None = None,
    ) -> LocalPipeline:
        """compile_batch_sizes: compile each stage's decode step for these batch sizes now (None: every step eager)."""
        config = ModelConfig.from_pretrained(model_dir)
        models = [load_stage_model(model_dir, start, end, DTYPES[dtype], device, config) for start, end in ranges]
        return cls(
            [_runner(i, m, num_blocks, block_size, compile_batch_sizes) for i, m in enumerate(models)],
            ranges,
            model_dir,
            compile_batch_sizes,
        )

    def execute(self, batch: MicroBatch, timings: list | None = None) -> list[SampleResult]:
        """Runs the microbatch through every stage; a stage's error is raised as StageFailed, naming the stage."""
        hidden = None
        for index, runner in enumerate(self.runners):
            start = time.monotonic_ns()
            try:
                out = runner.execute(runner.prepare(batch, hidden))
            except Exception as e:
                raise StageFailed(index, f"stage {index}: {type(e).__name__}: {e}") from e
            hidden = out.hidden_states
            if timings is not None:
                timings.append(
                    pb.StageTiming(
                        stage_index=index, received_ns=start, compute_start_ns=start, compute_end_ns=time.monotonic_ns()
                    )
                )
        self.last_logits = out.logits
        return out.samples

    def submit(self, batch: MicroBatch) -> None:
        """Runs the microbatch now; a stage's error comes back as a failed delivery, as from stages over gRPC."""
        timings: list = []
        try:
            samples = self.execute(batch, timings)
        except StageFailed as e:
            log.error("microbatch %d failed: %s", batch.batch_id, e)
            log.debug("microbatch %d's traceback", batch.batch_id, exc_info=e.__cause__)
            self._inbox.put(Delivered(batch.batch_id, [], timings, str(e), e.stage))
            return
        self._inbox.put(Delivered(batch.batch_id, samples, timings))

    def health(self) -> list:
        """In-process stages cannot stop answering."""
        return [pb.HealthReply(serving=True) for _ in self.runners]

    def check_layers(self, ranges: list[LayerRange], min_blocks: int) -> None:
        """In-process stages share this process's memory, and their caches keep their block count."""

    def reconfigure(self, min_batch_id: int, target: list[LayerRange] | None = None, min_blocks: int = 1) -> None:
        """Every stage forgets its sequences (submit runs each microbatch to its end: none is in flight to fence); with a
        target, each stage whose layers change keeps the layers it still owns and reads only those it gains."""
        for i, (runner, stage, new) in enumerate(zip(self.runners, self.stages, target or [], strict=False)):
            if tuple(stage.layers) != tuple(new):
                model = change_layers(runner.model, *new, self.model_dir, runner.dtype, runner.device)
                self.runners[i] = _runner(i, model, self.num_blocks, self.block_size, self.compile_batch_sizes)
                self.runners[i].testing = runner.testing
            self.stages[i] = StageSummary(i, tuple(new))
        for runner in self.runners:
            runner.forget_all()

    def shutdown(self) -> None:
        self.runners.clear()


def _runner(index: int, model, num_blocks: int, block_size: int, compile_batch_sizes: list[int] | None) -> StageRunner:
    """A stage's runner over a fresh KV cache for its layers, its decode step compiled for compile_batch_sizes (None: eager)."""
    weight = next(model.parameters())
    runner = StageRunner(model, KVCache.for_model(model, num_blocks, block_size, weight.dtype, weight.device))
    if compile_batch_sizes:
        runner.compile(compile_batch_sizes, progress=lambda line: log.warning("stage %d: %s", index, line))
    return runner
