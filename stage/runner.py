"""A stage's compute: microbatch and input tensor in, hidden states or sampled tokens out; no I/O."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from stagecoach.errors import RequestError
from stagecoach.proto.microbatch import MicroBatch
from stagecoach.proto.types import SampleResult
from stagecoach.stage import paged_attention, sampler_kernel
from stagecoach.stage.compiled import CompiledDecode
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.model import AttentionMetadata, StageModel, can_pack
from stagecoach.stage.sampler import Sampler
from stagecoach.stage.sequences import SequenceTable
from stagecoach.stage.testing_knobs import StageTesting


@dataclass
class StageOutput:
    hidden_states: torch.Tensor | None = None  # [num_tokens, hidden] from every stage but the last
    samples: list[SampleResult] | None = None  # from the last stage
    logits: torch.Tensor | None = None  # last stage: the rows of chunks with score_rows, in order
    layers_ns: int = 0  # time in the decoder layers (0: not measured, a compiled step runs as one graph)


@dataclass(slots=True)
class Prepared:
    """A microbatch this stage has checked and admitted, ready to run."""

    batch: MicroBatch
    inputs: torch.Tensor  # stage 0: token ids [num_tokens] int64; later stages: hidden states [num_tokens, hidden]
    block_tables: list[list[int]]  # per chunk, covering its positions (this stage's own copies)


class StageRunner:
    """Runs one stage's layers over its KV cache; the last stage also samples.

    `prepare` is the one check of a microbatch at this stage (then its sequences' state is applied);
    `execute` computes, with no checks and no I/O.
    """

    def __init__(self, model: StageModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = Sampler() if model.is_last else None
        self.sequences = SequenceTable(kv_cache.num_blocks, kv_cache.block_size, model.config.max_position_embeddings)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.compiled: CompiledDecode | None = None  # set by compile()
        self.testing: StageTesting | None = None  # the testing: knobs' poison and layer delay (None: none)
        if can_pack(self.device, self.dtype):
            model.pack()
        paged_attention.prepare(self.device)  # at load, not in the first microbatch: a first build takes seconds
        if self.sampler is not None:
            sampler_kernel.prepare(self.device)

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    def forget_all(self) -> None:
        """After a fence: forget every sequence (the re-prefill brings them again)."""
        self.sequences.clear()
        if self.sampler is not None:
            self.sampler.forget_all()

    def prepare(self, batch: MicroBatch, inputs: torch.Tensor | None = None) -> Prepared:
        """Raises RequestError naming the field of anything in the microbatch this stage cannot run, else admits it.

        inputs: hidden states from the previous stage, or stage 0's token ids (None: the batch's token_ids).
        """
        vocab = self.model.config.vocab_size
        if self.is_first:
            if inputs is None:
                inputs = torch.tensor(batch.token_ids, dtype=torch.int64)
            if inputs.dtype != torch.int64 or inputs.dim() != 1:
                raise RequestError(
                    f"tensor: stage 0 takes token ids as INT64 [num_tokens], got {inputs.dtype} {list(inputs.shape)}"
                )
            if inputs.numel() != batch.num_tokens:
                raise RequestError(f"tensor has {inputs.numel()} token ids for {batch.num_tokens} tokens")
            if inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
                bad = int(inputs[(inputs < 0) | (inputs >= vocab)][0])
                raise RequestError(f"tensor: token id {bad} is outside the vocabulary of {vocab}")
        elif inputs is None:
            raise RequestError("tensor: hidden states are missing")
        elif inputs.dim() != 2 or tuple(inputs.shape) != (batch.num_tokens, self.model.config.hidden_size):
            raise RequestError(
                f"tensor: hidden_states has shape {list(inputs.shape)}, expected [{batch.num_tokens}, {self.model.config.hidden_size}]"
            )
        elif inputs.dtype != self.dtype:
            raise RequestError(f"tensor.dtype: hidden states are {inputs.dtype}, this stage runs {self.dtype}")
        if self.is_last:
            self._check_history(batch, vocab)
        return Prepared(batch, inputs, self.sequences.admit(batch))

    @staticmethod
    def _check_history(batch: MicroBatch, vocab: int) -> None:
        for i, chunk in enumerate(batch.seqs):
            ids = chunk.token_ids
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise RequestError(f"seqs[{i}].token_ids holds token id {bad}, outside the vocabulary of {vocab}")

    def compile(self, batch_sizes: list[int], progress: Callable[[str], None] | None = None) -> float:
        """Compiles the decode step for these batch sizes now; decode microbatches run compiled from then on. Returns seconds."""
        self.compiled = CompiledDecode(self.model, self.kv_cache, batch_sizes)
        return self.compiled.warm_up(progress)

    def _compiled_rows(self, batch: MicroBatch) -> int | None:
        """The compiled batch size this microbatch runs at: None unless it is all decode tokens and a graph fits it."""
        if self.compiled is None or not batch.is_decode_only:
            return None
        return self.compiled.bucket(len(batch.seqs))

    @torch.inference_mode()
    def execute(self, prepared: Prepared) -> StageOutput:
        """Runs an admitted microbatch: hidden states onward, or (the last stage) sampled tokens."""
        out = self._execute(prepared)
        poison = self.testing.poison_prefill_tokens if self.testing is not None else None
        if poison is not None and any(
            c.is_first and c.start_pos == 0 and c.num_tokens == poison for c in prepared.batch.seqs
        ):
            # After the work, like a fault in the middle of it: this microbatch's K/V and histories are already written.
            raise RuntimeError(
                f"testing.poison: microbatch {prepared.batch.batch_id} holds a first prefill chunk of {poison} tokens"
            )
        return out

    def _execute(self, prepared: Prepared) -> StageOutput:
        batch = prepared.batch
        x = prepared.inputs.to(device=self.device, dtype=torch.long if self.is_first else self.dtype)
        rows = self._compiled_rows(batch)
        if rows is not None:  # one row per sequence: hidden states, or logits of every row
            out = self.compiled.run(
                x, [(c.start_pos, table) for c, table in zip(batch.seqs, prepared.block_tables, strict=False)], rows
            )
            meta = None
        else:
            out = None
            meta = AttentionMetadata.build(
                [
                    (c.start_pos, c.num_tokens, table)
                    for c, table in zip(batch.seqs, prepared.block_tables, strict=False)
                ],
                self.kv_cache.block_size,
                self.device,
            )
        if not self.is_last:
            if out is not None:
                return StageOutput(hidden_states=out)
            hidden, layers_ns = self._forward(x, meta)
            return StageOutput(hidden_states=hidden, layers_ns=layers_ns)

        sampling = [c for c in batch.seqs if c.do_sample]
        row_ends, scored, end = [], [], 0
        for c in batch.seqs:
            if c.score_rows:
                scored.extend(range(end, end + c.num_tokens))
            end += c.num_tokens
            if c.do_sample:  # the last row; a verify chunk's every row (its newest token's and each draft's)
                row_ends.extend(range(end - c.sampled_rows, end))
        layers_ns = 0
        if out is None and scored:  # every row's logits (scored chunks' rows are returned, the sampled rows drawn)
            out, layers_ns = self._forward(x, meta)
        if out is not None:
            logits = (out if len(scored) == len(out) else out[scored]) if scored else None
            sample_logits = out if len(row_ends) == len(out) else out[row_ends]
        else:
            logits = None
            sample_logits, layers_ns = self._forward(
                x, meta, torch.tensor(row_ends, dtype=torch.long, device=self.device)
            )
        self.sampler.forget(batch.drop_seq_ids)  # before this microbatch's chunks, which may start one of them again
        for chunk in batch.seqs:
            self.sampler.observe(chunk)
        samples = self.sampler.sample(sample_logits, sampling) if sampling else []
        return StageOutput(samples=samples, logits=logits, layers_ns=layers_ns)

    def _forward(
        self, x: torch.Tensor, meta: AttentionMetadata, logits_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """The model's forward (eager), with the nanoseconds its decoder layers took."""
        hidden = self.model.embed(x)
        if self.device.type == "cuda":  # events, not a host clock: kernels run asynchronously
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            hidden = self.model.decoder_layers(hidden, meta, self.kv_cache)
            end.record()
            end.synchronize()
            layers_ns = int(start.elapsed_time(end) * 1e6)
        else:
            begin = time.monotonic_ns()
            hidden = self.model.decoder_layers(hidden, meta, self.kv_cache)
            layers_ns = time.monotonic_ns() - begin
        if self.testing is not None and self.testing.layer_delay_ms:
            # Counted as layer time whatever the clock (a host sleep is no CUDA work).
            delay_s = self.testing.layer_delay_ms / 1e3 * len(self.model.model.layers)
            time.sleep(delay_s)
            layers_ns += int(delay_s * 1e9)
        return self.model.head(hidden, logits_rows), layers_ns
