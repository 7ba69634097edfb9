"""``ddsm-bench report``: tables (Markdown, LaTeX, CSV) and figures (PNG) of a grid from its MLflow runs.

    ddsm-bench report --experiment quickstart --tracking-uri sqlite:///runs/quickstart/mlflow.db --out out/report
    ddsm-bench report --run <parent run id> --tracking-uri runs/quickstart/mlflow.db --out out/report

The tracking URI defaults to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the current
directory; a path to a ``.db`` file or to a grid's ``--out`` folder reads that SQLite store. A missing
SQLite file, an unknown experiment or run exits 2 with one line.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = sub.add_parser("report", help="tables and figures of a grid from its MLflow runs")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", metavar="NAME",
                       help="MLflow experiment (the spec name): every grid launch in it")
    which.add_argument("--run", metavar="PARENT_ID", help="one grid's parent run id: only its cells")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI, path to mlflow.db or a grid's out folder (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current directory)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; files are overwritten)")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="variant that deltas are taken against (default: the spec's baseline)")
    p.add_argument("--method", choices=["ttest", "bootstrap"], default="ttest",
                   help="significance test over seeds (default: paired t-test)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the runs, write the report, print where it went."""
    from harness.mlflow_io import write_report_from_mlflow

    written = write_report_from_mlflow(args.tracking_uri, experiment=args.experiment, parent_run_id=args.run,
                                       out_dir=args.out, baseline=args.baseline, method=args.method,
                                       alpha=args.alpha)
    print(f"wrote {written['report.md']} and {len(written) - 1} tables/figures under {args.out}")
    return 0
