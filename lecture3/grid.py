"""Config arithmetic for sweeps: what differs between two run configs, grids over dotted keys, run names.

    base = Config()
    configs = grid(base, {"model.norm_position": ["pre", "post"], "train.lr": [1e-3, 3e-3]})   # 4 configs
    names = [run_name(c, base, keys=["model.norm_position", "train.lr"]) for c in configs]
    # ['norm_position=pre,lr=0.001', 'norm_position=pre,lr=0.003', 'norm_position=post,lr=0.001', ...]
    config_diff(base, configs[2])   # {'model.norm_position': ('pre', 'post'), 'train.lr': (0.003, 0.001)}

Keys are the dotted `section.field` names of `Config.replace`; an unknown one is a `ConfigError` naming
the close matches.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from lecture3.config import Config, ConfigError, dotted_keys


def flatten(cfg: Config | Mapping) -> dict[str, Any]:
    """{"model.d_model": 128, ...}: every field of a run config (or of its `to_dict()`) by dotted key.
    Tuples become lists and nested dataclasses (e.g. `rope_scaling`) dicts, so equal configs flatten equal."""
    raw = cfg.to_dict() if isinstance(cfg, Config) else cfg
    return {f"{section}.{name}": _plain(value) for section, fields in raw.items() for name, value in fields.items()}


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


ABSENT = "<absent>"  # the value of a key that one side of a diff lacks (a config saved by an older version)


def config_diff(a: Config | Mapping, b: Config | Mapping, *, nested: bool = False) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value in a, value in b)} for every field that differs; a key missing on one side shows
    as `ABSENT`. A nested dataclass (e.g. `model.rope_scaling`) is one value, as `Config.replace` takes it;
    with `nested=True`, where both sides hold one, its own fields are compared instead
    (`model.rope_scaling.factor`)."""
    return _diff(flatten(a), flatten(b), nested)


def _diff(fa: Mapping, fb: Mapping, nested: bool, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out = {}
    for k in [*fa, *(k for k in fb if k not in fa)]:
        va, vb = fa.get(k, ABSENT), fb.get(k, ABSENT)
        if nested and isinstance(va, dict) and isinstance(vb, dict):
            out.update(_diff(va, vb, nested, f"{prefix}{k}."))
        elif va != vb:
            out[f"{prefix}{k}"] = (va, vb)
    return out


def _format(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "+".join(_format(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_format(v)}" for k, v in value.items())
    return str(value)


def run_name(cfg: Config, base: Config | None = None, keys: Sequence[str] | None = None) -> str:
    """A stable, filesystem-safe name for `cfg`: `field=value` pairs joined by commas, for `keys` (default:
    the keys where it differs from `base`, default `Config()`). A field name that several sections share is
    written with its section. The name of `base` itself is "base"."""
    base = Config() if base is None else base
    keys = list(config_diff(base, cfg)) if keys is None else list(keys)
    if not keys:
        return "base"
    known = dotted_keys(cfg)
    for key in keys:
        if key not in known:
            cfg.replace(**{key: None})  # raises the ConfigError naming the close matches
    field_counts: dict[str, int] = {}
    for k in known:
        field_counts[k.partition(".")[2]] = field_counts.get(k.partition(".")[2], 0) + 1
    flat = flatten(cfg)
    parts = []
    for key in keys:
        label = key.partition(".")[2] if field_counts[key.partition(".")[2]] == 1 else key
        parts.append(f"{label}={_format(flat[key])}")
    return ",".join(parts).replace("/", "_").replace(" ", "")


def grid(base: Config, axes: Mapping[str, Sequence]) -> list[Config]:
    """Every combination of the axes' values applied to `base` (the first axis varies slowest), each one
    validated. Name them with `run_name(cfg, base, keys=list(axes))`: the names are unique."""
    if not axes:
        return [base]
    for key, values in axes.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
            raise ConfigError(f"grid axis {key!r} needs a non-empty list of values, got {values!r}")
        if len({_format(_plain(v)) for v in values}) != len(values):
            raise ConfigError(f"grid axis {key!r} repeats a value: {list(values)!r}")
    base.replace(**{k: v[0] for k, v in axes.items()})  # unknown keys fail before any config is built
    return [base.replace(**dict(zip(axes, combo, strict=True))) for combo in itertools.product(*axes.values())]
