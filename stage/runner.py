"""A stage's compute: microbatch and input tensor in, hidden states or sampled tokens out; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagecoach.errors import RequestError
from stagecoach.proto.types import MicroBatch, SampleResult
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
        """Raises RequestError naming the field of anything in the microbatch this stage cannot run.

        Every size and index is checked against this stage's configuration before any of it is used.
        """
        config = self.model.config
        block_size = self.kv_cache.block_size
        max_blocks = -(-config.max_position_embeddings // block_size)
        if not batch.seqs:
            raise RequestError("seqs is empty: a microbatch needs at least one sequence")
        seen: set[int] = set()
        for i, chunk in enumerate(batch.seqs):
            where = f"seqs[{i}]"
            if chunk.seq_id in seen:
                raise RequestError(f"{where}.seq_id {chunk.seq_id} appears twice in one microbatch")
            seen.add(chunk.seq_id)
            if chunk.num_tokens < 1:
                raise RequestError(f"{where}.num_tokens must be at least 1, got {chunk.num_tokens}")
            if len(chunk.slot_mapping) != chunk.num_tokens:
                raise RequestError(f"{where}.slot_mapping has {len(chunk.slot_mapping)} entries for {chunk.num_tokens} tokens")
            end = chunk.start_pos + chunk.num_tokens
            if chunk.start_pos < 0 or end > config.max_position_embeddings:
                raise RequestError(f"{where}.start_pos: positions up to {end} exceed max_position_embeddings {config.max_position_embeddings}")
            needed_blocks = -(-end // block_size)
            if not needed_blocks <= len(chunk.block_table) <= max_blocks:
                raise RequestError(f"{where}.block_table has {len(chunk.block_table)} blocks; positions up to {end} need {needed_blocks} (at most {max_blocks})")
            self.kv_cache.check(chunk.slot_mapping, (chunk.block_table,))
            for j, (pos, slot) in enumerate(zip(range(chunk.start_pos, end), chunk.slot_mapping)):
                if slot != chunk.block_table[pos // block_size] * block_size + pos % block_size:
                    raise RequestError(f"{where}.slot_mapping[{j}] = {slot} is not position {pos}'s slot in its block_table")
            if chunk.token_history is not None and self.is_last:
                bad = next((t for t in chunk.token_history if not 0 <= t < config.vocab_size), None)
                if bad is not None:
                    raise RequestError(f"{where}.token_history holds token id {bad}, outside the vocabulary of {config.vocab_size}")
                if not 0 <= chunk.num_prompt_tokens <= len(chunk.token_history):
                    raise RequestError(f"{where}.num_prompt_tokens {chunk.num_prompt_tokens} exceeds its token_history")
        if self.is_first:
            if len(batch.token_ids) != batch.num_tokens:
                raise RequestError(f"tensor has {len(batch.token_ids)} token ids for {batch.num_tokens} tokens")
            bad = next((t for t in batch.token_ids if not 0 <= t < config.vocab_size), None)
            if bad is not None:
                raise RequestError(f"tensor: token id {bad} is outside the vocabulary of {config.vocab_size}")
        elif inputs is None:
            raise RequestError("tensor: hidden states are missing")
        elif tuple(inputs.shape) != (batch.num_tokens, config.hidden_size):
            raise RequestError(f"tensor: hidden_states has shape {list(inputs.shape)}, expected [{batch.num_tokens}, {config.hidden_size}]")
        elif inputs.dtype != self.dtype:
            raise RequestError(f"tensor.dtype: hidden states are {inputs.dtype}, this stage runs {self.dtype}")

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
