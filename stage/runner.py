"""A stage's compute: microbatch and input tensor in, hidden states or sampled tokens out; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagecoach.errors import RequestError
from stagecoach.stage.batch import MicroBatch, SampleResult
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.model import AttentionMetadata, StageModel
from stagecoach.stage.sampler import Sampler


@dataclass
class StageOutput:
    hidden_states: torch.Tensor | None = None  # [num_tokens, hidden] from every stage but the last
    samples: list[SampleResult] | None = None  # from the last stage
    logits: torch.Tensor | None = None  # last stage, when the microbatch asked for all rows


class StageRunner:
    """Runs one stage's layers over its KV cache; the last stage also samples."""

    def __init__(self, model: StageModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = Sampler() if model.is_last else None
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def check(self, batch: MicroBatch, inputs: torch.Tensor | None) -> None:
        """Raises a typed error for anything in the microbatch this stage cannot run."""
        config = self.model.config
        for chunk in batch.seqs:
            if chunk.num_tokens < 1 or len(chunk.slot_mapping) != chunk.num_tokens:
                raise RequestError(f"sequence {chunk.seq_id}: slot_mapping has {len(chunk.slot_mapping)} entries for {chunk.num_tokens} tokens")
            if chunk.start_pos < 0 or chunk.start_pos + chunk.num_tokens > config.max_position_embeddings:
                raise RequestError(
                    f"sequence {chunk.seq_id}: positions up to {chunk.start_pos + chunk.num_tokens} exceed "
                    f"max_position_embeddings {config.max_position_embeddings}"
                )
            needed_blocks = -(-(chunk.start_pos + chunk.num_tokens) // self.kv_cache.block_size)
            if len(chunk.block_table) < needed_blocks:
                raise RequestError(f"sequence {chunk.seq_id}: block_table has {len(chunk.block_table)} blocks, needs {needed_blocks}")
        self.kv_cache.check((s for c in batch.seqs for s in c.slot_mapping), (c.block_table for c in batch.seqs))
        if self.is_first:
            if len(batch.token_ids) != batch.num_tokens:
                raise RequestError(f"token_ids has {len(batch.token_ids)} entries for {batch.num_tokens} tokens")
            bad = next((t for t in batch.token_ids if not 0 <= t < config.vocab_size), None)
            if bad is not None:
                raise RequestError(f"token id {bad} is outside the vocabulary of {config.vocab_size}")
        elif inputs is None or tuple(inputs.shape) != (batch.num_tokens, config.hidden_size):
            shape = None if inputs is None else list(inputs.shape)
            raise RequestError(f"hidden_states has shape {shape}, expected [{batch.num_tokens}, {config.hidden_size}]")

    @torch.inference_mode()
    def execute(self, batch: MicroBatch, inputs: torch.Tensor | None = None) -> StageOutput:
        """inputs: hidden states from the previous stage (ignored on the first, which embeds batch.token_ids)."""
        self.check(batch, inputs)
        meta = AttentionMetadata.build(
            [(c.start_pos, c.num_tokens, c.block_table) for c in batch.seqs],
            self.kv_cache.block_size,
            self.device,
            slot_mapping=[s for c in batch.seqs for s in c.slot_mapping],
        )
        if self.is_first:
            x = torch.tensor(batch.token_ids, dtype=torch.long, device=self.device)
        else:
            x = inputs.to(device=self.device, dtype=self.dtype)
        if not self.is_last:
            return StageOutput(hidden_states=self.model(x, meta, self.kv_cache))

        sampling = [c for c in batch.seqs if c.do_sample]
        row_ends, end = [], 0
        for c in batch.seqs:
            end += c.num_tokens
            if c.do_sample:
                row_ends.append(end - 1)
        if batch.want_all_logits:
            logits = self.model(x, meta, self.kv_cache)
            sample_logits = logits[row_ends]
        else:
            logits = None
            rows = torch.tensor(row_ends, dtype=torch.long, device=self.device)
            sample_logits = self.model(x, meta, self.kv_cache, logits_rows=rows)
        for chunk in batch.seqs:
            self.sampler.observe(chunk)
        samples = self.sampler.sample(sample_logits, sampling) if sampling else []
        self.sampler.forget(batch.finished_seq_ids)
        return StageOutput(samples=samples, logits=logits)
