"""Per-stage checkpoint loading: sharded checkpoints, only owned tensors read, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import make_hf_checkpoint

from stagecoach.errors import CheckpointError
from stagecoach.stage import loader
from stagecoach.stage.loader import load_stage_model, stage_tensor_specs
from stagecoach.stage.model import ModelConfig

SPLITS = [(0, 2), (2, 3), (3, 4)]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    model = make_hf_checkpoint(path, max_shard_size=60_000, num_hidden_layers=4, tie_word_embeddings=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4, "the test needs a checkpoint of many shards"
    return path, model


def test_sharded_stages_equal_hf_weights(sharded):
    path, model = sharded
    ref = model.state_dict()
    for start, end in SPLITS:
        stage = load_stage_model(path, start, end)
        got = stage.state_dict()
        assert set(got) == set(stage_tensor_specs(ModelConfig.from_pretrained(path), start, end))
        for name, tensor in got.items():
            assert torch.equal(tensor, ref[name]), name


def test_stage_reads_only_its_own_tensors_and_shards(sharded, monkeypatch):
    path, _ = sharded
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    read_names, opened = [], set()
    real_header, real_read = loader.read_header, loader.read_tensor

    def spy_header(p):
        opened.add(p.name)
        infos = real_header(p)
        spy_header.last = {info.begin: name for name, info in infos.items()}
        return infos

    def spy_read(f, info):
        read_names.append(spy_header.last[info.begin])
        return real_read(f, info)

    monkeypatch.setattr(loader, "read_header", spy_header)
    monkeypatch.setattr(loader, "read_tensor", spy_read)
    config = ModelConfig.from_pretrained(path)
    for start, end in SPLITS:
        read_names.clear()
        opened.clear()
        load_stage_model(path, start, end)
        owned = set(stage_tensor_specs(config, start, end))
        assert set(read_names) == owned and len(read_names) == len(owned)
        assert opened == {weight_map[n] for n in owned}


def test_stage_loads_with_every_other_shard_deleted(sharded, tmp_path):
    """The middle stage works from a copy holding only its own shards: nothing else is ever touched."""
    path, model = sharded
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    config = ModelConfig.from_pretrained(path)
    owned = set(stage_tensor_specs(config, 2, 3))
    keep = {weight_map[n] for n in owned}
    for f in path.iterdir():
        if f.suffix != ".safetensors" or f.name in keep:
            shutil.copy(f, tmp_path / f.name)
    stage = load_stage_model(tmp_path, 2, 3)
    assert torch.equal(
        stage.state_dict()["model.layers.2.mlp.up_proj.weight"], model.state_dict()["model.layers.2.mlp.up_proj.weight"]
    )


def test_missing_tensor_is_named(sharded, tmp_path):
    path, _ = sharded
    shutil.copytree(path, tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.self_attn.k_proj.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_stage_model(tmp_path / "ckpt", 0, 2)
    load_stage_model(tmp_path / "ckpt", 2, 4)  # a stage that does not own it is unaffected


def test_wrong_shape_is_named(tmp_path):
    make_hf_checkpoint(tmp_path, num_hidden_layers=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP has 128
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \[128, 64\], expected \[96, 64\]"):
        load_stage_model(tmp_path, 0, 2)


def test_truncated_shard_is_refused(tmp_path):
    make_hf_checkpoint(tmp_path, num_hidden_layers=2)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_stage_model(tmp_path, 0, 2)


def test_tied_last_stage_takes_embeddings(tmp_path):
    model = make_hf_checkpoint(tmp_path, num_hidden_layers=3, tie_word_embeddings=True)
    stage = load_stage_model(tmp_path, 1, 3)
    assert torch.equal(stage.lm_head.weight, model.model.embed_tokens.weight)
    whole = load_stage_model(tmp_path, 0, 3)
    assert whole.lm_head.weight.data_ptr() == whole.model.embed_tokens.weight.data_ptr()  # loaded once, shared


def test_dtype_conversion(tmp_path):
    model = make_hf_checkpoint(tmp_path, num_hidden_layers=2)
    stage = load_stage_model(tmp_path, 0, 1, dtype=torch.bfloat16)
    w = stage.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.state_dict()["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))
