"""Regenerates the committed Python code for stagecoach.proto (run: python -m stagecoach.proto.generate)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("stagecoach_pb2.py", "stagecoach_pb2.pyi", "stagecoach_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs grpcio-tools' protoc on a temporary stagecoach/proto/ tree, so generated imports read
    `from stagecoach.proto import stagecoach_pb2`, and copies the results to out_dir."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "stagecoach" / "proto"
        tree.mkdir(parents=True)
        shutil.copy(PROTO_DIR / "stagecoach.proto", tree / "stagecoach.proto")
        include = str(Path(protoc.__file__).parent / "_proto")
        rc = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                "stagecoach/proto/stagecoach.proto",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(tree / name, out_dir / name)) for name in GENERATED]


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(f"wrote {path}")
