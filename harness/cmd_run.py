"""``ddsm-bench run SPEC``: run an ablation grid on Ray, tracked in MLflow, resumable.

Changing only ``eval.*`` or ``data.val_split`` and re-running scores every finished cell again from its
final checkpoint (nothing is trained); ``--reevaluate`` forces that for every finished cell.

Exit codes (harness/exit_codes.py): 0 every cell finished, 1 some cells failed after their retries
(the others completed), 2 bad input or a service that does not answer at start (spec, data files, --out
or --out held by another driver, resources, storage, tracking store, Ray cluster; nothing was launched),
3 the tracking store stayed unreachable past --tracking-outage-s (finished cells are on disk, running
ones checkpointed, buffered writes journaled), 4 the Ray cluster was lost, 130 interrupted (Ctrl-C /
SIGTERM: running cells checkpoint and are marked KILLED). After 3, 4 and 130, re-run the same command:
it records everything and resumes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run", "dry_run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    from harness.cli import add_cluster_args

    p = sub.add_parser("run", help="run an ablation grid (spec file) on Ray, tracked in MLflow, resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="ablation spec, e.g. ablations/quickstart.yaml")
    add_cluster_args(p, what="grid")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs; synthetic data stands in "
                   "for a dataset that is absent; logged to the experiment <name>-smoke")
    p.add_argument("--dry-run", action="store_true", help="print the cells, what differs from the baseline and a "
                   "cost estimate; launch nothing")
    p.add_argument("--log-checkpoints", action="store_true", help="upload each cell's last checkpoint to MLflow")
    p.add_argument("--reevaluate", action="store_true", help="score every finished cell again from its final "
                   "checkpoint with the spec's eval settings (train nothing); cells whose eval.* or data.val_split "
                   "changed are re-evaluated without it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the spec, then dry-run or run the grid; return the exit code."""
    from harness.cli import check_positive, check_seconds, check_tracking_store
    from harness.spec import load_spec

    check_positive(max_concurrent=args.max_concurrent)
    check_seconds(tracking_outage_s=args.tracking_outage_s)
    if not args.dry_run:  # a dry run needs no store
        check_tracking_store(args.tracking_uri)
    spec = load_spec(args.spec, smoke=args.smoke, check_paths=args.address is None)
    if args.dry_run:
        dry_run(spec)
        return 0
    from harness.grid import run_grid

    out = Path(args.out) if args.out else Path("runs") / spec.name
    summary = run_grid(spec, out_dir=out, address=args.address, tracking_uri=args.tracking_uri,
                       max_concurrent=args.max_concurrent, log_checkpoints=args.log_checkpoints,
                       artifact_location=args.artifact_location, dashboard=args.dashboard,
                       reevaluate=args.reevaluate, tracking_outage_s=args.tracking_outage_s)
    return summary.exit_code


def dry_run(spec) -> list[dict]:  # noqa: ANN001 - GridSpec
    """Print every cell (hash, name, what differs from its reference baseline) and the grid's cost.

    Cost: forward GFLOPs per image at the crop size (counted on the meta device: no memory, no
    weights), and training TFLOPs per trial ~= 3 x forward x global batch x steps (backward ~= 2x
    forward). Returns the printed rows (:func:`harness.cells.dry_run_rows`).
    """
    from harness.cells import dry_run_rows, expand
    from harness.console import print_dry_run

    rows = dry_run_rows(spec, expand(spec))
    print_dry_run(spec, rows)
    return rows
