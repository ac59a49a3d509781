"""Test helpers: random Qwen2 checkpoints saved by transformers (the numerical reference), shared-data paths."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from stagecoach.coordinator.random_checkpoint import write_tokenizer_files

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN_DIR = SHARED / "data" / "qwen1.5-32b-chat"
GOLDEN_DIR = SHARED / "data" / "tokenizer-golden"


def randomize(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """HF initialises biases to 0 and norms to 1; randomise every tensor so each path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + noise if name.endswith("layernorm.weight") or name == "model.norm.weight" else noise)


def make_hf_checkpoint(path: Path, seed: int = 0, max_shard_size=None, std: float = 0.1, **config_kwargs):
    """A random transformers Qwen2ForCausalLM saved with save_pretrained, plus a trained byte-level BPE tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    special = write_tokenizer_files(path)
    defaults = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        attn_implementation="eager",
    )
    config = Qwen2Config(**(defaults | config_kwargs))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    randomize(model, seed, std)
    if config.tie_word_embeddings:
        model.tie_weights()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


# Every served GGUF type on some tensor of a tiny model (K-types need rows of 256: hidden 256, intermediate 512).
GGUF_TYPES = {
    "token_embd.weight": "Q5_0",
    "output.weight": "Q8_0",
    "attn_q.weight": "Q4_0",
    "attn_k.weight": "Q5_K",
    "attn_v.weight": "Q8_0",
    "attn_output.weight": "F16",
    "ffn_gate.weight": "Q4_K",
    "ffn_up.weight": "Q5_0",
    "ffn_down.weight": "Q6_K",
    "blk.1.ffn_down.weight": "Q4_K",
    "blk.2.attn_q.weight": "F32",
}


def make_packed_checkpoint(path: Path, method: str, seed: int = 0, packing: dict | None = None, **config_kwargs):
    """A tiny GPTQ or AWQ checkpoint (tests/packed_files.py): every decoder linear packed with `packing`'s bits, group,
    act_order, v2, sym; returns transformers' model on the same values dequantized."""
    from packed_files import make_packed

    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, vocab_size=512) | config_kwargs
    hf = make_hf_checkpoint(path, seed=seed, **config)
    return make_packed(path, hf, method, seed=seed, **(packing or {}))


def make_gguf_checkpoint(path: Path, num_hidden_layers: int = 4, seed: int = 0, types=None, **config_kwargs):
    """A folder holding a random tiny Qwen2 GGUF file in every served type (tests/gguf_files.py writes the blocks by
    hand) and its tokenizer files; returns (the file, transformers' model on the same values dequantized)."""
    from gguf_files import hf_reference, write_qwen2_gguf

    special = write_tokenizer_files(path)
    config = (
        dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=400,
            max_position_embeddings=256,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            bos_token_id=special["<|endoftext|>"],
            eos_token_id=special["<|im_end|>"],
        )
        | config_kwargs
    )
    gguf_path = path / "tiny.gguf"
    state = write_qwen2_gguf(gguf_path, config, types or GGUF_TYPES, seed=seed, tokenizer_dir=path)
    return gguf_path, hf_reference(config, state)


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """HF with its own KV cache: greedy ids and the logits of every prompt position and decode step."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        rows = [out.logits[0]]
        past, ids = out.past_key_values, []
        for _ in range(steps):
            ids.append(int(rows[-1][-1].argmax()))
            if len(ids) == steps:
                break
            out = model(torch.tensor([[ids[-1]]]), cache=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0])
    return ids, torch.cat(rows)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    port: int, path: str, body: dict | None = None, key: str | None = "test-key-123", timeout: float = 60
) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request; errors come back as their status, not raised."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}),
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def require_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not checked out beside the project)")


@contextlib.contextmanager
def ray_head(log_dir: Path, num_cpus: int = 3):
    """A real `ray start --head --block` on 127.0.0.1 with free ports and a token of its own; yields (job API address, env).

    The env carries the token and this venv's PATH (a job's entrypoint sees the PATH of whoever
    ran `ray start`). The head alone also has STAGECOACH_TEST_HEAD_ENV=head, to show what jobs
    inherit from it. On exit only the processes this head started are ended.
    """
    bin_dir = Path(sys.executable).parent
    gcs, dashboard = free_port(), free_port()
    ports = {
        name: str(free_port())
        for name in (
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        )
    }
    env = os.environ | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"sc-ray-{os.getpid()}-{gcs}"  # Ray's socket paths must stay short
    log = log_dir / "head.log"
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            *[f"{k}={v}" for k, v in ports.items()],
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env | {"STAGECOACH_TEST_HEAD_ENV": "head"},
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while (
            subprocess.run(
                [str(bin_dir / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            ).returncode
            != 0
        ):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        yield address, env
    finally:
        # `ray start --block` tears down what it started when signalled: only our own processes end. Only it is
        # signalled: it drains its node through the GCS first, so a GCS signalled with it would keep it waiting a minute.
        head.terminate()
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # anything of its own that outlived it


def wire_microbatch(batch, tensor: torch.Tensor | None = None):
    """The microbatch as one wire message holding its tensor's bytes (tensor None: stage 0's token ids)."""
    from stagecoach.proto.link import link_message

    msg, payload = link_message(batch, tensor)
    msg.tensor.data = payload.tobytes()
    return msg


def send_one(stub, msg, timeout: float = 10):
    """One microbatch message on a Link stream of its own, in one frame; the stage's LinkAck (code 0: accepted).
    An unauthenticated or broken stream raises grpc.RpcError."""
    from stagecoach.proto import stagecoach_pb2 as pb

    return next(iter(stub.Link(iter([pb.LinkFrame(batch=msg, last=True)]), timeout=timeout)))
