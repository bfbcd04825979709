"""Options of a function's keyword arguments (benchmarks, the simulator): the defaults come
from the signature, so they are written once, next to the code that uses them."""

from __future__ import annotations

import inspect
import typing
from dataclasses import make_dataclass
from typing import Any

from dmtrec.options import option


def _as_option_type(tp: Any) -> Any:
    """``tuple[int, ...]`` -> ``list[int]`` (parsed as a comma list); other types unchanged."""
    if typing.get_origin(tp) is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return list[args[0]]  # type: ignore[valid-type]
    return tp


def signature_config(
    fn: Any,
    help: dict[str, str],
    *,
    exclude: tuple[str, ...] = (),
    choices: dict[str, tuple] | None = None,
    minimum: dict[str, float] | None = None,
) -> type:
    """A dataclass with one ``option`` per keyword-only argument of ``fn`` (minus ``exclude``),
    default from the signature, help from ``help`` (every option must have one)."""
    hints = typing.get_type_hints(fn)
    specs = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or name in exclude:
            continue
        default = p.default
        if isinstance(default, tuple):
            default = list(default)
        kw = dict(
            help=help[name], choices=(choices or {}).get(name), minimum=(minimum or {}).get(name)
        )
        if isinstance(default, list):
            value = option(factory=lambda d=default: list(d), **kw)
        else:
            value = option(default, **kw)
        specs.append((name, _as_option_type(hints[name]), value))
    cls = make_dataclass(f"{fn.__name__}_options", specs)
    cls.__module__ = fn.__module__
    return cls


def call_kwargs(fn: Any, cfg: Any) -> dict[str, Any]:
    """``cfg``'s values as keyword arguments of ``fn`` (lists back to tuples where declared)."""
    hints = typing.get_type_hints(fn)
    out = {}
    for name in cfg.__dataclass_fields__:
        v = getattr(cfg, name)
        if typing.get_origin(hints.get(name)) is tuple and isinstance(v, list):
            v = tuple(v)
        out[name] = v
    return out
