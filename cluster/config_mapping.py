"""How YAML files and the command line map onto the config dataclasses (cluster/config.py), generic over them: YAML read
and checked against the fields' types, nested sections built, and a flag derived for every field that names one."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from stagecoach.errors import ConfigError


# -- YAML → dataclasses -----------------------------------------------------------------------
def setting(
    default,
    help: str,
    flag: str | None = None,
    choices: tuple | None = None,
    group: str | None = None,
    command: str | None = None,
):
    """A field with its default and, when `flag` is given, its command-line flag (choices, a mutually exclusive group)."""
    meta = {"help": help, "flag": flag, "choices": choices, "group": group, "command": command}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def choose(where: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{where} {value!r}: use one of {', '.join(choices)}")


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data or {}


def check_type(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return value
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return check_type(value, others[0], where)
        for arg in others:
            try:
                return check_type(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a valid {hint}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 reads an unquoted on/off (compile, rebalance) as a boolean
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def build(cls, data: dict, prefix: str = ""):
    """An instance of the dataclass cls from a YAML mapping: unknown keys and wrong types are ConfigErrors naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]}; known in this section: {', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and value is not None:
            # An optional nested section (`poison: PoisonSetting | None`) given a value is built like a section.
            hint = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = check_type(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


# -- the command line, derived from the fields ------------------------------------------------
def flag_fields(config_cls, command: str | None = None) -> list[tuple[str, dataclasses.Field, object]]:
    """(section name, field, its type) of every setting of config_cls's sections with a flag; for `command`, only the flags
    it takes."""
    out = []
    for section in dataclasses.fields(config_cls):
        hints = typing.get_type_hints(section.default_factory)
        for f in dataclasses.fields(section.default_factory):
            if f.metadata.get("flag") and (command is None or f.metadata["command"] in (None, command)):
                out.append((section.name, f, hints[f.name]))
    return out


def flag_dest(f: dataclasses.Field) -> str:
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _arg_type(hint):
    args = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else [hint]
    )
    (hint,) = args
    return int_list if typing.get_origin(hint) is list else hint


def add_flags(parser: argparse.ArgumentParser, config_cls, command: str) -> None:
    """Adds a flag for every setting of config_cls that has one (defaults stay None: only given flags override the YAML)."""
    parser.add_argument("--config", default=None, help="a cluster YAML (configs/*.yaml); flags override it")
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for section, f, hint in flag_fields(config_cls, command):
        meta = f.metadata
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, "") else f" (default: {default})"
        # argparse %-formats help texts; the settings' texts are plain (they also go to docs and the chart).
        text = f"{meta['help']}{shown} [{section}.{f.name}]".replace("%", "%%")
        if hint is bool:  # --name and --no-name
            target.add_argument(meta["flag"], action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        target.add_argument(meta["flag"], type=_arg_type(hint), choices=meta["choices"], default=None, help=text)
