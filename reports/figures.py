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
from matplotlib.text import Text

from ddsm.metrics.catalogue import CLASS_BF_SEP, bf_metrics, lookup, tolerance_of
from reports.render import field_label, metric_label
from reports.tables import Table

__all__ = ["pareto_front", "place_labels", "plot_accuracy_vs_cost", "plot_bf_vs_tolerance", "plot_class_bf",
           "plot_per_class_delta", "plot_sweep"]


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


def _save(fig: Figure, path: Path, footer: str, *, description: str | None = None) -> Path:
    """Write ``fig`` as a PNG with ``footer`` at the bottom and in the file's Description metadata."""
    if footer:
        fig.supxlabel(footer, fontsize=6, color="0.4")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, metadata={"Description": footer or description or ""})
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
    ax.margins(x=0.2, y=0.15)  # room for the variant labels
    ax.set(xlabel=_axis_label(cost), ylabel=_axis_label(accuracy), title=f"{metric_label(accuracy)} vs "
           f"{metric_label(cost)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if footer:  # before the labels are placed: the footer takes part in the layout they settle
        fig.supxlabel(footer, fontsize=6, color="0.4")
    place_labels(ax, x, y, list(st.index))
    return _save(fig, path, "", description=footer)


# Label offsets tried in turn (points from the marker): beside, above, below, then further out with a leader line.
_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (0, 10), (0, -16)]
_OFFSETS += [(dx * k, dy * k) for k in (2, 3, 4, 5) for dx, dy in ((6, 6), (6, -9), (-6, 6), (-6, -9), (0, 10), (0, -12))]


def place_labels(ax, xs: np.ndarray, ys: np.ndarray, names: list[str], *, fontsize: float = 7) -> list:
    """Annotate every point with its name where the label overlaps no other label, marker or legend
    (greedy over :data:`_OFFSETS`, in display space; labels far from their point get a leader line).

    Written by hand: matplotlib has no label placement, and adjustText would be a dependency for 20 lines.
    Returns the annotation artists (tests check their extents).
    """
    fig = ax.figure
    fig.canvas.draw()  # settle the constrained layout so that display coordinates are final
    fig.set_layout_engine("none")  # keep them so: a later layout pass would move the axes under the labels
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))  # (P, 2) display pixels
    r = 4 * fig.dpi / 72  # marker radius in pixels
    blocked = [(px - r, py - r, px + r, py + r) for px, py in pts]
    legend = ax.get_legend()
    if legend is not None:
        e = legend.get_window_extent(renderer)
        blocked.append((e.x0, e.y0, e.x1, e.y1))
    frame = ax.get_window_extent(renderer)
    out = []
    for i, ((xi, yi), name) in enumerate(zip(zip(xs, ys), names)):
        others = np.delete(pts, i, axis=0)  # (P-1, 2): a label nearer another point reads as that point's
        best = None
        for dx, dy in _OFFSETS:
            far = abs(dx) > 6 or abs(dy) > 16
            ann = ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              arrowprops=dict(arrowstyle="-", color="0.4", lw=0.7) if far else None)
            e = _text_box(ann, renderer)
            box = (e.x0, e.y0, e.x1, e.y1)
            inside = frame.x0 <= e.x0 and e.x1 <= frame.x1 and frame.y0 <= e.y0 and e.y1 <= frame.y1
            own = _distance(box, pts[i])
            nearest_other = min((_distance(box, p) for p in others), default=np.inf)
            if inside and 2 * own < nearest_other and not any(_overlap(box, b) for b in blocked):
                best = (ann, box)
                break
            ann.remove()
        # nowhere free near the point: stack the label further out, with a leader line to its point
        for k in range(1, 40) if best is None else ():
            for dx, dy in ((8, 10 + 11 * k), (8, -10 - 11 * k), (-8, 10 + 11 * k), (-8, -10 - 11 * k)):
                ann = ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                                  ha="left" if dx > 0 else "right",
                                  arrowprops=dict(arrowstyle="-", color="0.4", lw=0.7))
                e = _text_box(ann, renderer)
                box = (e.x0, e.y0, e.x1, e.y1)
                if not any(_overlap(box, b) for b in blocked):
                    best = (ann, box)
                    break
                ann.remove()
            if best is not None:
                break
        if best is None:  # a crowd beyond any stacking: the first choice, drawn anyway
            ann = ax.annotate(name, (xi, yi), textcoords="offset points", xytext=_OFFSETS[0], fontsize=fontsize)
            e = _text_box(ann, renderer)
            best = (ann, (e.x0, e.y0, e.x1, e.y1))
        blocked.append(best[1])
        out.append(best[0])
    return out


def _text_box(ann, renderer):
    """The extent of an annotation's text alone (an Annotation's own extent includes its leader line,
    which is only laid out at draw time)."""
    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _distance(box: tuple, point: np.ndarray) -> float:
    """Distance from a point to a box (x0, y0, x1, y1) in display pixels (0 inside)."""
    dx = max(box[0] - point[0], 0.0, point[0] - box[2])
    dy = max(box[1] - point[1], 0.0, point[1] - box[3])
    return float(np.hypot(dx, dy))


def _overlap(a: tuple, b: tuple) -> bool:
    """Do boxes (x0, y0, x1, y1) intersect (1 px of slack)?"""
    return a[0] < b[2] - 1 and b[0] < a[2] - 1 and a[1] < b[3] - 1 and b[1] < a[3] - 1


def plot_class_bf(table: Table, *, classes: list[str], path: Path, footer: str = "") -> Path | None:
    """Grouped bars: boundary F (mean ± std over seeds) of the given (thin) classes, one bar per variant;
    None when none of them is in the per-class boundary-F table."""
    wanted = [m for m in table.metrics if lookup(m) is not None and lookup(m).label in classes]
    ran = [v for v in table.rows.index if table.rows.loc[v, "n_finished"] > 0]
    if not wanted or not ran:
        return None
    st = _stats(table, wanted)
    k, v = len(wanted), len(ran)
    width = 0.8 / v
    fig, (ax,) = _new(width=max(5.5, 0.9 * k * max(v, 2) ** 0.5))
    for i, variant in enumerate(ran):
        xs = np.arange(k) + (i - (v - 1) / 2) * width  # (K,)
        mean = st.loc[variant, "mean"][wanted].to_numpy(float) * 100  # (K,): NaN = no image had the class
        ax.bar(xs, np.nan_to_num(mean), width, yerr=st.loc[variant, "std"][wanted].fillna(0).to_numpy(float) * 100,
               capsize=2, label=variant, error_kw={"lw": 0.8})
        for x in xs[np.isnan(mean)]:
            ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=6, rotation=90, color="0.4")
    bf = wanted[0].partition(CLASS_BF_SEP)[0]
    ax.set_xticks(np.arange(k), [lookup(m).label for m in wanted])
    ax.set_ylim(bottom=0)  # a score in [0, 100]: the std whiskers below 0 are cut
    ax.set(ylabel=f"{metric_label(bf)} (%)", title=f"Boundary F of the thin classes ({metric_label(bf)})")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
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
