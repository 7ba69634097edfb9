"""Learning curves from the MLflow histories: validation mIoU and boundary F vs step, train loss vs step.

One line per variant (the mean over its finished seeds, one attempt per seed as in the tables), a band
of ± one std over seeds (ddof=1, as the tables) and the seeds' min/max as thin dotted lines; a
triangle on the step axis marks where a seed's run was resumed from a checkpoint. A point logged twice
for one step (an attempt that re-logged it after resuming) counts once: the latest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ddsm.metrics.catalogue import bf_metrics
from reports.figures import _axis_label, _new, _save, _scale
from reports.load import FINISHED, runs_frame, select_attempts
from reports.render import metric_label

__all__ = ["BAND_COLUMNS", "chosen_runs", "curve_metrics", "plot_learning_curves", "seed_band"]

BAND_COLUMNS = ["variant", "metric", "step", "mean", "std", "min", "max", "n"]


def chosen_runs(df: pd.DataFrame) -> pd.DataFrame:
    """run_id, variant, seed of the attempt the tables use for every finished (variant, seed)."""
    chosen = select_attempts(runs_frame(df))
    return chosen.loc[chosen["status"].eq(FINISHED), ["run_id", "variant", "seed"]]


def seed_band(df: pd.DataFrame, histories: pd.DataFrame, *, metric: str) -> pd.DataFrame:
    """Per variant and step: mean, std (ddof=1; NaN with one seed), min, max and n over the seeds' values
    of ``metric`` (:data:`BAND_COLUMNS`). ``df`` is the tidy frame, ``histories`` the logged points."""
    h = histories[histories["metric"].eq(metric)]
    if h.empty:
        return pd.DataFrame(columns=BAND_COLUMNS)
    h = h.sort_values("timestamp").drop_duplicates(["run_id", "step"], keep="last")  # re-logged after a resume
    h = h.merge(chosen_runs(df), on="run_id")
    g = h.groupby(["variant", "step"], sort=False)["value"]
    band = g.agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "n"}).reset_index()
    return band.assign(metric=metric)[BAND_COLUMNS].sort_values(["variant", "step"], kind="stable")


def curve_metrics(histories: pd.DataFrame) -> list[str]:
    """The metrics a learning-curve figure shows, in panel order: miou, the smallest-tolerance boundary F, loss."""
    names = set(histories["metric"])
    bfs = bf_metrics(names)
    return [m for m in ("miou", *(bfs[:1]), "loss") if m in names]


def plot_learning_curves(df: pd.DataFrame, histories: pd.DataFrame, *, path: Path, resumes: pd.DataFrame | None = None,
                         order: list[str] | None = None, footer: str = "") -> Path | None:
    """One panel per :func:`curve_metrics` metric, one line per variant with its seed band; None without history."""
    metrics = curve_metrics(histories)
    if not metrics:
        return None
    chosen = chosen_runs(df)
    variants = [v for v in (order or sorted(chosen["variant"].unique())) if v in set(chosen["variant"])]
    marks = (resumes if resumes is not None else pd.DataFrame(columns=["run_id", "step"])).merge(chosen, on="run_id")
    fig, axes = _new(len(metrics), width=4.2, height=3.6)
    for ax, m in zip(axes, metrics):
        band = seed_band(df, histories, metric=m)
        scale = _scale(m)
        for i, variant in enumerate(variants):
            b = band[band["variant"].eq(variant)]
            if b.empty:
                continue
            color = f"C{i % 10}"
            x = b["step"].to_numpy()
            mean, std = b["mean"].to_numpy() * scale, b["std"].fillna(0).to_numpy() * scale  # (S,), (S,)
            ax.plot(x, mean, color=color, lw=1.4, label=variant, marker="o" if len(x) < 8 else None, ms=3)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.18, lw=0)
            if (b["n"] > 1).any():
                ax.plot(x, b["min"] * scale, color=color, lw=0.6, ls=":")
                ax.plot(x, b["max"] * scale, color=color, lw=0.6, ls=":")
            steps = marks.loc[marks["variant"].eq(variant), "step"].to_numpy()
            if len(steps):
                ax.plot(steps, np.zeros_like(steps, dtype=float), "^", color=color, ms=6, clip_on=False,
                        transform=ax.get_xaxis_transform(), label=f"{variant}: resumed")
        ax.set(xlabel="step", ylabel=_axis_label(m) if m != "loss" else "train loss",
               title=metric_label(m) if m != "loss" else "Train loss")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # resume marks may appear only on some panels
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    fig.legend(handles, labels, loc="outside right upper", fontsize=7,
               title="line: mean over seeds\nband: ± one std\ndotted: min / max", title_fontsize=7)
    return _save(fig, path, footer)
