"""Builds a stage's small C++/OpenMP kernels on first use (cached by torch), or says once why it could not."""

from __future__ import annotations

import logging


def build(name: str, source: str, functions: list[str], log: logging.Logger, what: str, fallback: str) -> object | None:
    """The compiled module, or None after one warning: `what` could not be built, `fallback` is used instead.

    Where there is no compiler, no ninja or a read-only cache the stage still runs, on torch's operators.
    """
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name=name, cpp_sources=source, functions=functions,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:
        log.warning("%s: the CPU kernel could not be built (%s: %s); %s", what, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", fallback)
        return None
