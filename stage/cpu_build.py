"""Builds a stage's small C++/OpenMP kernels on first use (cached by torch), or says once why it could not."""

from __future__ import annotations

import logging
import time
from pathlib import Path

# What both kernels share, compiled ahead of each (load_inline puts torch/extension.h first):
# - exp(x) for x <= 0 as a branch-free polynomial the compiler vectorises (torch's exp is scalar on some CPUs, and
#   std::floor is not vectorised under -fPIC); relative error about 2e-7; below -87 the term counts as exp(-87);
# - by_dtype: calls f with a value of the C++ type of a float32, bfloat16 or float16 tensor.
PRELUDE = r"""
#include <cstdint>

template <typename F>
static void by_dtype(at::ScalarType type, const char* what, F&& f) {
  if (type == at::kFloat) {
    f(float{});
  } else if (type == at::kBFloat16) {
    f(at::BFloat16{});
  } else if (type == at::kHalf) {
    f(at::Half{});
  } else {
    TORCH_CHECK(false, "unsupported ", what, " dtype");
  }
}

static inline float exp_neg(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f, f = t - n;  // 2^t = 2^n * 2^f, n rounded to nearest (1.5 * 2^23)
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  return p * __builtin_bit_cast(float, static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}
"""


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


def build(name: str, source: str, functions: list[str], log: logging.Logger, what: str, fallback: str) -> object | None:
    """The compiled module, or None after one warning: `what` could not be built, `fallback` is used instead.

    Where there is no compiler, no ninja or a read-only cache the stage still runs, on torch's operators.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        _drop_stale_lock(Path(_get_build_directory(name, verbose=False)) / "lock", log)
        return load_inline(name=name, cpp_sources=source, functions=functions,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:
        log.warning("%s: the CPU kernel could not be built (%s: %s); %s", what, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "", fallback)
        return None
