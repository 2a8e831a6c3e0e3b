"""Loading a :class:`Config`: TOML files, ``--section.key=value`` overrides, saved dicts."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mlet_dist.config.data import DataConfig
from mlet_dist.config.dist import DistConfig
from mlet_dist.config.error import ConfigError
from mlet_dist.config.model import ModelConfig
from mlet_dist.config.optim import OptimConfig
from mlet_dist.config.synthetic import SyntheticConfig
from mlet_dist.config.train import TrainConfig


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(where: str, value: Any, tp: Any) -> Any:
    """Checks (and mildly coerces: int -> float) a value against a field annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # a choice: its type first, then the value
        choices = typing.get_args(tp)
        _check_type(where, value, type(choices[0]))
        if value not in choices:
            raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        hint = ": write true or false (TOML's lower case)" if tp is bool else ""
        raise ConfigError(
            f"{where}: expected {tp.__name__}, got {value!r} ({type(value).__name__}){hint}"
        )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{key = value}}, got {value!r}")
        return {
            _check_type(f"{where} key", k, key_tp): _check_type(f"{where}.{k}", v, val_tp)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):  # an item of an array of tables ([[data.sparse]])
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{key = value}}, got {value!r}")
        hints = typing.get_type_hints(tp)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(hints)}"
            )
        return tp(**{k: _check_type(f"{where}.{k}", v, hints[k]) for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(where, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    raise TypeError(f"unsupported config annotation {tp} at {where}")  # a bug in this file


def apply_key(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    """Sets ``cfg.<section>.<key> = value`` after checking the key, the type and the choice."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(
            f"{origin}: unknown section [{section}]; valid sections: {', '.join(sections)}"
        )
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(
            f"{origin}: unknown key '{section}.{key}'; valid keys of [{section}]: "
            f"{', '.join(hints)}"
        )
    setattr(sub, key, _check_type(f"{origin}: {section}.{key}", value, hints[key]))


def _parse_override_value(raw: str) -> Any:
    """Parses the right-hand side of ``--a.b=value`` as a TOML value, else as a plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, Any]]:
    """Turns ``["--model.inner_dim=64", ...]`` into ``[("model", "inner_dim", 64), ...]``."""
    out = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise ConfigError(
                f"override '{item}' must look like --section.key=value (e.g. --model.inner_dim=64)"
            )
        path, raw = text.split("=", 1)
        section, key = path.split(".", 1)
        out.append((section, key, _parse_override_value(raw)))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a Config from an optional TOML file and ``--section.key=value`` overrides.

    Args:
        path: TOML file with one table per section ([data], [model], ...); None = defaults.
        overrides: command-line overrides applied after the file.

    Returns:
        The validated Config.

    Raises:
        ConfigError: unreadable file, unknown section/key, wrong type or value.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(
                f"config file {path} does not exist (see configs/ for examples)"
            ) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: top-level key '{section}' must be a [section] table; "
                    f"valid sections: {', '.join(f.name for f in dataclasses.fields(Config))}"
                )
            for key, value in table.items():
                apply_key(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        apply_key(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Applies ``--section.key=value`` overrides to a Config in place and re-validates it."""
    for section, key, value in parse_overrides(overrides):
        apply_key(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], origin: str = "saved config") -> Config:
    """Rebuilds a Config from ``Config.to_dict()`` output (e.g. a run's config.json)."""
    cfg = Config()
    for section, table in raw.items():
        for key, value in table.items():
            apply_key(cfg, section, key, value, origin)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Each section's own check, then the checks that span sections."""
    cfg.model.check()
    cfg.optim.check()
    cfg.data.check()
    cfg.train.check()
    cfg.synthetic.check()
    cfg.dist.check()
