"""The ``bsbr`` command.  Each module in ``_MODULES`` adds its subcommands through ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands; each defines register(subparsers) and sets ``func`` on its parsers.
_MODULES = ["bsbr.demo", "bsbr.train.cli", "bsbr.evals.cli", "bsbr.convert.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bsbr",
        description="BSBR: Block Sparse attention with Block Retrieval — models, baselines and measurements.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:  # bad input: say what, not a traceback
        print(f"bsbr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`bsbr analyze ... | head`): stop quietly, as Unix tools do
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush of stdout must not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
