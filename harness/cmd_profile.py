"""``ddsm-bench profile``: GFLOPs, parameters, latency and peak memory of one model, with run context.

Example: ``ddsm-bench profile --model ddsm --backbone resnet18 --set num_points=25 --size 512x1024
--batch 2 --device cuda --amp bf16 --json``. ``--set`` takes ModelConfig fields (``num_points=25`` or
``model.num_points=25``). The FLOP convention is printed with every result (see ddsm/profile/flops.py).
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``profile`` subcommand."""
    p = sub.add_parser("profile", help="GFLOPs, parameters, latency, train-step time and peak memory of a model",
                       description="Profile one model at a fixed input size. FLOPs are per image and equal "
                                   "2 x multiply-adds; the full convention is printed with every result.")
    p.add_argument("--model", default="ddsm", help="a registered model (see `ddsm-bench models`; default ddsm)")
    p.add_argument("--backbone", default="resnet18", help="resnet18 | resnet34 | resnet50 | resnet101")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="OPTION=VALUE",
                   help="a model option, e.g. --set num_points=25 --set branches=spatial (model. prefix optional)")
    p.add_argument("--size", default="512x1024", help="input HxW (default 512x1024)")
    p.add_argument("--batch", type=int, default=1, help="batch for latency and memory (default 1)")
    p.add_argument("--num-classes", type=int, default=19, help="output classes (default 19, Cityscapes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto: cuda when available)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default 5)")
    p.add_argument("--amp", default="none", help="autocast dtype: none | bf16 | fp16 (default none)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    p.add_argument("--compile", action="store_true", help="time a torch.compile'd model (warm-up includes compiling)")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default 0: torch's default)")
    p.add_argument("--no-train-step", action="store_true", help="skip the training-step timing and memory")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    """``"512x1024"`` -> (512, 1024); anything else raises ConfigError."""
    from ddsm.config import ConfigError

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ConfigError(f"--size {text!r} is not allowed: expected HxW with two positive integers, e.g. 512x1024")
    return int(m.group(1)), int(m.group(2))


def model_config(name: str, backbone: str, overrides: list[str]) -> Any:
    """A validated ModelConfig from --model, --backbone and --set OPTION=VALUE items."""
    from ddsm.config import ConfigError, ModelConfig, TrialConfig, from_dict, parse_override
    from ddsm.models import list_models

    if name not in list_models():
        raise ConfigError(f"--model {name!r} is not allowed: expected one of {', '.join(list_models())}")
    d: dict[str, Any] = {"name": name, "backbone": backbone}
    for item in overrides:
        keys, value = parse_override(item)
        keys = keys[1:] if keys[0] == "model" and len(keys) > 1 else keys
        if len(keys) != 1 or keys[0] in ("name", "backbone"):
            raise ConfigError(f"--set {item!r} is not allowed: expected a model option such as num_points=25 "
                              "(use --model and --backbone for those two)")
        d[keys[0]] = value
    cfg = from_dict(d, ModelConfig, prefix="model.")
    TrialConfig(model=cfg).validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """Build the model, profile it, print a table (or one JSON object)."""
    import torch

    from ddsm.config import ConfigError, to_dict
    from ddsm.models import build_model_from_config, model_kwargs
    from ddsm.profile import profile_model

    size = parse_size(args.size)
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes {args.num_classes} is not allowed: expected an integer >= 1")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} is not allowed: expected 0 (torch's default) or a positive integer")
    cfg = model_config(args.model, args.backbone, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)  # recorded in the result as cpu_threads
    model = build_model_from_config(cfg, num_classes=args.num_classes)
    result = profile_model(model, size=size, batch=args.batch, device=args.device, repeats=args.repeats,
                           warmup=args.warmup, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
                           train_step=not args.no_train_step)
    options = {k: v for k, v in to_dict(cfg).items() if k in model_kwargs(cfg)}
    result = {"model": cfg.name, "backbone": cfg.backbone, "options": options, "num_classes": args.num_classes,
              **result}
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def _ms(d: dict | None) -> str:
    return "-" if d is None else f"{d['median']:.2f} ms  (IQR {d['p25']:.2f}-{d['p75']:.2f}, n={d['repeats']})"


def print_table(r: dict[str, Any]) -> None:
    """A readable summary of a profile_model result."""
    from rich.console import Console
    from rich.table import Table

    opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
    table = Table(title=f"{r['model']} / {r['backbone']}" + (f" ({opts})" if opts else ""), show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value")
    mem = lambda v: "-" if v is None else f"{v:.1f} MiB"  # noqa: E731
    rows = [
        ("GFLOPs / image", f"{r['gflops']:.2f}  (GMACs {r['gmacs']:.2f}; conv+matmul {r['matmul_gflops']:.2f})"),
        ("parameters", f"{r['params_m']:.2f} M  (trainable {r['params_trainable_m']:.2f} M)"),
        (f"latency, batch {r['batch']}", _ms(r["latency_ms"])),
        (f"train step, batch {r['train_batch']}", _ms(r["train_step_ms"])),
        ("peak memory, inference", mem(r["peak_mem_mb"])),
        ("peak memory, train step", mem(r["train_peak_mem_mb"])),
        ("memory measured by", str(r["peak_mem_kind"])),
        ("uncounted ops", ", ".join(r["uncounted_ops"]) or "none"),
        ("input", f"{r['batch']} x 3 x {r['size'][0]} x {r['size'][1]}, {r['num_classes']} classes"),
        ("device", f"{r['device']} ({r['device_type']}, {r['cpu_threads']} threads)"),
        ("software", f"torch {r['torch']} (CUDA build {r['cuda']}), cuDNN {r['cudnn']}, Python {r['python']}"),
        ("dtype / flags", f"{r['dtype']}, channels_last={r['channels_last']}, compile={r['compile']}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    for name, g in r["gflops_by_module"].items():
        table.add_row(f"  GFLOPs in {name}", f"{g:.3f}  ({r['params_m_by_module'].get(name, 0.0):.2f} M params)")
    console = Console()
    console.print(table)
    console.print(f"FLOP convention: {r['flop_convention']}", style="dim")
