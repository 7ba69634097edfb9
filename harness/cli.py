"""The ``ddsm-bench`` console script.

Each subcommand lives in its own module ``harness/cmd_<name>.py`` exposing ``register(subparsers)``;
they are imported explicitly (a broken command fails loudly instead of vanishing from ``--help``) and
keep their heavy imports (torch, ray, mlflow, optuna) inside the handlers, so ``ddsm-bench --help``
stays fast. Bad input (a :class:`ddsm.config.ConfigError`) exits 2 with one readable line, never a
traceback; a tracking store lost while a grid or study is being opened exits 3; Ctrl-C outside a grid
or study loop exits 130 (the codes: :mod:`harness.exit_codes`). No password of a URL reaches the
terminal: error lines and the traceback of an unexpected error are redacted (:func:`harness.secrets.redact`).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from harness.driver import TrackingLost

from ddsm.config import ConfigError
from harness import exit_codes
from harness.secrets import redact
from harness import cmd_evaluate, cmd_figures, cmd_models, cmd_profile, cmd_report, cmd_run, cmd_train, cmd_tune

# Order here is the order in `ddsm-bench --help`.
COMMANDS = (cmd_models, cmd_train, cmd_evaluate, cmd_profile, cmd_run, cmd_tune, cmd_report, cmd_figures)


class UsageError(ConfigError):
    """A CLI argument is invalid; printed as one line, exit code 2."""


def add_cluster_args(p: argparse.ArgumentParser, *, what: str) -> None:
    """The options ``run`` and ``tune`` share: --out, --address, --tracking-uri, --artifact-location, --dashboard,
    --max-concurrent, --tracking-outage-s.

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
    p.add_argument("--tracking-outage-s", type=float, default=None, metavar="SECONDS",
                   help="how long the tracking store may stay unreachable mid-run before the driver stops cleanly "
                   "(exit 3; writes are buffered meanwhile and the trials go on; default: the spec's "
                   "tracking_outage_s, 1800)")


def check_positive(**options: int | None) -> None:
    """Raise UsageError for an integer option given below 1 (``max_concurrent=0`` -> ``--max-concurrent=0``)."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value} is not allowed: expected an integer >= 1")


def check_seconds(**options: float | None) -> None:
    """Raise UsageError for a duration option given <= 0."""
    for name, value in options.items():
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')}={value:g} is not allowed: expected seconds > 0")


def check_tracking_store(uri: str | None) -> None:
    """ConfigError (exit 2, one line) when ``--tracking-uri`` names a server or database that does not answer,
    in seconds: ``run`` and ``tune`` call it before a spec's validation imports torch and builds models
    (``harness.session.preflight`` checks again for callers of ``run_grid``/``run_study``)."""
    if uri:
        from harness.preflight import check_tracking_uri

        check_tracking_uri(uri)


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
    previous = _sigterm_as_ctrl_c() if args.command in ("run", "tune") else None
    try:
        rc = args.func(args)
    except ConfigError as e:
        print(f"ddsm-bench {args.command}: error: {redact(str(e))}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except TrackingLost as e:
        print(f"ddsm-bench {args.command}: stopped: {redact(str(e))}; re-run the same command once the store "
              "is back", file=sys.stderr)
        return exit_codes.TRACKING_LOST
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see _sigterm_as_ctrl_c): say which when known
        print(f"ddsm-bench {args.command}: interrupted" + (f" by {e}" if str(e) else ""), file=sys.stderr)
        return exit_codes.INTERRUPTED
    except Exception:  # noqa: BLE001 - a bug: the traceback, with any password a URL in it carried hidden
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1  # not a code of harness.exit_codes: a bug, reported with its traceback
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


def _sigterm_as_ctrl_c():  # noqa: ANN202 - the previous handler, or None
    """Until the driver loop takes over, SIGTERM raises KeyboardInterrupt like Ctrl-C (a clean exit 130 from
    anywhere in the preamble); return the handler to restore (None: nothing changed, not the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    return signal.signal(signal.SIGTERM, handler)


def entry() -> None:
    """The ``ddsm-bench`` console script: :func:`main`, then exit with its code.

    Before exiting, every object is moved out of the garbage collector's reach (``gc.freeze``): the
    interpreter's last collections at exit would walk all of torch's, Ray's and MLflow's objects, ~1-2 s
    of every command's wall time here, to free memory the process is about to give back anyway; atexit
    handlers still run (MLflow's and Ray's flushes), and the command has closed its own files.
    """
    import gc

    rc = main()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
