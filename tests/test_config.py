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
        (
            {"pipeline": {"placement": "anywhere"}},
            "pipeline.placement 'anywhere': use one of auto, strict_spread, spread, pack",
        ),
        ({"model": {"dtype": "int8"}}, "model.dtype 'int8'"),
        ({"pipeline": {"layers": [3, "x"]}}, r"pipeline.layers\[1\]: expected int"),
        ({"cache": {"gpu_memory_fraction": 1.5}}, "cache.gpu_memory_fraction must be in"),
        ({"pipeline": {"num_stages": 0}}, "pipeline.num_stages must be at least 1"),
        ({"pipeline": {"compile": "yes"}}, "pipeline.compile 'yes': use one of auto, on, off"),
        (
            {"pipeline": {"compile_batch_sizes": [4, 0]}},
            r"pipeline.compile_batch_sizes must list batch sizes of at least 1",
        ),
        ({"pipeline": {"rebalance": "always"}}, "pipeline.rebalance 'always': use one of off, suggest, auto"),
        (
            {"pipeline": {"rebalance_min_gain": -0.1}},
            "pipeline.rebalance_min_gain and rebalance_cooldown_s must be >= 0",
        ),
        (
            {"pipeline": {"num_stages": 2}, "testing": {"rebalance_crash_stage": 2}},
            "testing.rebalance_crash_stage 2 is not a stage",
        ),
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


def test_flags_are_derived_from_the_fields_and_override_the_yaml(tmp_path, capsys):
    import yaml

    from stagecoach.cluster.config import DEVICES, PLACEMENTS, flag_fields
    from stagecoach.coordinator.cli import build_parser

    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {
                "model": {"path": "/m"},
                "pipeline": {"layers": [2, 2]},
                "cache": {"block_size": 32},
                "server": {"port": 9000, "drain_timeout_s": 5.0},
            }
        )
    )
    args = build_parser().parse_args(
        [
            "serve",
            "--config",
            str(tmp_path / "c.yaml"),
            "--stages",
            "3",
            "--block-size",
            "8",
            "--request-timeout",
            "7",
            "--placement",
            "pack",
        ]
    )
    config = ClusterConfig.load(args.config, args)
    assert (config.pipeline.num_stages, config.pipeline.layers, config.cache.block_size) == (3, None, 8)
    assert (config.server.port, config.server.drain_timeout_s, config.server.request_timeout_s) == (9000, 5.0, 7.0)
    assert config.pipeline.placement == "pack" and config.model.path == "/m"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"--placement {{{','.join(PLACEMENTS)}}}" in help_text and f"--device {{{','.join(DEVICES)}}}" in help_text
    serve = vars(build_parser().parse_args(["serve"]))
    assert all(serve[f.metadata["flag"].lstrip("-").replace("-", "_")] is None for _, f, _ in flag_fields("serve"))
    generate = build_parser().parse_args(["generate", "--prompt", "x"])
    assert not hasattr(generate, "request_timeout"), "serve-only settings are not generate's flags"


def test_prefix_caching_is_on_and_a_flag_turns_it_off(tmp_path):
    from stagecoach.coordinator.cli import build_parser

    (tmp_path / "c.yaml").write_text("cache:\n  prefix_caching: true\n")
    parse = build_parser().parse_args
    assert ClusterConfig.from_dict({}).cache.prefix_caching is True
    assert (
        ClusterConfig.load(tmp_path / "c.yaml", parse(["serve", "--no-prefix-caching"])).cache.prefix_caching is False
    )
    assert (
        ClusterConfig.load(None, parse(["generate", "--prompt", "x", "--prefix-caching"])).cache.prefix_caching is True
    )
    assert ClusterConfig.load(tmp_path / "c.yaml", parse(["serve"])).cache.prefix_caching is True


def test_the_testing_section_holds_the_test_only_knobs():
    config = ClusterConfig.from_dict(
        {"pipeline": {"num_stages": 2}, "testing": {"stage_delay_ms": [1.0, 0.0], "engine_crash_token_id": 5}}
    )
    assert config.testing.stage_delay_ms == [1.0, 0.0] and config.testing.engine_crash_token_id == 5
    with pytest.raises(ConfigError, match="testing.stage_delay_ms needs one non-negative value per stage"):
        ClusterConfig.from_dict({"pipeline": {"num_stages": 3}, "testing": {"stage_delay_ms": [1.0]}})
    with pytest.raises(ConfigError, match="unknown setting pipeline.stage_delay_ms"):
        ClusterConfig.from_dict({"pipeline": {"stage_delay_ms": [1.0]}})


def test_the_slower_device_knobs_reach_each_stage_plan():
    from stagecoach.cluster.backends import stage_plans

    config = ClusterConfig.from_dict(
        {"pipeline": {"num_stages": 2}, "testing": {"layer_delay_ms": 2, "stage_slowdown": [1, 3]}}
    )
    plans = stage_plans(config, [(0, 1), (1, 2)], link_token="t")
    assert [(p.testing.layer_delay_ms, p.testing.slowdown) for p in plans] == [(2.0, 1.0), (2.0, 3.0)]
    # With no testing: knob set a stage gets none at all.
    assert [p.testing for p in stage_plans(ClusterConfig.from_dict({}), [(0, 1)], link_token="t")] == [None]
    with pytest.raises(ConfigError, match=r"testing.stage_slowdown needs one factor >= 1 per stage \(2\)"):
        ClusterConfig.from_dict({"pipeline": {"num_stages": 2}, "testing": {"stage_slowdown": [1, 0.5]}})
    with pytest.raises(ConfigError, match="testing.layer_delay_ms must be >= 0"):
        ClusterConfig.from_dict({"testing": {"layer_delay_ms": -1}})


def test_rebalance_modes_read_from_yaml_as_written(tmp_path):
    # YAML 1.1 reads an unquoted off (or on) as a boolean: a mode setting takes it as the word.
    path = tmp_path / "c.yaml"
    path.write_text(
        "pipeline:\n  rebalance: off\n  compile: on\n  rebalance_min_gain: 0.2\n  rebalance_cooldown_s: 60\n"
    )
    p = ClusterConfig.from_yaml(path).pipeline
    assert (p.rebalance, p.compile, p.rebalance_min_gain, p.rebalance_cooldown_s) == ("off", "on", 0.2, 60.0)
    d = ClusterConfig.from_dict({}).pipeline
    assert (d.rebalance, d.rebalance_min_gain, d.rebalance_cooldown_s) == ("suggest", 0.10, 300.0)


def test_the_poison_knob_names_a_stage_and_a_prefill_length():
    from stagecoach.cluster.backends import stage_plans

    config = ClusterConfig.from_dict(
        {"pipeline": {"num_stages": 3}, "testing": {"poison": {"stage": 1, "prefill_tokens": 37}}}
    )
    assert (config.testing.poison.stage, config.testing.poison.prefill_tokens) == (1, 37)
    plans = stage_plans(config, [(0, 1), (1, 2), (2, 3)], link_token="t")
    # A replacement stage gets the same plan.
    assert [p.testing and p.testing.poison_prefill_tokens for p in plans] == [None, 37, None]
    assert ClusterConfig.from_dict({}).testing.poison is None
    with pytest.raises(ConfigError, match="testing.poison.stage 3 is not a stage of this pipeline"):
        ClusterConfig.from_dict(
            {"pipeline": {"num_stages": 3}, "testing": {"poison": {"stage": 3, "prefill_tokens": 37}}}
        )
    with pytest.raises(ConfigError, match="prefill_tokens >= 1"):
        ClusterConfig.from_dict({"testing": {"poison": {"prefill_tokens": 0}}})
    with pytest.raises(ConfigError, match="unknown setting testing.poison.tokens"):
        ClusterConfig.from_dict({"testing": {"poison": {"tokens": 3}}})


def test_every_stage_plan_setting_comes_from_the_config():
    from stagecoach.cluster.backends import stage_plans

    config = ClusterConfig.from_dict(
        {
            "model": {"path": "/m", "dtype": "bfloat16"},
            "cache": {"block_size": 8, "num_blocks": 9},
            "transport": {"port": 7000, "max_message_mb": 64},
            "pipeline": {"num_stages": 2, "max_batch_tokens": 99},
            "testing": {"stage_delay_ms": [0.0, 2.5]},
        }
    )
    first, second = stage_plans(config, [(0, 2), (2, 4)], link_token="t")
    assert (second.dtype, second.block_size, second.num_blocks, second.max_message_mb, second.max_batch_tokens) == (
        "bfloat16",
        8,
        9,
        64,
        99,
    )
    assert (first.port, second.port, first.testing, second.testing.delay_ms, second.layer_start) == (
        7000,
        7001,
        None,  # no knob applies to stage 0
        2.5,
        2,
    )
