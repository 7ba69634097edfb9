"""The metric catalogue: the one place that says what each final metric is.

Every metric a trial reports by name has an entry: its display label, unit, direction (``max``:
higher is better, ``min``: lower is better), kind (``accuracy``: measured on the validation set at
every validation, so a tuner can prune on it; ``cost``: what the model costs, known only at the end)
and how many decimals a table prints. Two families are patterns rather than names: boundary F-scores
``bf_<r>px`` (tolerance in pixels) or ``bf_<fraction>`` (a fraction of the image diagonal), and
per-class IoU ``iou_<class>``.

Reports (bold = best per column, which columns are in %), tuning objectives (which metrics exist,
which can be pruned on) and the terminal summary all read this module; nothing else writes these
facts down. Accuracy metrics are stored as fractions in [0, 1] and shown in percent (``scale`` 100).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ACCURACY", "CATALOGUE", "CLASS_BF_SEP", "COST", "DIAGNOSTIC_PREFIX", "MetricInfo", "TIMED", "bf_key",
           "bf_metrics", "class_bf_key", "class_bf_metrics", "class_metrics", "diagnostic", "is_accuracy", "is_cost",
           "is_per_class", "lookup", "metric_names", "tolerance_of"]


@dataclass(frozen=True)
class MetricInfo:
    """What one metric is and how it is compared and shown."""

    name: str
    label: str  # column header, e.g. "mIoU", "Latency (ms)"
    unit: str  # unit shown: "%" for fractions, else the cost's unit
    direction: str  # "max" (higher is better) | "min" (lower is better)
    kind: str  # "accuracy" (every validation) | "cost" (final only)
    digits: int = 2  # decimals printed in tables

    @property
    def higher_is_better(self) -> bool:
        """True for ``direction == "max"``."""
        return self.direction == "max"

    @property
    def scale(self) -> float:
        """Factor from the stored value to the shown one (100 for fractions shown in %)."""
        return 100.0 if self.unit == "%" else 1.0


def _acc(name: str, label: str) -> MetricInfo:
    return MetricInfo(name, label, "%", "max", "accuracy")


def _cost(name: str, label: str, unit: str, digits: int) -> MetricInfo:
    return MetricInfo(name, label, unit, "min", "cost", digits)


# Named metrics in the order a paper's main table shows them (boundary F goes after pixel/mean acc).
ACCURACY = (_acc("miou", "mIoU"), _acc("pixel_acc", "Pixel acc."), _acc("mean_acc", "Mean acc."),
            _acc("biou", "BIoU"))
COST = (_cost("gflops", "GFLOPs", "GFLOPs", 2), _cost("gmacs", "GMACs", "GMACs", 2),
        _cost("params_m", "Params (M)", "M", 2), _cost("latency_ms", "Latency (ms)", "ms", 2),
        _cost("train_step_ms", "Train step (ms)", "ms", 1), _cost("peak_mem_mb", "Memory (MB)", "MB", 1),
        _cost("train_peak_mem_mb", "Train memory (MB)", "MB", 1), _cost("train_time_s", "Train time (s)", "s", 1))
CATALOGUE: dict[str, MetricInfo] = {m.name: m for m in (*ACCURACY, *COST)}
# Costs measured by timing or allocating, which a trial sharing its machine gets wrong: a grid reports them
# from its isolated cost phase (harness/cost.py); what each trial measured is kept as a diagnostic,
# ``trial_<name>`` (never ranked, not in the main table).
TIMED = ("latency_ms", "train_step_ms", "peak_mem_mb", "train_peak_mem_mb")
DIAGNOSTIC_PREFIX = "trial_"

CLASS_BF_SEP = "/"  # bf_2px/pole: the boundary F of class pole at 2 px (read from metrics.json's bf_per_class)
_BF = re.compile(r"^bf_(?P<tol>\d+(?:\.\d+)?)(?P<px>px)?$")


def bf_key(tolerance: float, *, radius: int | None = None) -> str:
    """The metric name of a boundary F-score: ``bf_<radius>px`` when the tolerance resolved to one pixel
    radius (a tolerance >= 1 is that radius), else ``bf_<fraction>`` (a fraction of the diagonal)."""
    if radius is None and tolerance >= 1:
        radius = int(tolerance)
    return f"bf_{radius}px" if radius is not None else f"bf_{tolerance:g}"


def tolerance_of(metric: str) -> float | None:
    """``bf_2px`` -> 2.0, ``bf_0.0075`` -> 0.0075 (fraction of the diagonal); None for other metrics."""
    m = _BF.match(metric)
    return float(m["tol"]) if m else None


def lookup(metric: str) -> MetricInfo | None:
    """The entry of ``metric`` (named, ``bf_*`` or ``iou_<class>``); None for a metric not in the catalogue
    (e.g. ``step``, ``num_images``), which has no direction: it is shown, never ranked or tested."""
    if metric in CATALOGUE:
        return CATALOGUE[metric]
    tol = tolerance_of(metric)
    if tol is not None:
        return _acc(metric, f"BF@{tol:g}px" if metric.endswith("px") else f"BF@{tol:g}")
    if metric.startswith("iou_") and len(metric) > 4:
        return _acc(metric, metric[4:])
    bf, _, cls = metric.partition(CLASS_BF_SEP)
    if cls and tolerance_of(bf) is not None:
        return _acc(metric, cls)
    return None


def diagnostic(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with every :data:`TIMED` cost renamed ``trial_<name>`` (what a grid trial logs)."""
    return {(DIAGNOSTIC_PREFIX + k if k in TIMED else k): v for k, v in metrics.items()}


def is_accuracy(metric: str) -> bool:
    """An accuracy metric: reported at every validation (prunable), higher is better, shown in %."""
    info = lookup(metric)
    return info is not None and info.kind == "accuracy"


def is_cost(metric: str) -> bool:
    """A cost metric: known only at the end of a trial, lower is better."""
    info = lookup(metric)
    return info is not None and info.kind == "cost"


def bf_metrics(names: Iterable[str]) -> list[str]:
    """The boundary-F metrics among ``names``, by increasing tolerance."""
    return sorted((n for n in names if tolerance_of(n) is not None), key=tolerance_of)


def class_bf_key(bf: str, class_name: str) -> str:
    """The per-class boundary F of one class at one tolerance: ``bf_2px`` + ``pole`` -> ``bf_2px/pole``."""
    return f"{bf}{CLASS_BF_SEP}{class_name}"


def class_bf_metrics(names: Iterable[str], bf: str | None = None) -> list[str]:
    """The per-class boundary-F metrics (``bf_<r>px/<class>``) among ``names``, of tolerance ``bf`` if given."""
    out = []
    for n in names:
        head, _, cls = n.partition(CLASS_BF_SEP)
        if cls and tolerance_of(head) is not None and (bf is None or head == bf):
            out.append(n)
    return out


def is_per_class(metric: str) -> bool:
    """A per-class metric (``iou_<class>`` or ``bf_<r>px/<class>``), kept out of the all-metrics table."""
    return bool(class_metrics([metric]) or class_bf_metrics([metric]))


def class_metrics(names: Iterable[str]) -> list[str]:
    """The per-class IoU metrics (``iou_<class>``) among ``names``, order kept."""
    return [n for n in names if n.startswith("iou_") and len(n) > 4]


def metric_names(tolerances: Iterable[float]) -> list[str]:
    """Every final metric a trial with these ``eval.tolerances`` reports by name: accuracy (with one
    ``bf_*`` per tolerance, as :func:`bf_key` names it before the image size is known), then cost."""
    bf = list(dict.fromkeys(bf_key(t) for t in tolerances))
    return [m.name for m in ACCURACY] + bf + [m.name for m in COST]
