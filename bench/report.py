"""What a standalone benchmark ends with: its targets and duration added to the result, the JSON written and printed."""

from __future__ import annotations

import json
import time
from pathlib import Path


def finish(result: dict, targets: dict[str, bool], started: float, out: Path) -> int:
    """Writes result (with `targets` and the seconds since `started`, a time.monotonic()) to out and prints it; the exit
    status: 0 when every target holds."""
    result["targets"] = targets
    result["seconds"] = round(time.monotonic() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(targets.values()) else 1
