"""`stagecoach generate --backend local`: JSON output, HF-equal greedy ids, clear errors without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint

STAGECOACH = str(Path(sys.executable).parent / "stagecoach")


def run(*args, check_ok=True):
    proc = subprocess.run(
        [STAGECOACH, "generate", "--backend", "local", *args], capture_output=True, text=True, timeout=120
    )
    if check_ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli")
    model = make_hf_checkpoint(path, num_hidden_layers=5, max_position_embeddings=64)
    return path, model


def test_json_greedy_equals_hf(ckpt):
    path, model = ckpt
    prompt = [5, 9, 200, 31, 77]
    out = json.loads(
        run(
            "--model",
            str(path),
            "--layers",
            "3,1,1",
            "--prompt-ids",
            ",".join(map(str, prompt)),
            "--temperature",
            "0",
            "--repetition-penalty",
            "1",
            "--max-new-tokens",
            "12",
            "--ignore-eos",
            "--json",
        ).stdout
    )
    assert out["stages"] == [
        {"index": 0, "layers": [0, 3]},
        {"index": 1, "layers": [3, 4]},
        {"index": 2, "layers": [4, 5]},
    ]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0
        )[0, len(prompt) :]
    assert out["token_ids"] == ref.tolist()
    assert isinstance(out["text"], str)


def test_chat_text_prompt_and_seeded_sampling_reproduce(ckpt):
    path, _ = ckpt
    args = (
        "--model",
        str(path),
        "--stages",
        "2",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "8",
        "--seed",
        "11",
        "--json",
    )
    first, second = json.loads(run(*args).stdout), json.loads(run(*args).stdout)
    assert first["token_ids"] == second["token_ids"] and len(first["token_ids"]) >= 1
    assert [s["layers"] for s in first["stages"]] == [[0, 3], [3, 5]] or [s["layers"] for s in first["stages"]] == [
        [0, 2],
        [2, 5],
    ]


def test_several_prompts_print_a_list(ckpt):
    path, _ = ckpt
    out = json.loads(
        run(
            "--model",
            str(path),
            "--prompt-ids",
            "1,2,3",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
            "--json",
        ).stdout
    )
    assert isinstance(out, list) and len(out) == 2 and all(len(o["token_ids"]) <= 3 for o in out)


def assert_clean_error(proc, message):
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr


def test_layer_split_that_does_not_sum(ckpt):
    path, _ = ckpt
    assert_clean_error(
        run("--model", str(path), "--layers", "2,2", "--prompt-ids", "1,2", check_ok=False),
        "layer split [2, 2] sums to 4 but the model has 5 layers",
    )


def test_prompt_longer_than_max_position_embeddings(ckpt):
    path, _ = ckpt
    ids = ",".join(["7"] * 70)
    assert_clean_error(run("--model", str(path), "--prompt-ids", ids, check_ok=False), "max_position_embeddings is 64")


def test_a_request_longer_than_the_kv_cache_is_refused_as_serve_refuses_it(ckpt):
    path, _ = ckpt  # 64 positions, but 4 blocks of 8: the cache holds 32 tokens
    proc = run(
        "--model",
        str(path),
        "--layers",
        "3,2",
        "--kv-blocks",
        "4",
        "--block-size",
        "8",
        "--prompt-ids",
        ",".join(["5"] * 30),
        "--max-new-tokens",
        "10",
        check_ok=False,
    )
    assert proc.returncode == 2 and "maximum context length is 32 tokens" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_missing_a_tensor(ckpt, tmp_path):
    path, _ = ckpt
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.3.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    assert_clean_error(
        run("--model", str(broken), "--prompt-ids", "1,2", check_ok=False), "model.layers.3.mlp.down_proj.weight"
    )


def test_missing_model_folder(tmp_path):
    assert_clean_error(
        run("--model", str(tmp_path / "nope"), "--prompt-ids", "1", check_ok=False), "config.json not found"
    )


def test_token_id_outside_vocabulary(ckpt):
    path, _ = ckpt
    assert_clean_error(run("--model", str(path), "--prompt-ids", "1,100000", check_ok=False), "outside the vocabulary")


def test_a_poisoned_prompt_fails_alone_with_exit_code_1(ckpt, tmp_path):
    path, model = ckpt
    config = tmp_path / "poison.yaml"
    config.write_text("pipeline: {num_stages: 2}\ntesting: {poison: {stage: 1, prefill_tokens: 5}}\n")
    proc = run(
        "--config",
        str(config),
        "--model",
        str(path),
        "--prompt-ids",
        "1,2,3",
        "--prompt-ids",
        "5,9,200,31,77",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--json",
        check_ok=False,
    )
    assert proc.returncode == 1 and "completion(s) 1 failed" in proc.stderr and "Traceback" not in proc.stderr, (
        proc.stderr
    )
    ok, failed = json.loads(proc.stdout)
    assert failed["finish_reason"] == "error" and failed["token_ids"] == []
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([[1, 2, 3]]), do_sample=False, max_new_tokens=4, min_new_tokens=4, repetition_penalty=1.0
        )[0, 3:]
    assert ok["finish_reason"] == "length" and ok["token_ids"] == ref.tolist()


def test_every_subcommands_help_exits_0(capsys):
    """Every command path (`testbed up` included), found from each level's usage line, whose `{a,b} ...` lists the
    commands under it; each one's --help exits 0."""
    import re

    from stagecoach.coordinator.cli import main

    paths, queue = [], [()]
    while queue:
        path = queue.pop(0)
        paths.append(path)
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith("usage: stagecoach"), (path, out[-500:])
        usage = " ".join(out.split("\n\n")[0].split())  # unwrapped
        for names in re.findall(r"\{([\w,-]+)\} \.\.\.", usage):
            queue.extend((*path, name) for name in names.split(","))
    assert {("serve",), ("generate",), ("testbed", "up")} <= set(paths), paths
    # The installed entry point too, as a new user first types it.
    proc = subprocess.run([STAGECOACH, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--rebalance-min-gain" in proc.stdout and "10 %" in proc.stdout, proc.stderr[-2000:]
