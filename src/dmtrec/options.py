"""Declaring a config field once: default, help, choices, aliases.

The config dataclasses (``DataConfig``, ``ModelConfig``, ``TrainConfig``, ...) declare each
field with ``option(...)``; the CLI (``dmtrec.cli.options``) derives its ``--flags``, their
help text and defaults, and the typing of YAML values from these declarations, so nothing is
written twice. This module has no dependencies: models/, data/ and parallel/ may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, field
from typing import Any


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    flag: str | None = None,
    cli: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field carrying its CLI metadata.

    ``flag``: the option's name when it is not the field name with dashes; ``aliases``: old
    names still accepted (deprecated); ``cli=False``: set by code only; ``minimum`` /
    ``maximum``: inclusive bounds checked for the command line and YAML alike.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "aliases": tuple(aliases),
        "flag": flag,
        "cli": cli,
        "minimum": minimum,
        "maximum": maximum,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
