"""``ddsm-bench run SPEC``: run an ablation grid on Ray, tracked in MLflow, resumable.

Exit codes: 0 every cell finished, 1 some cells failed after their retries (the others completed),
2 bad input (spec, resources, storage; nothing was launched), 130 interrupted (Ctrl-C / SIGTERM:
running cells are marked KILLED; re-run the same command to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

__all__ = ["register", "run", "dry_run"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    p = sub.add_parser("run", help="run an ablation grid (spec file) on Ray, tracked in MLflow, resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="ablation spec, e.g. ablations/quickstart.yaml")
    p.add_argument("--out", default=None, help="output folder (default runs/<spec name>); re-use it to resume")
    p.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto or ray://head:10001 "
                   "(default: start a local Ray instance)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials in flight at once (default: as many as the cluster's resources allow)")
    p.add_argument("--smoke", action="store_true", help="a few steps on tiny inputs; synthetic data stands in "
                   "for a dataset that is absent; logged to the experiment <name>-smoke")
    p.add_argument("--dry-run", action="store_true", help="print the cells, what differs from the baseline and a "
                   "cost estimate; launch nothing")
    p.add_argument("--log-checkpoints", action="store_true", help="upload each cell's last checkpoint to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the spec, then dry-run or run the grid; return the exit code."""
    from harness.cli import UsageError
    from harness.spec import load_spec

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UsageError(f"--max-concurrent={args.max_concurrent} is not allowed: expected an integer >= 1")
    spec = load_spec(args.spec)
    if args.dry_run:
        dry_run(spec, smoke=args.smoke, check_paths=args.address is None)
        return 0
    from harness.ray_runner import run_grid

    out = Path(args.out) if args.out else Path("runs") / spec.name
    summary = run_grid(spec, out_dir=out, address=args.address, tracking_uri=args.tracking_uri,
                       max_concurrent=args.max_concurrent, smoke=args.smoke, log_checkpoints=args.log_checkpoints)
    return summary.exit_code


def dry_run(spec, *, smoke: bool = False, check_paths: bool = True) -> list[dict]:  # noqa: ANN001 - GridSpec
    """Print every cell (hash, name, what differs from its reference baseline) and the grid's cost.

    Cost: forward GFLOPs per image at the crop size (counted on the meta device: no memory, no
    weights), and training TFLOPs per trial ~= 3 x forward x global batch x steps (backward ~= 2x
    forward). Returns the printed rows.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from harness.spec import config_diff, effective_resources, expand, reference_config

    cells = expand(spec, smoke=smoke, check_paths=check_paths)
    res = effective_resources(spec, smoke=smoke)
    table = Table(title=f"{spec.name}: {len(cells)} cells ({len(spec.seeds)} seeds), reference {spec.baseline!r}, "
                  f"{res.num_workers} worker(s) x ({res.cpus:g} CPU, {res.gpus:g} GPU) per trial",
                  title_justify="left")
    for col in ("hash", "cell", "differs from its reference", "GFLOPs/img", "train TFLOPs"):
        table.add_column(col, justify="right" if "FLOP" in col else "left")
    rows, total = [], 0.0
    for c in cells:
        ref = reference_config(spec, c, smoke=smoke)
        diff = config_diff(c.config, ref) if ref is not None else {}
        diff.pop("train.seed", None)
        what = ", ".join(f"{k}={v[0]}" for k, v in diff.items()) or ("(reference)" if ref is not None else "(no reference)")
        gflops = _forward_gflops(c.config)
        tflops = 3 * gflops * c.config.data.batch_size * res.num_workers * c.config.train.steps / 1e3
        total += tflops
        rows.append({"hash": c.hash, "cell": c.name, "diff": diff, "gflops": gflops, "train_tflops": tflops})
        table.add_row(escape(c.hash), escape(c.name), escape(what), f"{gflops:.3g}", f"{tflops:.3g}")
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    console.print(f"total: {len(cells)} trials, ~{total:.3g} TFLOPs of training "
                  "(3 x forward GFLOPs x global batch x steps; evaluation not counted)", highlight=False)
    return rows


_FLOPS_CACHE: dict[tuple, float] = {}


def _forward_gflops(cfg) -> float:  # noqa: ANN001 - TrialConfig
    """Forward GFLOPs per image at data.crop_size, counted on the meta device (cached per model/size)."""
    import torch

    from ddsm.data import dataset_info
    from ddsm.models import build_model_from_config
    from ddsm.profile.flops import count_flops

    num_classes = dataset_info(cfg.data.name, cfg.data).num_classes
    model_cfg = dataclasses.replace(cfg.model, weights=None)  # FLOPs do not depend on weights: load none
    key = (repr(model_cfg), tuple(cfg.data.crop_size), num_classes)
    cache = _FLOPS_CACHE
    if key not in cache:
        with torch.device("meta"):
            model = build_model_from_config(model_cfg, num_classes=num_classes)
        cache[key] = count_flops(model, torch.empty(1, 3, *cfg.data.crop_size, device="meta")).gflops
    return cache[key]
