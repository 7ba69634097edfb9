"""The ``ddsm-bench`` console script.

Each subcommand lives in its own module ``harness/cmd_<name>.py`` exposing ``register(subparsers)``;
they are imported explicitly (a broken command fails loudly instead of vanishing from ``--help``) and
keep their heavy imports (torch, ray, mlflow, optuna) inside the handlers, so ``ddsm-bench --help``
stays fast. Bad input (a :class:`ddsm.config.ConfigError`) exits 2 with one readable line, never a
traceback; Ctrl-C outside a grid or study loop exits 130. No password of a URL reaches the terminal:
error lines and the traceback of an unexpected error are redacted (:func:`harness.secrets.redact`).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from ddsm.config import ConfigError
from harness.secrets import redact
from harness import cmd_evaluate, cmd_figures, cmd_models, cmd_profile, cmd_report, cmd_run, cmd_train, cmd_tune

# Order here is the order in `ddsm-bench --help`.
COMMANDS = (cmd_models, cmd_train, cmd_evaluate, cmd_profile, cmd_run, cmd_tune, cmd_report, cmd_figures)


class UsageError(ConfigError):
    """A CLI argument is invalid; printed as one line, exit code 2."""


def add_cluster_args(p: argparse.ArgumentParser, *, what: str) -> None:
    """The options ``run`` and ``tune`` share: --out, --address, --tracking-uri, --artifact-location, --dashboard,
    --max-concurrent.

    ``what`` names the thing being run in the help ("grid", "study").
    """
    again = "resume" if what == "grid" else "continue"
    p.add_argument("--out", default=None, help=f"output folder (default runs/<spec name>); re-use it to {again}")
    p.add_argument("--address", default=None, help="Ray cluster to join: HEAD:PORT (the head's GCS port, 6379 by "
                   "default) or auto (RAY_ADDRESS, else the last `ray start` on this machine); a token-auth cluster "
                   "needs RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (default: start a local Ray instance)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI: http(s)://server:5000, a database "
                   "(postgresql://user@host/db; password from PGPASSWORD or ~/.pgpass), sqlite:///file.db "
                   "(default sqlite:///<out>/mlflow.db)")
    p.add_argument("--artifact-location", default=None, metavar="URI", help="where a new MLflow experiment keeps "
                   "its artifacts: a shared path or s3://... (default <out>/mlartifacts; with an http(s) tracking "
                   "URI the server's default)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with the local Ray instance "
                   "(on 127.0.0.1; its URL is printed at start); a joined cluster's dashboard is printed when it has one")
    default = "search.concurrency, else what the cluster fits" if what == "study" else \
        "as many as the cluster's resources allow"
    p.add_argument("--max-concurrent", type=int, default=None, help=f"trials in flight at once (default: {default})")


def check_positive(**options: int | None) -> None:
    """Raise UsageError for an integer option given below 1 (``max_concurrent=0`` -> ``--max-concurrent=0``)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value} is not allowed: expected an integer >= 1")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="ddsm-bench", description="DDSM benchmarking and ablation harness")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the subcommand, map bad input to exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"ddsm-bench {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return 2  # exit_codes.BAD_INPUT
    except KeyboardInterrupt:
        print(f"ddsm-bench {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: the traceback, with any password a URL in it carried hidden
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
