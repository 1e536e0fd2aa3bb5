"""Frozen-dataclass configuration: defaults ← TOML file ← command-line flags.

Each field of a config dataclass becomes a ``--kebab-case`` flag whose type follows the annotation
(``int``, ``float``, ``str``, ``bool`` as ``--x/--no-x``, ``tuple[...]`` as several values, ``dict`` as
JSON, and ``X | None`` for optional values, where the word ``none`` gives ``None``). Unknown keys in a TOML
file are errors that list the valid keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        return tp(text)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (default ``None`` = "not given")."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        elif typing.get_origin(tp) is tuple:
            (elem, *_rest) = typing.get_args(tp)
            parser.add_argument(flag, nargs="*", type=elem, default=None, help=doc)
        elif tp is dict or typing.get_origin(tp) is dict:
            parser.add_argument(flag, type=json.loads, default=None, help=doc + " (JSON)")
        else:
            parser.add_argument(flag, type=_scalar_parser(tp, optional), default=None, help=doc)


def _coerce(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; valid settings: {sorted(names)}")
    out = {}
    for key, value in values.items():
        tp, _ = _unwrap_optional(hints[key])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a TOML preset (top-level table only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        return tomllib.load(f)


def resolve(cls: type[T], toml_path: str | Path | None, cli: argparse.Namespace | dict[str, Any]) -> T:
    """An instance of ``cls``: dataclass defaults, overridden by the TOML file, overridden by every
    command-line value that was given (not ``None``)."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(_coerce(cls, load_toml(toml_path), str(toml_path)))
    given = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update(_coerce(cls, {k: v for k, v in given.items() if k in names and v is not None}, "command line"))
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
