"""A stage's decode step compiled once per batch size (torch.compile: inductor on CPU, CUDA graphs on CUDA), padded up to it.

A decode step of a stage runs hundreds of small operators; one by one, each costs its dispatch (on CPU) or its
launch (on CUDA), far more than its arithmetic at a few tokens. Compiled, the step is one graph: on CPU inductor
fuses the elementwise work between the matrix products into a few loops; on CUDA the whole step is replayed as a
CUDA graph. Shapes are fixed per graph, so a microbatch of n decode tokens is padded up to the smallest batch size
at least n (the padding rows write and read only the cache's pad block) and its block tables to a power-of-two
width (a dimension left dynamic: its size never recompiles). Prefill chunks, and batches larger than every
batch size, run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.model import AttentionMetadata, StageModel

log = logging.getLogger(__name__)


def compile_enabled(mode: str, device_type: str) -> bool:
    """pipeline.compile: on, off, or auto (on for CUDA stages; CPU stages stay eager, see bench/README.md)."""
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def compiled_batch_sizes(batch_sizes: list[int], max_num_seqs: int) -> list[int]:
    """The configured sizes a microbatch can reach (at most max_num_seqs sequences), or the smallest one."""
    return sorted({b for b in batch_sizes if b <= max_num_seqs}) or [min(batch_sizes)]


class CompiledDecode:
    """The stage model's forward compiled for decode-only microbatches of each of `batch_sizes` sequences.

    `compiles` counts the graphs built (one per batch size at warm-up); a steady state that compiled again would
    show as a larger count (the tests check it does not).
    """

    def __init__(self, model: StageModel, kv_cache: KVCache, batch_sizes: list[int]) -> None:
        """batch_sizes: pipeline.compile_batch_sizes (through compiled_batch_sizes)."""
        self.model = model
        self.kv_cache = kv_cache
        self.batch_sizes = sorted(set(batch_sizes))
        params = next(model.parameters())
        self.device, self.dtype = params.device, params.dtype
        self.cuda_graphs = self.device.type == "cuda"
        self.compiles = 0
        self.steps = 0  # microbatches run compiled
        self.warm = False  # every batch size compiled
        # Graphs are kept per code object, the forward's, shared by every stage model of the process (a local pipeline has
        # several): room for one per batch size of each.
        torch._dynamo.config.recompile_limit += len(self.batch_sizes)
        self._step = torch.compile(model, backend=self._backend, fullgraph=True, dynamic=False)

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        return compile_fx(graph, example_inputs, config_patches={"triton.cudagraphs": True} if self.cuda_graphs else {})

    def bucket(self, num_seqs: int) -> int | None:
        """The batch size a decode microbatch of num_seqs sequences is padded to; None: larger than all (run eagerly)."""
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, seqs: list[tuple[int, list[int]]], rows: int) -> torch.Tensor:
        """inputs: token ids [n] (first stage) or hidden states [n, hidden]; seqs: per sequence its position and block
        table; rows: the batch size to pad to. Returns the stage's output for the n sequences (hidden states or logits)."""
        n = len(seqs)
        self.steps += 1
        meta = AttentionMetadata.padded_decode(
            seqs, self.kv_cache.block_size, self.device, rows, self.kv_cache.pad_block
        )
        torch._dynamo.mark_dynamic(meta.decode_block_tables, 1)
        # Always a new tensor made here, in inference mode: the graphs' guards also check that (token ids come from
        # outside it), and the padding rows are zeros.
        padded = torch.zeros((rows, *inputs.shape[1:]), dtype=inputs.dtype, device=inputs.device)
        padded[:n] = inputs
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.warm:
            # Past warm-up only the guards that tell the graphs apart are checked (measured: 0.6 of 6.8 ms a step at batch 1
            # on the hidden-512 model): every input is made here, in the shapes, dtypes and mode the graphs were built for.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                out = self._step(padded, meta, self.kv_cache)
        else:
            out = self._step(padded, meta, self.kv_cache)
        # A CUDA graph's output lives in memory its next replay overwrites: the caller gets its own copy.
        return out[:n].clone() if self.cuda_graphs else out[:n]

    @torch.inference_mode()  # the steady state's inputs are inference tensors: so are these, or the graphs would not match
    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compiles every batch size now (at load, not in the first microbatches); returns the seconds it took."""
        say = progress or log.info
        start = time.monotonic()
        config = self.model.config
        for i, rows in enumerate(self.batch_sizes):
            t0 = time.monotonic()
            if self.model.is_first:
                x = torch.zeros(rows, dtype=torch.long, device=self.device)
            else:
                x = torch.zeros(rows, config.hidden_size, dtype=self.dtype, device=self.device)
            # Every row in the pad block, at its first slot: the warm-up writes nothing a sequence owns.
            seqs = [(0, [self.kv_cache.pad_block])] * rows
            for _ in range(3 if self.cuda_graphs else 1):  # CUDA graphs are recorded on a later call than the compile
                self.run(x, seqs, rows)
            say(
                f"compiled the decode step for batch {rows} ({i + 1}/{len(self.batch_sizes)}) in {time.monotonic() - t0:.1f} s"
            )
        self.warm = True
        return time.monotonic() - start
