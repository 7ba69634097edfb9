"""``ddsm-bench figures``: the qualitative panels and DDSM sampling figures of one checkpoint.

    ddsm-bench figures --checkpoint runs/quickstart/cells/<hash> --out figs/
    ddsm-bench figures --checkpoint model.pt --out figs/ --images 4 --names 0001TP_008550 --tolerance 2

Predicts the panel images with the checkpoint's model (its stored config says which data), writes
``<out>/views/`` (:mod:`ddsm.viz.views`) and draws ``<out>/figures/``: ``panel_<image>.png`` per image,
``sampling.png`` and ``offset_hist.png`` for a DDSM model. A grid makes the same figures for every
cell at the end of its trials (the spec's ``figures`` block) and its report assembles them.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``figures`` subcommand."""
    p = sub.add_parser("figures", help="qualitative panels and DDSM sampling figures of one checkpoint")
    p.add_argument("--checkpoint", required=True, type=Path, help="a .pt checkpoint or a run/cell directory")
    p.add_argument("--out", required=True, type=Path, help="output directory (views/ and figures/ are written)")
    p.add_argument("--images", type=int, default=2, help="seeded validation images to show (default 2)")
    p.add_argument("--names", default="", help="comma-separated image names (file stems) shown first")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw (default 0)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="boundary tolerance of the overlay (default: the first of the checkpoint's eval.tolerances)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: the checkpoint's train.device)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Save the views of the checkpoint, draw them, print where they went."""
    from ddsm.viz import ViewSettings, save_views_from_checkpoint
    from reports import panels

    names = [n for n in args.names.split(",") if n]
    settings = ViewSettings(images=args.images, names=names, differ=0, pool=max(1, args.images + len(names)),
                            seed=args.seed, tolerance=args.tolerance).validate()
    views = save_views_from_checkpoint(args.checkpoint, settings, out_dir=args.out, device=args.device)
    index = panels.read_index(views)
    label = index["model"]
    figs = args.out / "figures"
    written = [panels.plot_panel(im["name"], {label: views}, path=figs / f"panel_{im['name']}.png",
                                 caption=f"{im['name']}: input, ground truth, {label}'s prediction and boundary errors")
               for im in index["images"]]
    written += [panels.plot_sampling(label, views, path=figs / "sampling.png"),
                panels.plot_offset_hist({label: views}, path=figs / "offset_hist.png")]
    written = [p for p in written if p is not None]
    print(f"wrote {len(written)} figures under {figs} (views in {views})")
    return 0
