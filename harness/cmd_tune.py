"""``ddsm-bench tune SPEC``: tune hyperparameters with Optuna (TPE / NSGA-II), trials on Ray, resumable.

The spec is a run spec (base, resources, one seed, smoke) plus a ``search`` section: parameters,
objective(s), budget, concurrency, pruning and storage (see harness/tune_spec.py and
ablations/tune_quickstart.yaml). Re-running the same command continues the study.

Trials validate on minival (held out of the train split) unless the spec sets data.val_split; the
exported best.yaml reports search.confirm_split (val). Tuning on the split that is reported exits 2
unless --tune-on-confirm-split is given (then it is printed as a warning and recorded).

Exit codes (harness/exit_codes.py): 0 the budget is reached and at least one trial completed, 1 no
trial completed, 2 bad input or a service that does not answer at start (spec, search space, --out or
--out held by another driver, resources, storage, tracking store, Ray cluster; nothing was launched),
3 the tracking store stayed unreachable past --tracking-outage-s, 4 the Ray cluster was lost, 130
interrupted (Ctrl-C / SIGTERM: finished trials are kept, running ones checkpoint, are marked FAIL and
re-queued). After 3, 4 and 130, re-run to resume.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "tune"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tune`` subcommand."""
    from harness.cli import add_cluster_args

    p = sub.add_parser("tune", help="tune hyperparameters (Optuna on Ray, pruning, Pareto fronts), resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="tune spec, e.g. ablations/tune_quickstart.yaml")
    add_cluster_args(p, what="study")
    p.add_argument("--n-trials", type=int, default=None,
                   help="budget: trials that reached a verdict, all runs of the study together "
                   "(default search.n_trials, or search.smoke_trials with --smoke)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs, the smoke_trials budget, "
                   "study <name>-smoke; synthetic data stands in for a dataset that is absent")
    p.add_argument("--tune-on-confirm-split", action="store_true", help="allow the trials to validate on the split "
                   "best.yaml reports (search.confirm_split): its numbers are then optimistic; warned and recorded "
                   "in the study's provenance and in best.yaml")
    p.set_defaults(func=tune)


def tune(args: argparse.Namespace) -> int:
    """Validate the spec and the options, run (or continue) the study; return the exit code."""
    from harness.cli import check_positive, check_seconds, check_tracking_store
    from harness.tune_spec import load_tune_spec

    check_positive(max_concurrent=args.max_concurrent, n_trials=args.n_trials)
    check_seconds(tracking_outage_s=args.tracking_outage_s)
    check_tracking_store(args.tracking_uri)
    spec = load_tune_spec(args.spec, smoke=args.smoke, check_paths=args.address is None,
                          allow_leak=args.tune_on_confirm_split)
    from harness.study import run_study

    out = Path(args.out) if args.out else Path("runs") / spec.name
    summary = run_study(spec, out_dir=out, address=args.address, tracking_uri=args.tracking_uri,
                        max_concurrent=args.max_concurrent, n_trials=args.n_trials,
                        artifact_location=args.artifact_location, dashboard=args.dashboard,
                        tracking_outage_s=args.tracking_outage_s)
    return summary.exit_code
