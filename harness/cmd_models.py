"""``ddsm-bench models``: a table of every registered model with its parameter count."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    p = sub.add_parser("models", help="list registered models with their parameter counts")
    p.add_argument("--backbone", default="resnet18", help="backbone used for the parameter count (default resnet18)")
    p.add_argument("--num-classes", type=int, default=19, help="number of classes (default 19, Cityscapes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print name, description and parameters (M) of every model."""
    from rich.console import Console
    from rich.table import Table

    from ddsm.models import REGISTRY, build_model
    from ddsm.models.backbone import check_backbone

    check_backbone(args.backbone)  # fail before building anything
    table = Table(title=f"registered models ({args.backbone}, {args.num_classes} classes)")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    table.add_column("params (M)", justify="right")
    for name, spec in REGISTRY.items():
        model = build_model(name, num_classes=args.num_classes, backbone=args.backbone)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        table.add_row(name, spec.description, f"{params:.2f}")
    Console(width=120).print(table)
    return 0
