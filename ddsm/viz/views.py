"""What a trained model shows on a few validation images, saved so that a report needs neither the model
nor a GPU: predictions as label PNGs, per-image boundary F, and (DDSM) where the sampling looked.

:func:`save_views` writes ``<cell>/views/``::

    index.json          the settings, dataset, class names, palette, thin classes, tolerance, the images
    input_<name>.jpg    the input image (uint8 RGB), ground truth ``gt_<name>.png`` (train ids, 255 ignore)
    pred_<name>.png     the model's prediction (train ids)
    per_image.csv       name, bf (at the tolerance), miou of every pool image (picks "where variants differ")
    sampling.json       DDSM: the N points of every branch at the probe pixels of the first image
    offsets.json        DDSM: histogram of |offset| per branch over the pool images

The *pool* is ``ViewSettings.pool`` validation images drawn with ``ViewSettings.seed`` (the same for
every cell of a grid: the variants are compared on the same images), after the explicit ``names``;
the first ``images`` of it are the fixed panels, the rest candidates for the "differ most" panels.
The offset histogram is over the pool, not the whole validation set (a choice: the pool is what is
predicted once at the end of a trial; its size is an option).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ddsm.config import ConfigError

__all__ = ["OFFSET_EDGES", "VIEWS_DIR", "ViewSettings", "image_name", "pool_indices", "save_views",
           "save_views_from_checkpoint"]

VIEWS_DIR = "views"
# |offset| histogram bin edges in pixels of the branch's map: [0, 1e-3), then log-spaced up to 64 px, then inf.
OFFSET_EDGES = [0.0, *np.logspace(-3, math.log10(64), 25).tolist(), math.inf]


@dataclass
class ViewSettings:
    """The ``figures`` block of a grid spec (and ``ddsm-bench figures``' options).

    enabled: save views at the end of every trial. images: fixed panels (seeded draw). names: explicit
    image names (file stems, synthetic ``val_0003``) shown first. differ: extra panels where the variants
    differ most in boundary F. pool: images predicted per cell (>= images + differ). seed: the draw.
    tolerance: boundary tolerance (px, or a fraction of the diagonal) of the overlay, the per-image
    scores and the per-class boundary F table; None: the first of ``eval.tolerances``.
    panel_seed: the training seed whose predictions the panels show; None: each variant's best seed (mIoU).
    """

    enabled: bool = True
    images: int = 2
    names: list[str] = field(default_factory=list)
    differ: int = 2
    pool: int = 8
    seed: int = 0
    tolerance: float | None = None
    panel_seed: int | None = None

    def validate(self) -> ViewSettings:
        """Raise ConfigError naming the first bad field (``figures.<field>``), its value and what is allowed."""
        checks = [
            (isinstance(self.enabled, bool), "enabled", self.enabled, "true or false"),
            (_int(self.images) and self.images >= 0, "images", self.images, "an integer >= 0"),
            (isinstance(self.names, list) and all(isinstance(n, str) and n for n in self.names), "names",
             self.names, "a list of image names (file stems)"),
            (_int(self.differ) and self.differ >= 0, "differ", self.differ, "an integer >= 0"),
            (_int(self.pool) and self.pool >= 1, "pool", self.pool, "an integer >= 1"),
            (_int(self.seed), "seed", self.seed, "an integer"),
            (self.tolerance is None or (isinstance(self.tolerance, (int, float)) and self.tolerance > 0),
             "tolerance", self.tolerance, "null or a number > 0 (px, or a fraction of the diagonal below 1)"),
            (self.panel_seed is None or _int(self.panel_seed), "panel_seed", self.panel_seed, "null or an integer"),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise ConfigError(f"figures.{name}={value!r} is not allowed: expected {allowed}")
        if self.pool < self.images + self.differ:
            raise ConfigError(f"figures.pool={self.pool!r} is not allowed: expected at least images + differ = "
                              f"{self.images + self.differ}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ViewSettings:
        """From a spec block; unknown keys are a ConfigError naming them."""
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"figures.{unknown[0]} is not a known option: expected one of "
                              f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON)."""
        return asdict(self)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def image_name(dataset: Any, index: int) -> str:
    """A stable name of item ``index``: the image file's stem, or ``<split>_<index>`` for synthetic data."""
    while hasattr(dataset, "indices") and hasattr(dataset, "base"):  # a Subset (minival)
        dataset, index = dataset.base, dataset.indices[index]
    if hasattr(dataset, "pairs"):
        return Path(dataset.pairs[index][0]).stem
    split = {0: "train", 1: "val", 2: "test"}.get(getattr(dataset, "split_code", -1), "item")
    return f"{split}_{index:04d}"


def pool_indices(dataset: Any, settings: ViewSettings) -> list[int]:
    """The pool: the explicit ``names`` first, then a draw with ``settings.seed`` (ConfigError for an unknown name)."""
    n = len(dataset)
    names = {image_name(dataset, i): i for i in range(n)} if settings.names else {}
    missing = [nm for nm in settings.names if nm not in names]
    if missing:
        raise ConfigError(f"figures.names: {missing[0]!r} is not an image of this split (names are file stems, "
                          f"e.g. {next(iter(names), '?')!r})")
    chosen = [names[nm] for nm in settings.names]
    order = np.random.default_rng(settings.seed).permutation(n).tolist()
    chosen += [i for i in order if i not in chosen]
    return chosen[:max(settings.pool, len(settings.names))]


@torch.no_grad()
def save_views(model: nn.Module, cfg: Any, out_dir: str | Path, settings: ViewSettings, *,
               device: str | torch.device = "cpu") -> Path:
    """Predict the pool images with ``model`` (eval mode) and write ``<out_dir>/views/`` (module docstring).

    ``cfg`` is the trial's :class:`~ddsm.config.TrialConfig` (data split, tolerances). Returns the folder.
    """
    from ddsm.data import build_dataset, dataset_info
    from ddsm.engine.evaluate import predict
    from ddsm.metrics.boundary import boundary_fscore, tolerance_to_px
    from ddsm.metrics.confusion import ConfusionMatrix
    from ddsm.viz.inspect import offset_magnitudes, probe_pixels, sampling_calls

    info = dataset_info(cfg.data.name, cfg.data)
    dataset = build_dataset(cfg.data, split=cfg.data.val_split, train=False)
    tolerance = settings.tolerance if settings.tolerance is not None else list(cfg.eval.tolerances)[0]
    folder = Path(out_dir) / VIEWS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    thin_ids = [info.class_names.index(c) for c in info.thin_classes if c in info.class_names]
    rows, images, sampling, hist = [], [], None, {}
    for rank, index in enumerate(pool_indices(dataset, settings)):
        name = image_name(dataset, index)
        raw, label = dataset.load(index)  # uint8 (3, H, W), uint8 (H, W)
        x, _ = dataset[index]  # float32 (3, H, W), normalised
        x = x[None].to(device)
        logits = predict(model, x, num_classes=info.num_classes, channels_last=cfg.train.channels_last)
        pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)  # (H, W)
        gt = label.numpy().astype(np.uint8)
        Image.fromarray(raw.permute(1, 2, 0).numpy()).save(folder / f"input_{name}.jpg", quality=90)
        Image.fromarray(gt).save(folder / f"gt_{name}.png")
        Image.fromarray(pred).save(folder / f"pred_{name}.png")
        bf = boundary_fscore(pred, gt, [tolerance], num_classes=info.num_classes, ignore_index=info.ignore_index)
        cm = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
        cm.update(torch.from_numpy(pred.astype(np.int64)), label.long())
        bf_value = next(v for k, v in bf.items() if k.startswith("bf_") and isinstance(v, float))
        rows.append({"name": name, "index": index, "bf": bf_value, "miou": cm.compute()["miou"]})
        images.append({"name": name, "index": index, "fixed": rank < settings.images or name in settings.names})
        calls = sampling_calls(model, x)
        for call in calls:
            counts, _ = np.histogram(offset_magnitudes(call), bins=OFFSET_EDGES)
            h = hist.setdefault(call.name, {"name": call.name, "branch": call.branch, "map_size": list(call.map_size),
                                            "counts": np.zeros(len(OFFSET_EDGES) - 1, dtype=np.int64)})
            h["counts"] += counts
        if rank == 0 and calls:
            sampling = _sampling_record(calls, name=name, label=gt, thin_ids=thin_ids, ignore=info.ignore_index,
                                        probes=probe_pixels(gt, thin_ids=thin_ids, ignore_index=info.ignore_index))
    model.train(was_training)
    radius = tolerance_to_px(tolerance, tuple(int(s) for s in gt.shape))
    meta = {"settings": settings.to_dict(), "dataset": cfg.data.name, "split": cfg.data.val_split,
            "class_names": list(info.class_names), "palette": [list(c) for c in info.palette],
            "thin_classes": list(info.thin_classes), "ignore_index": info.ignore_index, "tolerance": tolerance,
            "radius_px": radius, "images": images, "seed": cfg.train.seed, "model": cfg.model.name}
    (folder / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
    with (folder / "per_image.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "index", "bf", "miou"])
        w.writeheader()
        w.writerows(rows)
    if sampling is not None:
        (folder / "sampling.json").write_text(json.dumps(sampling, indent=1) + "\n")
        edges = [e if math.isfinite(e) else None for e in OFFSET_EDGES]
        calls_out = [{**h, "counts": h["counts"].tolist()} for h in hist.values()]
        (folder / "offsets.json").write_text(json.dumps({"edges": edges, "calls": calls_out}, indent=1) + "\n")
    return folder


def _sampling_record(calls: list, *, name: str, label: np.ndarray, thin_ids: list[int], ignore: int,
                     probes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The probe image's points: spatial branches at the probe pixels (input-image coordinates), channel
    branches at three channels of their grid (grid coordinates)."""
    from ddsm.viz.inspect import to_image_coords

    size = tuple(int(s) for s in label.shape)
    out = []
    for call in calls:
        pos, base = call.positions[0].float().cpu().numpy(), call.base[0].float().cpu().numpy()  # (N, H, W, 2)
        H, W = call.map_size
        entry = {"name": call.name, "branch": call.branch, "map_size": [H, W], "points": {}}
        if call.branch == "spatial":
            for kind, (y, x) in probes.items():
                fy = min(H - 1, max(0, round((y + 0.5) * H / size[0] - 0.5)))  # the feature pixel holding (y, x)
                fx = min(W - 1, max(0, round((x + 0.5) * W / size[1] - 0.5)))
                entry["points"][kind] = {
                    "pixel": [y, x], "feature_pixel": [fy, fx],
                    "base": to_image_coords(base[:, fy, fx], map_size=(H, W), image_size=size).tolist(),
                    "sampled": to_image_coords(pos[:, fy, fx], map_size=(H, W), image_size=size).tolist()}
        else:
            mag = np.linalg.norm(pos - base, axis=-1).mean(0)  # (s, s): mean |offset| per channel
            picks = {"centre": (H // 2, W // 2), "corner": (0, 0),
                     "largest offset": tuple(int(v) for v in np.unravel_index(np.argmax(mag), mag.shape))}
            for kind, (cy, cx) in picks.items():
                entry["points"][kind] = {"channel": int(cy * W + cx), "cell": [cy, cx],
                                         "base": base[:, cy, cx].tolist(), "sampled": pos[:, cy, cx].tolist()}
        out.append(entry)
    return {"image": name, "image_size": list(size), "probes": {k: list(v) for k, v in probes.items()}, "calls": out}


def save_views_from_checkpoint(checkpoint: str | Path, settings: ViewSettings, *, out_dir: str | Path | None = None,
                               cfg: Any | None = None, device: str | None = None) -> Path:
    """:func:`save_views` for the model of a checkpoint (``.pt``, or a cell folder: its ``checkpoints/last.pt``).

    ``cfg``: the config to read data and tolerances from (default: the checkpoint's own). ``out_dir``:
    where ``views/`` goes (default: the cell folder). Raises ConfigError for a missing checkpoint.
    """
    from ddsm.config import from_dict
    from ddsm.engine.checkpoint import load_checkpoint
    from ddsm.engine.reevaluate import trained_model
    from ddsm.engine.train import intra_op_threads, resolve_device

    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: expected a .pt file or a cell folder with "
                          "checkpoints/last.pt")
    ckpt = load_checkpoint(path)
    cfg = cfg if cfg is not None else from_dict(ckpt["config"]).validate()
    dev = resolve_device(device or cfg.train.device)
    with intra_op_threads(cfg.train.threads):
        model = trained_model(cfg, ckpt["model"], device=dev)
        return save_views(model, cfg, out_dir if out_dir is not None else path.parent.parent, settings, device=dev)
