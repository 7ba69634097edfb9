"""Qualitative panels and the "where DDSM samples" figures, from the cells' ``views/`` folders alone.

The folders are what :func:`ddsm.viz.save_views` wrote at the end of each trial (downloaded from MLflow
by the report, or a cell folder): inputs, ground truth and predictions as PNGs, per-image boundary F,
DDSM sampling points and |offset| histograms. Nothing here needs the model, a GPU or the dataset.

- :func:`plot_panel`: one image: input, ground truth, then per variant its prediction (top) and its
  boundary-error overlay (bottom): predicted boundary pixels within the tolerance of a ground-truth
  boundary (matched, green), beyond it (unmatched, magenta), ground-truth boundary pixels no prediction
  reaches (missed, cyan). Colours: the dataset's palette (``index.json``); a class legend below.
- :func:`pick_images`: the fixed images, then the pool images whose boundary F differs most between variants.
- :func:`plot_sampling`: one DDSM variant: per spatial branch the base grid (hollow) and learned (filled)
  positions of the N points at the probe pixels, in image coordinates; per channel branch the same on
  its grid of channels.
- :func:`plot_offset_hist`: |offset| per branch over the pool images, one panel per variant.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from PIL import Image
from scipy import ndimage as ndi

from ddsm.metrics.boundary import label_bmap
from reports.figures import _new, _save

__all__ = ["OVERLAY_COLOURS", "boundary_errors", "choose_runs", "colourise", "pick_images", "plot_offset_hist",
           "plot_panel", "plot_sampling", "read_index", "sampling_figure"]

OVERLAY_COLOURS = {"matched": (30, 210, 30), "unmatched": (255, 0, 200), "missed": (0, 220, 255)}  # apart from the palettes
PROBE_COLOURS = {"thin": "C1", "boundary": "C0", "flat": "C2", "centre": "C0", "corner": "C2", "largest offset": "C1"}


def read_index(views: Path) -> dict[str, Any]:
    """A ``views/index.json``."""
    return json.loads((Path(views) / "index.json").read_text())


def _per_image(views: Path) -> dict[str, float]:
    path = Path(views) / "per_image.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {r["name"]: float(r["bf"]) if r["bf"] not in ("", "nan") else float("nan") for r in csv.DictReader(fh)}


def choose_runs(chosen: pd.DataFrame, views: dict[str, Path], *, panel_seed: int | None,
                order: list[str]) -> dict[str, str]:
    """variant -> the run whose views a panel shows: the run of ``panel_seed``, else the best-mIoU seed.

    chosen: columns run_id, variant, seed, miou (the finished attempts, one per (variant, seed)).
    Variants without views are left out; ``order`` is the variant order of the tables.
    """
    have = chosen[chosen["run_id"].isin(views)]
    out = {}
    for variant in order:
        rows = have[have["variant"].eq(variant)]
        if panel_seed is not None:
            rows = rows[pd.to_numeric(rows["seed"], errors="coerce").eq(panel_seed)]
        if len(rows):
            best = rows.sort_values("miou", ascending=False, na_position="last", kind="stable").iloc[0]
            out[variant] = best["run_id"]
    return out


def pick_images(folders: dict[str, Path], *, differ: int) -> list[tuple[str, str]]:
    """``(name, why)`` of the panels: every fixed image of the first folder's index (why ``fixed``), then the
    ``differ`` pool images with the largest spread (max - min) of per-image boundary F over the variants."""
    if not folders:
        return []
    first = read_index(next(iter(folders.values())))
    fixed = [im["name"] for im in first["images"] if im.get("fixed")]
    scores = pd.DataFrame({v: _per_image(p) for v, p in folders.items()})  # (images, variants)
    out = [(n, "fixed") for n in fixed]
    if differ and len(folders) > 1 and not scores.empty:
        spread = (scores.max(axis=1) - scores.min(axis=1)).drop(index=fixed, errors="ignore").dropna()
        for name, value in spread.sort_values(ascending=False, kind="stable").head(differ).items():
            out.append((name, f"BF spread {value * 100:.1f} points"))
    return out


def colourise(labels: np.ndarray, palette: list[list[int]], *, ignore_index: int = 255) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 RGB; ignored pixels black, ids beyond the palette grey."""
    table = np.full((256, 3), 128, dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    table[ignore_index] = 0
    return table[labels]


def boundary_errors(pred: np.ndarray, gt: np.ndarray, *, radius: int, ignore_index: int = 255) -> dict[str, np.ndarray]:
    """Masks (H, W) ``matched`` / ``unmatched`` (predicted boundary within / beyond ``radius`` px of a
    ground-truth boundary) and ``missed`` (ground-truth boundary with no predicted boundary within ``radius``),
    class-agnostic, on the pixels the ground truth evaluates."""
    valid = gt != ignore_index
    pb = label_bmap(np.where(valid, pred, ignore_index)) & valid
    gb = label_bmap(gt) & valid
    d_gt = ndi.distance_transform_edt(~gb) if gb.any() else np.full(gt.shape, np.inf)
    d_pred = ndi.distance_transform_edt(~pb) if pb.any() else np.full(gt.shape, np.inf)
    return {"matched": pb & (d_gt <= radius), "unmatched": pb & (d_gt > radius), "missed": gb & (d_pred > radius)}


def _overlay(image: np.ndarray, errors: dict[str, np.ndarray]) -> np.ndarray:
    out = (image.astype(np.float32) * 0.45 + 255 * 0.55 * 0.3).astype(np.uint8)  # dimmed input underneath
    for kind, mask in errors.items():
        grown = ndi.binary_dilation(mask, iterations=1) if mask.shape[0] >= 200 else mask  # visible when downscaled
        out[grown] = OVERLAY_COLOURS[kind]
    return out


def plot_panel(name: str, folders: dict[str, Path], *, path: Path, caption: str = "", footer: str = "") -> Path | None:
    """The panel of image ``name`` (module docstring); None when the first folder lacks it."""
    first = next(iter(folders.values()))
    index = read_index(first)
    if not (first / f"gt_{name}.png").is_file():
        return None
    image = np.asarray(Image.open(first / f"input_{name}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(first / f"gt_{name}.png"))
    palette, ignore, radius = index["palette"], index["ignore_index"], int(index["radius_px"])
    V = len(folders)
    aspect = gt.shape[0] / gt.shape[1]
    fig = _new_grid(2, 2 + V, tile=2.3, aspect=aspect)
    axes = fig.axes
    cols = 2 + V

    def show(i: int, picture: np.ndarray, title: str) -> None:
        axes[i].imshow(picture, interpolation="nearest")
        axes[i].set_title(title, fontsize=7)

    show(0, image, f"input {name}")
    show(1, colourise(gt, palette, ignore_index=ignore), "ground truth")
    present = set(np.unique(gt).tolist())
    for j, (variant, folder) in enumerate(folders.items()):
        pred_path = folder / f"pred_{name}.png"
        if not pred_path.is_file():
            axes[2 + j].set_title(f"{variant}\n(no prediction)", fontsize=7)
            continue
        pred = np.asarray(Image.open(pred_path))
        present |= set(np.unique(pred).tolist())
        seed = read_index(folder).get("seed")
        show(2 + j, colourise(pred, palette, ignore_index=ignore), f"{variant}\nseed {seed}")
        errors = boundary_errors(pred, gt, radius=radius, ignore_index=ignore)
        n_pred = int(errors["matched"].sum() + errors["unmatched"].sum())
        precision = errors["matched"].sum() / n_pred if n_pred else float("nan")
        show(cols + 2 + j, _overlay(image, errors), f"boundary @{radius}px: {precision * 100:.0f}% matched")
    for ax in axes:
        ax.set_axis_off()
    names = index["class_names"]
    classes = [Patch(color=np.asarray(palette[c]) / 255, label=names[c]) for c in sorted(present)
               if c != ignore and c < len(names)]
    overlay = [Patch(color=np.asarray(c) / 255, label=f"{k} boundary") for k, c in OVERLAY_COLOURS.items()]
    axes[cols].legend(handles=classes, loc="center", fontsize=6, title="classes", title_fontsize=7, frameon=False,
                      ncols=1 if len(classes) <= 8 else 2)
    axes[cols + 1].legend(handles=overlay, loc="center", fontsize=6, title=f"tolerance {radius} px", title_fontsize=7,
                          frameon=False)
    if caption:
        fig.suptitle(caption, fontsize=8)
    return _save(fig, path, footer)


def _new_grid(rows: int, cols: int, *, tile: float, aspect: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(tile * cols, tile * rows * max(aspect, 0.45) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    for i in range(rows * cols):
        fig.add_subplot(rows, cols, i + 1)
    return fig


def plot_sampling(variant: str, views: Path, *, path: Path, footer: str = "") -> Path | None:
    """Where one DDSM variant samples on its probe image (module docstring); None without ``sampling.json``."""
    fig = sampling_figure(variant, views)
    return _save(fig, path, footer) if fig is not None else None


def sampling_figure(variant: str, views: Path):
    """The figure of :func:`plot_sampling` (a matplotlib Figure, not saved); None without ``sampling.json``."""
    sfile = Path(views) / "sampling.json"
    if not sfile.is_file():
        return None
    data = json.loads(sfile.read_text())
    calls = data["calls"]
    image = np.asarray(Image.open(Path(views) / f"input_{data['image']}.jpg").convert("RGB"))
    branches = [b for b in ("spatial", "channel") if any(c["branch"] == b for c in calls)]
    rows = [[c for c in calls if c["branch"] == b] for b in branches]  # one row per branch, one column per level
    cols = max(len(r) for r in rows)
    fig = _new_grid(len(rows), cols, tile=3.3, aspect=1.0)
    axes = []
    for r, row in enumerate(rows):
        for j in range(cols):
            ax = fig.axes[r * cols + j]
            if j < len(row):
                axes.append(ax)
            else:
                ax.set_axis_off()
    for ax, call in zip(axes, [c for row in rows for c in row]):
        H, W = call["map_size"]
        if call["branch"] == "spatial":
            ax.imshow(image, interpolation="nearest")
            ax.tick_params(labelsize=6)
            stride = image.shape[0] / H
            ax.set_title(f"{call['name']}\nspatial, stride {stride:g}, map {H}x{W}", fontsize=7)
        else:
            ax.set_xlim(-1.5, W + 0.5), ax.set_ylim(H + 0.5, -1.5)
            ax.set_xticks(range(W)), ax.set_yticks(range(H))
            ax.tick_params(labelsize=5)
            ax.grid(alpha=0.3)
            ax.set_aspect("equal")
            ax.set_title(f"{call['name']}\nchannel grid {H}x{W} (channel = y * {W} + x)", fontsize=7)
        for kind, p in call["points"].items():
            base, sampled = np.asarray(p["base"]), np.asarray(p["sampled"])  # (N, 2) as (y, x)
            colour = PROBE_COLOURS.get(kind, "C3")
            label = f"{kind} {tuple(p['pixel'])}" if "pixel" in p else f"{kind}: channel {p['channel']}"
            ax.plot(base[:, 1], base[:, 0], "o", mfc="none", mec=colour, ms=5, mew=0.9)
            ax.plot(sampled[:, 1], sampled[:, 0], "o", color=colour, ms=3, label=label)
            for (by, bx), (sy, sx) in zip(base, sampled):
                ax.plot([bx, sx], [by, sy], "-", color=colour, lw=0.6)
            if "pixel" in p:
                ax.plot(p["pixel"][1], p["pixel"][0], "+", color="white", ms=8, mew=1.5)
        ax.legend(fontsize=5, loc="upper right", framealpha=0.7)
    fig.suptitle(f"{variant}: N sampling points (hollow: base grid, filled: learned) on {data['image']}",
                 fontsize=8)
    return fig


def plot_offset_hist(folders: dict[str, Path], *, path: Path, footer: str = "") -> Path | None:
    """|offset| per branch over each variant's pool images; None when no variant has ``offsets.json``."""
    data = {v: json.loads((p / "offsets.json").read_text()) for v, p in folders.items() if (p / "offsets.json").is_file()}
    if not data:
        return None
    fig, axes = _new(len(data), width=3.8, height=3.2)
    for ax, (variant, d) in zip(axes, data.items()):
        edges = np.asarray([e if e is not None else np.inf for e in d["edges"]], dtype=float)
        finite = edges.copy()
        finite[0], finite[-1] = edges[1] / 2, edges[-2] * 2  # draw the under/overflow bins at the ends
        centres = np.sqrt(finite[:-1] * finite[1:])
        for i, call in enumerate(d["calls"]):
            counts = np.asarray(call["counts"], dtype=float)
            share = counts / counts.sum() if counts.sum() else counts
            ax.step(centres, share, where="mid", color=f"C{i}", lw=1.2,
                    label=f"{call['name'].replace('head.', '')} ({call['branch']}, {call['map_size'][0]}x"
                          f"{call['map_size'][1]})")
        ax.set_xscale("log")
        ax.set(xlabel="|offset| (px of the branch's map)", ylabel="share of sampled points",
               title=variant)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5)
    return _save(fig, path, footer)
