"""PNG figures from :class:`reports.tables.Table` numbers (matplotlib, Agg canvas, no pyplot state).

Each ``plot_*`` function returns the written path, or None when the table lacks what the figure needs
(e.g. no latency was logged, or no field has a numeric sweep). Accuracy is plotted in percent; error
bars are one std over seeds. A small footer carries the provenance (spec, git SHA).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ddsm.metrics.catalogue import bf_metrics, lookup, tolerance_of
from reports.render import field_label, metric_label
from reports.tables import Table

__all__ = ["pareto_front", "plot_accuracy_vs_cost", "plot_bf_vs_tolerance", "plot_per_class_delta", "plot_sweep"]


def pareto_front(cost: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats: lower-or-equal cost and higher-or-equal accuracy, one strictly.

    Written by hand: a few lines of numpy, not worth a dependency. NaN points are never on the front.
    """
    cost, accuracy = np.asarray(cost, float), np.asarray(accuracy, float)  # (P,), (P,)
    ok = np.isfinite(cost) & np.isfinite(accuracy)
    le = cost[None, :] <= cost[:, None]  # (P, P): [i, j] = j costs no more than i
    ge = accuracy[None, :] >= accuracy[:, None]
    strict = (cost[None, :] < cost[:, None]) | (accuracy[None, :] > accuracy[:, None])
    dominated = (le & ge & strict & ok[None, :]).any(axis=1)
    return ok & ~dominated


def _scale(metric: str) -> float:
    info = lookup(metric)
    return info.scale if info is not None else 1.0


def _axis_label(metric: str) -> str:
    return metric_label(metric) + (" (%)" if _scale(metric) == 100.0 else "")


def _new(ncols: int = 1, *, width: float = 5.5, height: float = 4.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Figure, path: Path, footer: str) -> Path:
    if footer:
        fig.supxlabel(footer, fontsize=6, color="0.4")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, metadata={"Description": footer})
    return path


def _stats(table: Table, metrics: list[str]) -> pd.DataFrame:
    """Wide per-variant means and stds: columns ``(stat, metric)``, variants in table order."""
    cells = table.cells[table.cells["metric"].isin(metrics)]
    # (variants, 2 * metrics): columns ("mean", metric) and ("std", metric)
    return cells.pivot(index="variant", columns="metric", values=["mean", "std"]).reindex(table.rows.index)


def plot_accuracy_vs_cost(table: Table, *, cost: str, path: Path, accuracy: str = "miou",
                          footer: str = "") -> Path | None:
    """Accuracy vs a cost metric per variant, the Pareto front (cheaper and better) drawn as a step line."""
    if not {cost, accuracy} <= set(table.metrics):
        return None
    st = _stats(table, [cost, accuracy]).dropna(subset=[("mean", cost), ("mean", accuracy)])
    if st.empty:
        return None
    x, y = st[("mean", cost)].to_numpy(), st[("mean", accuracy)].to_numpy() * _scale(accuracy)  # (V,), (V,)
    yerr = st[("std", accuracy)].fillna(0).to_numpy() * _scale(accuracy)
    front = pareto_front(x, y)
    fig, (ax,) = _new()
    ax.errorbar(x, y, yerr=yerr, fmt="o", color="0.5", ecolor="0.7", capsize=2, label="variant")
    order = np.argsort(x[front])
    ax.step(x[front][order], y[front][order], where="post", color="C3", lw=1.5, label="Pareto front")
    ax.plot(x[front], y[front], "o", color="C3")
    for xi, yi, name in zip(x, y, st.index):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(x=0.15)  # room for the variant labels
    ax.set(xlabel=_axis_label(cost), ylabel=_axis_label(accuracy), title=f"{metric_label(accuracy)} vs "
           f"{metric_label(cost)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, footer)


def plot_sweep(table: Table, *, field: str, path: Path, metrics: list[str] | None = None,
               footer: str = "") -> Path | None:
    """mIoU and boundary F vs a numeric config field (e.g. N = ``model.num_points``), one line per group
    of the other varying fields; None when the field does not vary numerically."""
    if field not in table.rows:
        return None
    rows = table.rows[table.rows["n_finished"].gt(0)]  # planned variants that never ran have no config
    xs = pd.to_numeric(rows[field], errors="coerce")
    metrics = [m for m in (metrics or ["miou", *bf_metrics(table.metrics)]) if m in table.metrics]
    if xs.isna().any() or xs.nunique() < 2 or not metrics:
        return None
    others = [f for f in table.fields if f != field]
    group = rows[others].astype(str).agg(", ".join, axis=1) if others else pd.Series("", rows.index)
    st = _stats(table, metrics)
    fig, axes = _new(len(metrics), width=4.0)
    for ax, m in zip(axes, metrics):
        for label, idx in rows.groupby(group, sort=False).groups.items():
            if xs[idx].nunique() < 2:
                continue
            order = xs[idx].sort_values().index
            ax.errorbar(xs[order], st.loc[order, ("mean", m)] * _scale(m), yerr=st.loc[order, ("std", m)]
                        .fillna(0) * _scale(m), marker="o", capsize=2, label=label or None)
        ax.set(xlabel=field_label(field), ylabel=_axis_label(m), title=metric_label(m))
        ax.grid(alpha=0.3)
    if others:
        axes[0].legend(fontsize=7, title=", ".join(field_label(f) for f in others), title_fontsize=7)
    return _save(fig, path, footer)


def plot_bf_vs_tolerance(table: Table, *, path: Path, footer: str = "") -> Path | None:
    """Boundary F vs matching tolerance, one line per variant; None with fewer than two tolerances."""
    bfs = bf_metrics(table.metrics)
    if len(bfs) < 2:
        return None
    st = _stats(table, bfs)
    tol = [tolerance_of(m) for m in bfs]
    fig, (ax,) = _new()
    for variant in table.rows.index[table.rows["n_finished"].gt(0)]:
        ax.errorbar(tol, st.loc[variant, "mean"][bfs] * 100, yerr=st.loc[variant, "std"][bfs].fillna(0) * 100,
                    marker="o", capsize=2, label=variant)
    unit = "px" if all(m.endswith("px") for m in bfs) else "fraction of diagonal"
    ax.set(xlabel=f"tolerance ({unit})", ylabel="boundary F (%)", title="Boundary F vs tolerance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, footer)


def plot_per_class_delta(table: Table, *, path: Path, footer: str = "") -> Path | None:
    """Grouped bars: per-class IoU delta (points) vs the reference, one bar per variant and class; a dagger
    marks a significant delta (see :mod:`reports.stats`)."""
    ran = table.rows.index[table.rows["n_finished"].gt(0)]
    variants = [v for v in ran if v != table.reference]
    if not variants or table.reference is None:
        return None
    # (variants, classes), in points
    delta = table.cells.pivot(index="variant", columns="metric", values="delta").loc[variants, table.metrics] * 100
    k, v = len(table.metrics), len(variants)
    width = 0.8 / v
    fig, (ax,) = _new(width=max(5.5, 0.5 * k * max(v, 2) ** 0.5))
    significant = table.cells.pivot(index="variant", columns="metric", values="significant")
    for i, variant in enumerate(variants):
        xs, ys = np.arange(k) + (i - (v - 1) / 2) * width, delta.loc[variant].fillna(0).to_numpy()  # (K,), (K,)
        ax.bar(xs, ys, width, label=variant)
        for x, y, sig in zip(xs, ys, significant.loc[variant, table.metrics]):
            if sig:
                ax.annotate("\u2020", (x, y), ha="center", va="bottom" if y >= 0 else "top", fontsize=8)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(np.arange(k), [metric_label(m) for m in table.metrics], rotation=45, ha="right")
    ax.set(ylabel=f"IoU \u0394 vs {table.reference} (points)", title="Per-class IoU change")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, footer)
