"""Builds a stage's small C++/OpenMP kernels (stage/csrc/*.cpp) on first use (cached by torch), or says once why it could not.

The kernels (paged attention, the sampler's scan, the quantized product) are one extension: compiling one file parses torch's headers once,
about half of a build's minute here.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"  # the kernels' C++ sources, shipped as package data


NAME = "stagecoach_kernels_v14"
FUNCTIONS = ["paged_decode", "paged_prefill", "scan", "quant_linear"]


def source() -> str:
    """The kernels' C++ source: what they share (csrc/prelude.h), then each one's."""
    return "".join(
        (CSRC / name).read_text() for name in ("prelude.h", "paged_attention.cpp", "sampler.cpp", "quantized.cpp")
    )


_LOADING = threading.Lock()  # one build or import at a time in a process: stages load on threads of their own
STALE_LOCK_S = 600.0  # a build takes about a minute here: a lock this old was left by a builder that was killed


def _drop_stale_lock(lock: Path, log: logging.Logger) -> None:
    """torch's build lock is a plain file: a stage killed mid-build (a chaos test, `testbed down`) leaves it, and
    every later build would wait on it for ever."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def build(log: logging.Logger, what: str, fallback: str) -> object | None:
    """The compiled module (built once, then loaded from torch's cache), or None after one warning: `what` could not be
    built, `fallback` is used instead.

    Where there is no compiler, no ninja or a read-only cache the stage still runs, on torch's operators.
    """
    with _LOADING:  # two threads importing the extension at once: one may get it before its functions are added
        return _build(log, what, fallback)


def _build(log: logging.Logger, what: str, fallback: str) -> object | None:
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        _drop_stale_lock(Path(_get_build_directory(NAME, verbose=False)) / "lock", log)
        # One ninja for every process: the one installed beside this interpreter (pyproject's `ninja`). Two ninjas hash
        # the build command differently, so processes that find another first on their PATH (a system ninja) and those
        # that find this one would each rebuild the kernels, about 40 s each time, whenever they alternate.
        os.environ["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), path))
        return load_inline(
            name=NAME,
            cpp_sources=source(),
            functions=FUNCTIONS,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as e:
        log.warning(
            "%s: the CPU kernel could not be built (%s: %s); %s",
            what,
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
            fallback,
        )
        return None
    finally:
        os.environ["PATH"] = path


if __name__ == "__main__":  # `make install` builds the kernels ahead of the first stage (torch and ninja are installed)
    logging.basicConfig(format="%(message)s")
    build(logging.getLogger("stagecoach.cpu_build"), "make install", "a stage builds them on first use")
