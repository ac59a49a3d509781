"""One pass over each row of a batch's logits in C++/OpenMP (built on first use): what the sampler needs of the whole vocabulary.

Per row, from one read of its logits into a private buffer: the raw log-sum-exp and largest raw values
(logprobs), the penalised values written over the buffer, their largest values (the top-k candidates),
their mass at the row's temperature (top-p over the whole vocabulary) and, where asked, a draw over the
whole vocabulary by inverse CDF in token-id order. Everything the sampler does after this works on a
few candidates per row. `scan` returns None where the kernel cannot be built (the sampler then runs
on torch's operators over whole rows).
"""

from __future__ import annotations

import functools
import logging

import torch

from stagecoach.stage import cpu_build

log = logging.getLogger(__name__)


@functools.cache
def cpu_kernel():
    """The compiled kernel, or None (logged once) where it cannot be built here."""
    module = cpu_build.build(log, "sampler", "the sampler works on whole rows with torch's operators instead")
    return None if module is None else module.scan


def prepare(device: torch.device) -> bool:
    """Builds (or loads the cached build of) the kernel for this device now; whether there is one."""
    return device.type == "cpu" and cpu_kernel() is not None


def scan(
    logits: torch.Tensor,
    seen_ids: list[torch.Tensor],
    seen_counts: list[torch.Tensor],
    penalties: torch.Tensor,
    inv_temp: torch.Tensor,
    uniform: torch.Tensor,
    with_lse: bool,
    n_raw: int,
    n_top: int,
) -> list[torch.Tensor] | None:
    """For each row of logits [R, V]: (raw log-sum-exp [R], largest raw values and ids [R, n_raw] x2,
    largest penalised values and ids [R, n_top] x2, mass at the row's temperature [R] float64, whole-vocabulary draw [R]).

    seen_ids/seen_counts: per row, its distinct seen tokens (int64) and how often each was generated (float32);
    penalties [R, 3] float32: repetition, presence, frequency. inv_temp [R] float32: 1 / temperature where the
    row's mass is wanted, else 0. uniform [R] float64: the row's whole-vocabulary draw, or -1 for none.
    Values past a row's valid entries are -inf with id -1. None where there is no kernel for this device.
    """
    if logits.device.type != "cpu":
        return None
    kernel = cpu_kernel()
    if kernel is None:
        return None
    return kernel(logits.contiguous(), seen_ids, seen_counts, penalties, inv_temp, uniform, with_lse, n_raw, n_top)
