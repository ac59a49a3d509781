"""Engine settings for tests, from the one source of defaults (cluster/config.py); torch-free, for the scheduler tests too."""

from __future__ import annotations

from stagecoach.cluster.config import PipelineSection
from stagecoach.coordinator.scheduler import SchedulerConfig

# Qwen1.5's max_position_embeddings; the tests' models are smaller and set their own where it matters
MAX_MODEL_LEN = 32768


def scheduler_config(num_blocks: int, block_size: int, **overrides) -> SchedulerConfig:
    """A SchedulerConfig with the config's defaults for everything not given."""
    p = PipelineSection()
    values = {
        "max_num_batched_tokens": p.max_batch_tokens,
        "max_num_seqs": p.max_num_seqs,
        "max_model_len": MAX_MODEL_LEN,
    }
    return SchedulerConfig(num_blocks=num_blocks, block_size=block_size, **(values | overrides))
