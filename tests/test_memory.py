"""Loading one stage of a large sharded checkpoint keeps resident memory near that stage's weight bytes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import make_hf_checkpoint

LIMIT_FACTOR, LIMIT_EXTRA = 1.3, 500 * 2**20

PROBE = """
import json, sys
import torch
from stagecoach.stage.loader import load_stage_model
torch.set_num_threads(1)
model = load_stage_model(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across fork + exec).
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": peak_kib * 1024, "weights": weights}))
"""


@pytest.mark.slow
def test_stage_load_peak_memory(tmp_path):
    make_hf_checkpoint(
        tmp_path,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1024,
        max_shard_size="60MB",
        std=0.02,
    )
    total = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert total >= 400 * 2**20, f"checkpoint is only {total / 2**20:.0f} MiB"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), "4", "8"], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout)
    limit = LIMIT_FACTOR * m["weights"] + LIMIT_EXTRA
    print(
        f"checkpoint {total / 2**20:.0f} MiB; stage weights {m['weights'] / 2**20:.0f} MiB; "
        f"peak RSS {m['peak_rss'] / 2**20:.0f} MiB; limit {limit / 2**20:.0f} MiB"
    )
    assert m["peak_rss"] <= limit
