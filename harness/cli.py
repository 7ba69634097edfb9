"""The ``ddsm-bench`` console script.

Each subcommand lives in its own module ``harness/cmd_<name>.py`` exposing
``register(subparsers)``; heavy imports (torch, ray, mlflow, optuna) happen inside the handlers so
``ddsm-bench --help`` stays fast. Bad input (a :class:`ddsm.config.ConfigError`) exits 2 with one
readable line, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ddsm.config import ConfigError

# Order here is the order in `ddsm-bench --help`.
COMMANDS = ["models", "train", "evaluate", "profile", "run", "tune", "report"]


class UsageError(ConfigError):
    """A CLI argument is invalid; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand whose module exists."""
    parser = argparse.ArgumentParser(prog="ddsm-bench", description="DDSM benchmarking and ablation harness")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"harness.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name == f"harness.cmd_{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the subcommand, map bad input to exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"ddsm-bench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddsm-bench {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
