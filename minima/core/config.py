"""Requests as frozen dataclasses: defaults ← TOML file ← command-line flags, help text, resume keys.

Every request of the toolkit (training, a sweep over coordinates, a measurement, an experiment's preset) is a
frozen dataclass whose fields are declared with :func:`setting`: a default, help text and a unit. From the fields
:func:`add_arguments` generates the command-line flags — ``--kebab-case`` with the type of the annotation
(``int``, ``float``, ``str``, ``Path``, a ``Literal`` as a choice, ``bool`` as ``--x/--no-x``, ``tuple[...]``/
``list[...]`` as several values, ``dict`` as JSON, ``X | None`` where the word ``none`` gives ``None``) and help
that shows the real default and unit; :func:`resolve` layers TOML values and given flags over the defaults
(unknown TOML keys are errors that list the valid keys, so a typo never falls back to a default).

:func:`resume_key` is the one fingerprint of settings that results are matched against when resuming, and
:func:`differences` says, field by field, how two sets of settings differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: A request type.
T = TypeVar("T")
_NO_DEFAULT = dataclasses.MISSING


def setting(default: Any = _NO_DEFAULT, help: str = "", *, unit: str = "", default_text: str | None = None,
            positional: bool = False, factory: Any = _NO_DEFAULT, switch: bool = False) -> Any:
    """A request field: ``default`` (or ``factory`` for mutable defaults), ``help`` (what it is), ``unit`` (shown
    after the help), ``default_text`` (how to describe the default where the value alone says too little, e.g.
    ``None`` meaning "all samples"), ``positional`` (a command-line argument without a flag), ``switch`` (a bool
    that is an action asked for, ``--yes``, with no ``--no-yes``)."""
    metadata = {"help": help, "unit": unit, "default_text": default_text, "positional": positional,
                "switch": switch}
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that answers a misspelled flag with the nearest real one ("did you mean
    --eval-batch-size?"), as Python 3.14's ``suggest_on_error`` does, on every Python."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 after the usage and ``message``; an unknown flag also names the nearest known ones."""
        if message.startswith("unrecognized arguments: "):
            flags = [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]
            hints = []
            for word in message.split(": ", 1)[1].split():
                near = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("--") else []
                if near:
                    hints.append(f"did you mean {near[0]} (not {word.split('=')[0]})?")
            message += "".join(f"; {h}" for h in hints)
        super().error(message)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; any other type → ``(type, False)``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _scalar_parser(tp: Any, optional: bool) -> Any:
    """A flag's parser: the type itself, or for a union such as ``int | Literal["full"]`` the first member that
    accepts the text (a Literal's own words, then the scalar types)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    members = typing.get_args(tp) if union else (tp,)

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        for member in members:
            if typing.get_origin(member) is Literal:
                if text in typing.get_args(member):
                    return text
                continue
            try:
                return member(text)
            except (TypeError, ValueError):
                continue
        words = [w for m in members if typing.get_origin(m) is Literal for w in typing.get_args(m)]
        kinds = [getattr(m, "__name__", str(m)) for m in members if typing.get_origin(m) is not Literal]
        raise argparse.ArgumentTypeError(f"{text!r} is neither {' nor '.join(kinds)}" +
                                         (f" nor one of {words}" if words else ""))

    parse.__name__ = "value" if union else getattr(tp, "__name__", "value")
    return parse


def parse_setting(tp: Any, text: str, what: str) -> Any:
    """A setting of type ``tp`` from its text (``key=value`` forms such as a probe's parameters): a number, a word of
    a ``Literal``, ``true``/``false`` for a bool, ``none`` for an optional one, several values of a tuple separated by
    ``/``; a ``ValueError`` naming ``what`` otherwise."""
    inner, optional = unwrap_optional(tp)
    if optional and text.lower() == "none":
        return None
    origin = typing.get_origin(inner)
    if inner is bool:
        words = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}
        if text.lower() not in words:
            raise ValueError(f"{what}: {text!r} is not true or false")
        return words[text.lower()]
    if origin in (tuple, list):
        return origin(parse_setting(typing.get_args(inner)[0], t, what) for t in text.split("/"))
    try:
        return _scalar_parser(inner, optional)(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _metavar(tp: Any) -> str:
    """How a flag's value is named in ``--help``: ``INT``, or ``INT|full`` for ``int | Literal["full"]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join("|".join(typing.get_args(m)) if typing.get_origin(m) is Literal
                        else getattr(m, "__name__", "value").upper() for m in typing.get_args(tp))
    return getattr(tp, "__name__", "value").upper()


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return " ".join(_show(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return "none" if value is None else str(value)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def help_text(f: dataclasses.Field) -> str:
    """A field's help as the command line shows it: text, unit, and the default."""
    meta = f.metadata
    text = meta.get("help", "")
    if meta.get("unit"):
        text += f" [{meta['unit']}]"
    default = _default_of(f)
    if meta.get("default_text"):
        text += f" (default: {meta['default_text']})"
    elif default is not _NO_DEFAULT:
        text += f" (default: {_show(default)})"
    return text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = (),
                  groups: Mapping[str, tuple[str, str]] | None = None) -> None:
    """One argument per field of dataclass ``cls``; flags default to ``None`` (= "not given", so TOML values and
    dataclass defaults apply), positional fields are required unless they have a default. ``groups`` (field → a
    title and a description) lists those fields' flags under their title in ``--help`` (e.g. each metric's
    parameters under its metric), after the others."""
    hints = typing.get_type_hints(cls)
    skip = set(skip)
    groups = dict(groups or {})
    made: dict[str, Any] = {}
    own = set(vars(cls).get("__annotations__", {}))  # a command's own settings first, shared (inherited) ones after
    for f in sorted(dataclasses.fields(cls), key=lambda f: (f.name in groups, f.name not in own)):
        if f.name in skip:
            continue
        group = groups.get(f.name)
        target: Any = parser
        if group is not None:
            if group[0] not in made:
                made[group[0]] = parser.add_argument_group(*group)
            target = made[group[0]]
        _add_field(target, f, hints)


def _add_field(parser: Any, f: dataclasses.Field, hints: dict[str, Any]) -> None:
    """The argument of one field (see :func:`add_arguments`)."""
    tp, optional = unwrap_optional(hints[f.name])
    doc = help_text(f)
    origin = typing.get_origin(tp)
    if f.metadata.get("positional"):
        many = origin in (tuple, list)
        elem = typing.get_args(tp)[0] if many else tp
        required = _default_of(f) is _NO_DEFAULT
        nargs = ("+" if required else "*") if many else ("?" if optional else None)
        parser.add_argument(f.name, nargs=nargs, type=elem, help=doc)
        return
    flag = "--" + f.name.replace("_", "-")
    if tp is bool and f.metadata.get("switch"):
        parser.add_argument(flag, action="store_const", const=True, default=None, help=doc)
    elif tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
    elif origin is Literal:
        parser.add_argument(flag, choices=typing.get_args(tp), default=None, help=doc)
    elif origin in (tuple, list) and typing.get_origin(typing.get_args(tp)[0]) is Literal:
        parser.add_argument(flag, nargs="+", choices=typing.get_args(typing.get_args(tp)[0]), default=None,
                            help=doc)
    elif origin in (tuple, list):
        elem = typing.get_args(tp)[0]
        parser.add_argument(flag, nargs="+", type=elem, default=None, metavar=elem.__name__.upper(), help=doc)
    elif tp is dict or origin is dict:
        parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=doc)
    else:
        parser.add_argument(flag, type=_scalar_parser(tp, optional), default=None, metavar=_metavar(tp), help=doc)


def coerce(cls: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` as keyword arguments of dataclass ``cls``: an unknown key is a ``ValueError`` naming ``where`` and
    the valid keys; lists become the field's tuple or list, strings its ``Path``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; valid settings: {sorted(names)}")
    out = {}
    for key, value in values.items():
        tp, _ = unwrap_optional(hints[key])
        origin = typing.get_origin(tp)
        if origin in (tuple, list) and isinstance(value, list | tuple):
            elem = typing.get_args(tp)[0]
            value = origin(Path(v) if elem is Path and isinstance(v, str) else v for v in value)
        elif tp is Path and isinstance(value, str):
            value = Path(value)
        out[key] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """The key/value pairs of a TOML preset (top-level table only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML ({exc})") from exc


def resolve(cls: type[T], toml_path: str | Path | None, cli: argparse.Namespace | Mapping[str, Any]) -> T:
    """An instance of ``cls``: dataclass defaults, overridden by the TOML file, overridden by every
    command-line value that was given (not ``None``)."""
    values: dict[str, Any] = {}
    if toml_path is not None:
        values.update(coerce(cls, load_toml(toml_path), str(toml_path)))
    given = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli)
    names = {f.name for f in dataclasses.fields(cls)}
    values.update(coerce(cls, {k: v for k, v in given.items() if k in names and v is not None}, "command line"))
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a request dataclass (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def resume_key(settings: Mapping[str, Any]) -> str:
    """The fingerprint that finished results are matched against on resume: 16 hex digits of the SHA-256 of the
    settings as sorted JSON (values that are not JSON types by their ``str``)."""
    text = json.dumps(dict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def join_negative_values(argv: Sequence[str], flags: Iterable[str]) -> list[str]:
    """``--flag -1:2:25`` → ``--flag=-1:2:25`` for the given flags: argparse would read a value that starts with
    '-' (a negative grid) as an option."""
    flags = set(flags)
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``"key: old → new"`` for every key whose value differs (keys in ``ignore`` skipped)."""
    skip = set(ignore)
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def add_deprecated(parser: argparse.ArgumentParser, renamed: Mapping[str, str]) -> None:
    """Hidden flags for old spellings (``renamed``: old field name → new field name), accepted for one release:
    ``--old`` takes the new flag's values; :func:`apply_deprecated` moves them over and says so."""
    flags = {a.dest: a for a in parser._actions}
    for old, new in renamed.items():
        target = flags[new]
        kwargs: dict[str, Any] = {"dest": f"deprecated_{old}", "default": None, "help": argparse.SUPPRESS}
        if target.choices is not None:
            kwargs["choices"] = target.choices
        if target.nargs is not None:
            kwargs["nargs"] = target.nargs
        if target.type is not None:
            kwargs["type"] = target.type
        parser.add_argument("--" + old.replace("_", "-"), **kwargs)


def apply_deprecated(args: argparse.Namespace, renamed: Mapping[str, str], prog: str) -> argparse.Namespace:
    """Move every given old-spelling flag's value to its new field, with one deprecation line on stderr each; both
    spellings given with different values is an error naming both."""
    for old, new in renamed.items():
        value = getattr(args, f"deprecated_{old}", None)
        delattr(args, f"deprecated_{old}")
        if value is None:
            continue
        old_flag, new_flag = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
        if getattr(args, new) is not None and getattr(args, new) != value:
            raise ValueError(f"{old_flag} (the old spelling of {new_flag}) and {new_flag} disagree; pass {new_flag} "
                             "only")
        print(f"[{prog}] {old_flag} is deprecated and will be removed in the next release; use {new_flag}",
              file=sys.stderr, flush=True)
        setattr(args, new, value)
    return args
