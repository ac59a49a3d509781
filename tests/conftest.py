"""Session fixtures: one torch thread for parity, random checkpoints built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import GOLDEN_DIR, QWEN_DIR, SHARED, make_hf_checkpoint, require_shared  # noqa: F401  (re-exported)

# Parity needs the same kernels on both sides: one thread, so reductions run in one order.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (key, **config) → (folder, HF model); each distinct key is built once per session."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(key: str, **kwargs):
        if key not in cache:
            path = tmp_path_factory.mktemp(key)
            cache[key] = (path, make_hf_checkpoint(path, **kwargs))
        return cache[key]

    return get
