"""``ddsm-bench train``: train and evaluate one config in this process (no Ray), resuming if possible.

Writes ``config.yaml``, ``metrics.json``, ``per_class_iou.csv``, ``confusion.csv``, ``log.jsonl`` and
``checkpoints/last.pt`` under ``--out``. Rerunning with the same ``--out`` resumes from the last
checkpoint. Exit codes: 0 done, 1 the training failed (diverged or out of memory; one line on
stderr), 2 bad config.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = sub.add_parser("train", help="train and evaluate one config (no Ray); rerun with the same --out to resume")
    p.add_argument("config", nargs="?", default=None, help="trial config YAML (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.02 (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created; reused to resume)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from scratch even if --out holds a checkpoint")
    p.add_argument("--smoke", action="store_true", help="2 steps on tiny inputs (harness.spec.SMOKE_OVERRIDES first)")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON on stdout")
    p.set_defaults(func=run)


def smoke_overrides() -> list[str]:
    """``--smoke`` as ``key=value`` strings, applied before the user's ``--set``."""
    from harness.spec import SMOKE_OVERRIDES

    return [f"{k}={json.dumps(v)}" for k, v in SMOKE_OVERRIDES.items()]


def run(args: argparse.Namespace) -> int:
    """Load the config (ConfigError -> exit 2), train with console + JSONL logging, print the metrics."""
    from ddsm.config import load_config
    from ddsm.engine import ConsoleLogger, JsonlLogger, classify_failure, train
    from harness import exit_codes

    overrides = (smoke_overrides() if args.smoke else []) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    callbacks = [ConsoleLogger(total_steps=cfg.train.steps), JsonlLogger(args.out / "log.jsonl")]
    try:
        metrics = train(cfg, out_dir=args.out, callbacks=callbacks, resume=args.resume)
    except (RuntimeError, MemoryError) as e:
        failure = classify_failure(e)
        if failure == "killed":  # SIGTERM/SIGINT: the engine wrote a checkpoint after its current step
            print(f"ddsm-bench train: {e}; re-run the same command to resume from "
                  f"{args.out / 'checkpoints'}", file=sys.stderr)
            return exit_codes.INTERRUPTED
        if failure not in ("nan", "oom"):
            raise
        print(f"ddsm-bench train: failed ({failure}): {e}; last good checkpoint: "
              f"{args.out / 'checkpoints' / 'last.pt'}", file=sys.stderr)
        return 1
    print_metrics(metrics, as_json=args.json)
    return 0


def print_metrics(metrics: dict[str, Any], *, as_json: bool) -> None:
    """Scalar metrics one per line (``name value``) or, with ``as_json``, the whole dict as JSON."""
    from ddsm.engine import to_jsonable

    public = {k: v for k, v in metrics.items() if k != "confusion"}
    if as_json:
        print(json.dumps(to_jsonable(public), indent=2))
        return
    for key, value in public.items():
        if isinstance(value, float):
            print(f"{key:<18} {value:.4f}")
        elif isinstance(value, (int, str)):
            print(f"{key:<18} {value}")
    names = metrics.get("class_names", [])
    for name, iou in zip(names, metrics.get("per_class_iou", [])):
        print(f"  iou {name:<14} {iou:.4f}")
