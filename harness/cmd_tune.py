"""``ddsm-bench tune SPEC``: tune hyperparameters with Optuna (TPE / NSGA-II), trials on Ray, resumable.

The spec is a run spec (base, resources, seeds, smoke) plus a ``search`` section: parameters,
objective(s), budget, concurrency, pruning and storage (see harness/search_space.py and
ablations/tune_quickstart.yaml). Re-running the same command continues the study.

Exit codes: 0 the budget is reached and at least one trial completed, 1 no trial completed, 2 bad
input (spec, search space, resources, storage; nothing was launched), 130 interrupted (Ctrl-C /
SIGTERM: finished trials are kept, running ones are marked FAIL and re-queued; re-run to resume).
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "tune"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tune`` subcommand."""
    p = sub.add_parser("tune", help="tune hyperparameters (Optuna on Ray, pruning, Pareto fronts), resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="tune spec, e.g. ablations/tune_quickstart.yaml")
    p.add_argument("--out", default=None, help="output folder (default runs/<spec name>); re-use it to continue")
    p.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto or ray://head:10001 "
                   "(default: start a local Ray instance)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials in flight at once (default search.concurrency, else what the cluster fits)")
    p.add_argument("--n-trials", type=int, default=None,
                   help="budget: trials that reached a verdict, all runs of the study together "
                   "(default search.n_trials, or search.smoke_trials with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs, the smoke_trials budget, "
                   "study <name>-smoke; synthetic data stands in for a dataset that is absent")
    p.set_defaults(func=tune)


def tune(args: argparse.Namespace) -> int:
    """Validate the spec and the options, run (or continue) the study; return the exit code."""
    from harness.cli import UsageError
    from harness.search_space import load_tune_spec

    for flag, value in (("--max-concurrent", args.max_concurrent), ("--n-trials", args.n_trials)):
        if value is not None and value < 1:
            raise UsageError(f"{flag}={value} is not allowed: expected an integer >= 1")
    spec = load_tune_spec(args.spec)
    from harness.tune import run_study

    out = Path(args.out) if args.out else Path("runs") / spec.name
    summary = run_study(spec, out_dir=out, address=args.address, tracking_uri=args.tracking_uri,
                        max_concurrent=args.max_concurrent, smoke=args.smoke, n_trials=args.n_trials)
    return summary.exit_code
