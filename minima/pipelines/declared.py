"""A pipeline's preset as a nested request over the library's own requests, with ``key=value`` overrides.

A pipeline (Keskar, the batch sweep, …) is a list of stages, each of which is one of the library's requests —
training (:class:`~minima.studies.train.TrainConfig`), a line (:class:`~minima.studies.interpolate.SweepRequest`), a
measurement (``MeasureRequest``), a surface, an alignment, a curve. Its preset is therefore not a flat list of renamed
fields but one TOML table per kind of stage whose keys *are* that request's fields, plus the pipeline's own few
settings at the top level::

    seeds = 1                 # the pipeline's own settings (its dataclass)
    [train]                   # any field of TrainConfig the pipeline does not set per stage itself
    epochs = 30
    [line]                    # any field of SweepRequest …
    train_subset = 5000

Layering: the pipeline's protocol (:attr:`Section.base`, e.g. the paper's Adam at lr 1e-3) ← the preset's TOML ←
command-line overrides ``train.lr=0.05`` / ``seeds=2``. Every key is checked against the request's fields before
anything runs; an unknown one is refused with its nearest spelling ("did you mean 'train.lr'?"), and a field the
pipeline sets per stage (a checkpoint, an output file, a batch size it sweeps) is refused naming who sets it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minima.core import config as cfg


@dataclass(frozen=True)
class Section:
    """One kind of stage: the library ``request`` class its table's keys are fields of, the pipeline's ``base``
    values (its protocol), and the fields the pipeline sets per stage (``owned``: refused in a preset)."""

    request: type
    base: Mapping[str, Any] = field(default_factory=dict)
    owned: frozenset[str] = frozenset()
    help: str = ""

    def valid(self) -> list[str]:
        """The request's fields a preset may set in this section (those the protocol does not own)."""
        return [f.name for f in dataclasses.fields(self.request) if f.name not in self.owned]


@dataclass(frozen=True)
class Spec:
    """A pipeline's preset schema: its name (``experiments/configs/pipelines/<name>_<preset>.toml``), its own
    settings (a dataclass of :func:`~minima.core.config.setting` fields) and its sections."""

    name: str
    own: type
    sections: Mapping[str, Section]


@dataclass(frozen=True)
class Declared:
    """A resolved preset: its name, the pipeline's own settings and every section's values (base ← TOML ←
    overrides)."""

    name: str
    own: Any
    sections: Mapping[str, Mapping[str, Any]]
    spec: Spec

    def request(self, section: str, **owned: Any) -> Any:
        """The section's request with the stage's own fields (checkpoints, output, …) set."""
        cls = self.spec.sections[section].request
        return cls(**cfg.coerce(cls, {**self.sections[section], **owned}, f"[{section}]"))

    def values(self, section: str) -> Mapping[str, Any]:
        """The resolved settings of ``section``."""
        return self.sections[section]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (``preset.json``): the name, the own settings, the sections."""
        return json.loads(json.dumps({"preset": self.name, **cfg.to_dict(self.own),
                                      **{k: dict(v) for k, v in self.sections.items()}}, default=str))


def _refuse_unknown(key: str, valid: Sequence[str], where: str) -> None:
    near = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(valid)}"
    raise ValueError(f"{where}: unknown key {key!r}{hint}")


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def parse_value(cls: type, name: str, text: str, what: str) -> Any:
    """An override's text as the value of field ``name`` of ``cls``: JSON for a dict, otherwise as
    :func:`~minima.core.config.parse_setting` reads it (numbers, words, ``none``, ``a/b`` for several values)."""
    tp = _field_type(cls, name)
    inner, _ = cfg.unwrap_optional(tp)
    if inner is dict or typing.get_origin(inner) is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{what}: {text!r} is not a JSON object, e.g. '{{\"widths\": [16]}}'") from None
    return cfg.parse_setting(tp, text, what)


def load(spec: Spec, directory: Path, name_or_path: str, overrides: Sequence[str] = ()) -> Declared:
    """The preset ``<directory>/<spec.name>_<name>.toml`` (or a TOML file's path) over the sections' bases, then
    ``overrides`` (``section.key=value`` or ``key=value`` for the pipeline's own settings). ``ValueError`` with one
    line for a missing preset, an unknown table or key, a key the pipeline sets itself, or a malformed override."""
    path = Path(directory) / f"{spec.name}_{name_or_path}.toml"
    if not path.is_file():
        path = Path(name_or_path)
        if not path.is_file():
            names = sorted(p.stem[len(spec.name) + 1:] for p in Path(directory).glob(f"{spec.name}_*.toml"))
            raise ValueError(f"no preset {name_or_path!r}: give one of {names} or a TOML file's path")
    name = name_or_path if path.parent == Path(directory) else path.stem
    raw = cfg.load_toml(path)
    own_names = [f.name for f in dataclasses.fields(spec.own)]
    every = own_names + [f"{s}.{k}" for s, sec in spec.sections.items() for k in sec.valid()]
    own: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: dict(sec.base) for s, sec in spec.sections.items()}
    for key, value in raw.items():
        if key in spec.sections:
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {key!r} must be a table [{key}]")
            for k, v in value.items():
                _check_key(spec, key, k, every, str(path))
                sections[key][k] = v
        elif key in own_names:
            own[key] = value
        else:
            _refuse_unknown(key, every + list(spec.sections), str(path))
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ValueError(f"override {text!r}: write KEY=VALUE, e.g. train.lr=0.05 or seeds=2")
        section, dot, k = key.rpartition(".")
        if dot and section in spec.sections:
            _check_key(spec, section, k, every, "command line")
            sections[section][k] = parse_value(spec.sections[section].request, k, value, f"override {text!r}")
        elif not dot and key in own_names:
            own[key] = parse_value(spec.own, key, value, f"override {text!r}")
        else:
            _refuse_unknown(key, every, "command line")
    own_obj = spec.own(**cfg.coerce(spec.own, own, str(path)))
    declared = Declared(name=name, own=own_obj, spec=spec,
                        sections={s: cfg.coerce(spec.sections[s].request, v, f"[{s}]") for s, v in sections.items()})
    return declared


def _check_key(spec: Spec, section: str, key: str, every: Sequence[str], where: str) -> None:
    sec = spec.sections[section]
    if key in sec.owned:
        raise ValueError(f"{where}: {section}.{key} is set by the {spec.name} pipeline for each stage, not by a "
                         "preset")
    if key not in sec.valid():
        _refuse_unknown(f"{section}.{key}", every, where)
