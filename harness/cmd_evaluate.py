"""``ddsm-bench evaluate``: evaluate a checkpoint with the config stored in it, optionally changing how.

The checkpoint holds the resolved trial config; ``--set`` may change only how and where the
evaluation runs (``eval.*``, ``data.val_split`` (val or test: minival would score images the model may
have trained on), ``data.root``, ``data.workers``, ``data.batch_size``, ``train.device``, ``train.channels_last``,
``train.threads``), never the model or dataset. ``--checkpoint`` also accepts a run
directory (its ``checkpoints/last.pt``).
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

EVAL_OVERRIDABLE = ("eval.", "data.val_split", "data.root", "data.workers", "data.batch_size", "train.device",
                    "train.channels_last", "train.threads")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = sub.add_parser("evaluate", help="evaluate a checkpoint (its stored config; --set changes eval options)")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt checkpoint or a run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override an eval option, e.g. --set eval.flip=true (allowed: {', '.join(EVAL_OVERRIDABLE)})")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Rebuild the model from the checkpoint's config, load its weights, evaluate, print the metrics."""
    from ddsm.config import ConfigError, from_dict, parse_override, set_in
    from ddsm.data import dataset_info
    from ddsm.engine import evaluate, load_checkpoint, resolve_device
    from ddsm.models import build_model_from_config
    from harness.cmd_train import print_metrics

    path = args.checkpoint / "checkpoints" / "last.pt" if args.checkpoint.is_dir() else args.checkpoint
    if not path.is_file():
        raise ConfigError(f"--checkpoint {str(path)!r} does not exist: expected a checkpoint file or a run directory")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # not a zip, wrong format, unpickling refused: all mean "not our checkpoint"
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--checkpoint {str(path)!r} is not a ddsm-bench checkpoint: {first_line}") from None
    d = copy.deepcopy(ckpt["config"])
    for item in args.overrides:
        keys, value = parse_override(item)
        dotted = ".".join(keys)
        if not any(dotted.startswith(p) if p.endswith(".") else dotted == p for p in EVAL_OVERRIDABLE):
            raise ConfigError(f"--set {dotted}={value!r} is not allowed for evaluate: expected one of "
                              f"{', '.join(p + '*' if p.endswith('.') else p for p in EVAL_OVERRIDABLE)}")
        set_in(d, keys, value)
    cfg = from_dict(d).validate()
    if cfg.data.val_split == "minival" and ckpt["config"]["data"].get("val_split") != "minival":
        raise ConfigError("--set data.val_split=minival is not allowed for evaluate: the checkpoint was not trained "
                          "with minival held out, so it may have trained on those images; expected val or test")
    device = resolve_device(cfg.train.device)
    model = build_model_from_config(cfg.model, num_classes=dataset_info(cfg.data.name, cfg.data).num_classes)
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    metrics = evaluate(model, cfg, device=device)
    metrics["step"] = int(ckpt["step"])
    print_metrics(metrics, as_json=args.json)
    return 0
