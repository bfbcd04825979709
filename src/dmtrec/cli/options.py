"""Command-line options derived from config dataclasses (``dmtrec.options.option`` fields).

``add_dataclass`` adds one ``--flag`` per field with the field's type, default, help, choices
and aliases; ``from_args`` builds the dataclass back from the parsed namespace. YAML files
(``--config``) are typed and checked by the same converters, so ``epochs: 1.5`` in a YAML file
and ``--epochs 1.5`` on the command line get the same one-line error, naming the file and key.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from dmtrec.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Invalid(ValueError):
    """A value that does not fit its option; the message says what was expected."""


def _base(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _scalar(tp: type, value: Any) -> Any:
    """``value`` (a str from the command line, or a YAML scalar) as ``tp``."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise Invalid(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise Invalid(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise Invalid(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise Invalid(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise Invalid(f"expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):  # YAML 5 or true for a name: quote it if meant
            raise Invalid(f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported option type {tp!r}")


def convert(f: Field, value: Any) -> Any:
    """``value`` converted and checked for field ``f`` (choices, bounds); raises ``Invalid``."""
    tp, optional = _base(f.type if not isinstance(f.type, str) else _resolve(f))
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise Invalid("a value is required")
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            parts = [x.strip() for x in value.split(",") if x.strip()]
        elif isinstance(value, list):
            parts = value
        else:
            parts = [value]
        out = [_scalar(item, x) for x in parts]
    else:
        out = _scalar(tp, value)
    meta = f.metadata
    values = out if isinstance(out, list) else [out]
    if meta.get("choices") is not None:
        for v in values:
            if v not in meta["choices"]:
                raise Invalid(f"unknown {v!r}; choose from {', '.join(map(str, meta['choices']))}")
    for v in values:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and math.isnan(v):
                raise Invalid("expected a number, got nan")
            lo, hi = meta.get("minimum"), meta.get("maximum")
            if lo is not None and v < lo:
                raise Invalid(f"must be >= {lo:g}, got {v:g}")
            if hi is not None and v > hi:
                raise Invalid(f"must be <= {hi:g}, got {v:g}")
    return out


_HINTS: dict[type, dict[str, Any]] = {}
_OWNER: dict[int, type] = {}  # id(field) -> its dataclass (Field has __slots__)


def _resolve(f: Field) -> Any:
    """Field types are strings under ``from __future__ import annotations``: resolve them."""
    owner = _OWNER.get(id(f))
    if owner is None:
        raise TypeError(f"field {f.name} has no owner")
    if owner not in _HINTS:
        _HINTS[owner] = typing.get_type_hints(owner)
    return _HINTS[owner][f.name]


def flag_of(f: Field) -> str:
    """The long option of a field: ``metadata['flag']`` or the name with dashes."""
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


def cli_fields(cls: type, exclude: Iterable[str] = ()) -> list[Field]:
    """The fields of ``cls`` that are options (``cli=True`` and not excluded)."""
    out = []
    skip = set(exclude)
    for f in fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) or "help" not in f.metadata:
            continue
        _OWNER[id(f)] = cls
        out.append(f)
    return out


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


class Registry:
    """Which parser destination belongs to which field, for ``from_args`` and YAML."""

    def __init__(self) -> None:
        self.by_dest: dict[str, Field] = {}
        self.by_key: dict[str, str] = {}  # YAML key (flag name, either spelling) -> dest
        # options that are no dataclass field (e.g. --towers K|FILE): name -> converter
        self.extra: dict[str, Callable[[Any], Any]] = {}

    def add(self, dest: str, f: Field, names: list[str]) -> None:
        self.by_dest[dest] = f
        for n in names:
            key = n.lstrip("-")
            self.by_key[key] = dest
            self.by_key[key.replace("-", "_")] = dest


def add_dataclass(
    parser: argparse.ArgumentParser,
    cls: type,
    registry: Registry,
    *,
    title: str,
    exclude: Iterable[str] = (),
    prefix: str = "",
) -> None:
    """One option per field of ``cls``: ``--flag`` with the field's default, type and help."""
    group = parser.add_argument_group(title)
    for f in cli_fields(cls, exclude):
        flag = flag_of(f)
        names = [flag] + ["--" + a for a in f.metadata.get("aliases", ())]
        dest = prefix + f.name
        tp, _ = _base(_resolve(f))
        default = _default(f)
        help_text = f.metadata["help"]
        if f.metadata.get("aliases"):
            help_text += f" (old name: {', '.join('--' + a for a in f.metadata['aliases'])})"
        kwargs: dict[str, Any] = dict(dest=dest, default=default, help=help_text)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _arg_type(f, flag)
            kwargs["metavar"] = _metavar(f, tp)
            if typing.get_origin(tp) is list:  # --crs 1,2,4 or --crs 1 2 4
                kwargs["nargs"] = "+"
                kwargs["action"] = _Extend if f.name in ("train", "valid", "test") else _Flatten
        if tp is bool:
            kwargs["help"] += f" (default: {'on' if default else 'off'})"
        else:
            kwargs["help"] += f" (default: {_show(default)})"
        group.add_argument(*names, **kwargs)
        registry.add(dest, f, names)


def _metavar(f: Field, tp: Any) -> str:
    if f.metadata.get("choices") is not None:
        return "{" + ",".join(map(str, f.metadata["choices"])) + "}"
    if typing.get_origin(tp) is list:
        return "LIST"
    return {int: "N", float: "X", str: "S"}.get(tp, "V")


def _arg_type(f: Field, flag: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(f, text)
        except Invalid as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = flag  # argparse names the type in some messages
    return parse


class _Flatten(argparse.Action):
    """A list option: each argument is a comma list; ``--x 1,2 3`` -> [1, 2, 3]."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [v for part in values for v in part])


class _Extend(argparse.Action):
    """Repeatable file options: ``--train a --train b`` (or ``a,b``) -> [a, b]."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *(v for part in values for v in part)])


def from_args(cls: type, args: argparse.Namespace, prefix: str = "", **extra: Any) -> Any:
    """An instance of ``cls`` from the parsed options (non-option fields from ``extra``)."""
    kwargs = dict(extra)
    for f in fields(cls):
        dest = prefix + f.name
        if f.name not in kwargs and hasattr(args, dest):
            kwargs[f.name] = getattr(args, dest)
    return cls(**kwargs)


def apply_yaml(
    parser: argparse.ArgumentParser, registry: Registry, argv: list[str]
) -> argparse.Namespace:
    """Parse ``argv``; values of ``--config FILE`` (keys: the long options) become defaults
    that the command line overrides. Each value is typed and checked like its option."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {path}: is a directory, expected a YAML file")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    defaults: dict[str, Any] = {}
    for key, value in doc.items():
        dest = registry.by_key.get(str(key))
        extra = registry.extra.get(str(key).replace("_", "-"))
        if dest is None and extra is None:
            raise ConfigError(f"{path}: unknown option {key!r}")
        try:
            if dest is not None:
                defaults[dest] = convert(registry.by_dest[dest], value)
            else:
                defaults[str(key).replace("-", "_")] = extra(value)
        except Invalid as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)
