"""``dmtrec`` command line: train, partition, demo, simulate, bench.

Every command that trains or measures writes a JSON of what it measured into ``--out``.
Options are derived from the config dataclasses (``cli/options.py``); commands are a table
(``COMMANDS``). User errors print one line (``dmtrec: error: ...``) and exit 2; never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from dmtrec.cli import commands
from dmtrec.errors import DmtrecError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dmtrec: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"dmtrec: error: {self.prog.removeprefix('dmtrec ')}: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], Any]]:
    """The parser of every command, and each command's (registry, run) by its name path."""
    parser = _Parser(prog="dmtrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    table: dict[tuple[str, ...], Any] = {}
    groups: dict[str, Any] = {}
    for path, spec in commands.COMMANDS.items():
        if len(path) == 1:
            p = sub.add_parser(path[0], help=spec.help, description=spec.help)
        else:
            if path[0] not in groups:
                gp = sub.add_parser(path[0], help=commands.GROUPS[path[0]])
                groups[path[0]] = gp.add_subparsers(dest="sub", required=True, parser_class=_Parser)
            p = groups[path[0]].add_parser(path[1], help=spec.help, description=spec.help)
        registry = spec.add(p)
        table[path] = (p, registry, spec.run)
    return parser, table


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmtrec`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser, table = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0)
        path = (args.command,) + ((args.sub,) if getattr(args, "sub", None) else ())
        sub_parser, registry, run = table[path]
        if "config" in vars(args):  # YAML values typed by the options they set
            from dmtrec.cli.options import apply_yaml

            try:
                args = apply_yaml(sub_parser, registry, argv[len(path) :])
            except SystemExit as e:
                return int(e.code or 0)
        from dmtrec.parallel.launch import quiet_libraries

        quiet_libraries()
        run_fn: Callable[[argparse.Namespace], int] = run
        return run_fn(args)
    except DmtrecError as e:
        print(f"dmtrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dmtrec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - never a bare traceback to a user
        if os.environ.get("DMTREC_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        from dmtrec.parallel.launch import lost_peer

        if lost_peer(e):  # under torchrun: a peer died or hung (its own log says why)
            print(
                f"dmtrec: error: rank {os.environ.get('RANK', '?')} lost its peers in a "
                f"collective (another rank died or hung): {msg}",
                file=sys.stderr,
            )
            return 1
        print(
            f"dmtrec: internal error: {type(e).__name__}: {msg} (DMTREC_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
