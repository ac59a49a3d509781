"""Cluster configuration: YAML maps onto the dataclasses one to one; mistakes name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagecoach.cluster.config import ClusterConfig
from stagecoach.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "qwen1.5-32b-chat.yaml"])
def test_shipped_configs_load(name):
    config = ClusterConfig.from_yaml(CONFIGS / name)
    assert config.model.path and config.pipeline.num_stages >= 1


def test_shipped_values():
    demo = ClusterConfig.from_yaml(CONFIGS / "demo.yaml")
    assert (demo.pipeline.gpus_per_stage, demo.model.dtype, demo.transport.host) == (0, "float32", "127.0.0.1")
    big = ClusterConfig.from_yaml(CONFIGS / "qwen1.5-32b-chat.yaml")
    assert (big.pipeline.num_stages, big.pipeline.gpus_per_stage, big.model.dtype) == (4, 1, "bfloat16")


def test_yaml_round_trip(tmp_path):
    import yaml

    config = ClusterConfig.from_yaml(CONFIGS / "qwen1.5-32b-chat.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert ClusterConfig.from_yaml(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    "data, message",
    [
        ({"pipeline": {"num_stage": 2}}, "unknown setting pipeline.num_stage"),
        ({"modle": {}}, "unknown setting modle"),
        ({"pipeline": {"num_stages": "two"}}, r"pipeline.num_stages: expected int, got 'two'"),
        ({"pipeline": {"placement": "anywhere"}}, "pipeline.placement 'anywhere': use one of auto, strict_spread, spread, pack"),
        ({"model": {"dtype": "int8"}}, "model.dtype 'int8'"),
        ({"pipeline": {"layers": [3, "x"]}}, r"pipeline.layers\[1\]: expected int"),
        ({"cache": {"gpu_memory_fraction": 1.5}}, "cache.gpu_memory_fraction must be in"),
        ({"pipeline": {"num_stages": 0}}, "pipeline.num_stages must be at least 1"),
    ],
)
def test_mistakes_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        ClusterConfig.from_dict(data)


def test_layers_set_the_stage_count():
    assert ClusterConfig.from_dict({"pipeline": {"layers": [17, 16, 16, 15]}}).pipeline.num_stages == 4


def test_unreadable_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        ClusterConfig.from_yaml(tmp_path / "bad.yaml")
