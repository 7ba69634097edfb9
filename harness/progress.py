"""Terminal output of ``ddsm-bench run``: a live table of cells while the grid runs, a comparison at the end.

On a terminal, a rich Live table shows one row per cell (status, step, last validation mIoU, elapsed
time). Elsewhere (CI logs, pipes) it prints one line whenever a cell changes status. At the end,
:func:`print_summary` prints the comparison table: per variant, mean +- std over seeds of the final
metrics, and the mIoU difference to the reference baseline.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

__all__ = ["ProgressBoard", "comparison_rows", "print_summary", "summary_metric_keys"]

_STYLE = {"finished": "green", "skipped": "green", "running": "cyan", "retrying": "yellow", "failed": "red",
          "killed": "red", "pending": "dim"}
# Final metrics shown in the comparison, in order; bf_<r>px and biou are added as found.
_HEAD = ("miou", "pixel_acc")
_TAIL = ("gflops", "params_m", "latency_ms")
_PERCENT = ("miou", "pixel_acc", "mean_acc", "biou")  # fractions shown x100


class ProgressBoard:
    """One row per cell; a rich Live table on a terminal, status-change lines elsewhere."""

    def __init__(self, results: Sequence[Any], *, console: Console | None = None) -> None:
        """Args:
        results: the CellResult objects of the grid (read, never modified).
        console: where to draw (default: stderr).
        """
        self.results = results
        self.console = console or Console(stderr=True)
        self.live: Live | None = None
        self._seen: dict[str, str] = {}
        self.t0 = time.time()

    def __enter__(self) -> "ProgressBoard":
        if self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)
            self.live = None

    def refresh(self) -> None:
        """Redraw the table (terminal) or print the cells whose status changed (elsewhere)."""
        if self.live is not None:
            self.live.update(self._table())
            return
        done = sum(r.status in ("finished", "skipped") for r in self.results)
        for r in self.results:
            if self._seen.get(r.cell.hash) != r.status:
                self._seen[r.cell.hash] = r.status
                if r.status == "pending":
                    continue
                extra = f" miou {_num(r.metrics.get('miou'), 'miou')}" if r.metrics.get("miou") is not None else ""
                self.console.print(f"[{done}/{len(self.results)}] {r.status:<8} {r.cell.name} "
                                   f"({r.cell.hash}){extra}", highlight=False, markup=False)

    def _table(self) -> Table:
        done = sum(r.status in ("finished", "skipped") for r in self.results)
        table = Table(title=f"{done}/{len(self.results)} cells done, {time.time() - self.t0:.0f} s",
                      title_justify="left")
        for col in ("cell", "hash", "status", "try", "step", "val mIoU", "elapsed"):
            table.add_column(col, justify="right" if col in ("try", "step", "val mIoU", "elapsed") else "left")
        for r in self.results:
            elapsed = r.elapsed + (time.time() - r.started if r.status == "running" and r.started else 0.0)
            miou = r.metrics.get("miou", r.last_miou)
            status = f"[{_STYLE.get(r.status, '')}]{r.status}[/]"
            table.add_row(escape(r.cell.name), r.cell.hash, status, str(r.attempts or ""),
                          f"{r.step}/{r.cell.config.train.steps}" if r.status == "running" else "",
                          _num(miou, "miou"), f"{elapsed:.0f} s" if elapsed else "")
        return table


def summary_metric_keys(rows: Sequence[dict[str, float]]) -> list[str]:
    """Metric columns of the comparison: miou, pixel_acc, every bf_<r>px, biou, then cost."""
    present = {k for m in rows for k in m}
    bf = sorted((k for k in present if k.startswith("bf_")), key=_tolerance)
    keys = [*_HEAD, *bf, "biou", *_TAIL]
    return [k for k in keys if k in present]


def comparison_rows(results: Sequence[Any]) -> list[dict[str, Any]]:
    """Per variant (in cell order): seeds done, mean and std of each final metric, delta mIoU vs reference.

    Returns dicts ``{"variant", "n", "reference", "mean": {k: v}, "std": {k: v}, "delta_miou"}``; cells that
    did not finish are left out (``n`` counts the seeds that did).
    """
    groups: dict[str, list[Any]] = {}
    for r in results:
        groups.setdefault(r.cell.variant, []).append(r)
    rows = []
    for variant, rs in groups.items():
        done = [r.metrics for r in rs if r.status in ("finished", "skipped") and r.metrics]
        keys = {k for m in done for k in m}
        mean = {k: statistics.fmean([m[k] for m in done if k in m]) for k in keys}
        std = {k: statistics.stdev([m[k] for m in done if k in m]) if sum(k in m for m in done) > 1 else 0.0
               for k in keys}
        rows.append({"variant": variant, "n": len(done), "of": len(rs), "reference": rs[0].cell.reference,
                     "mean": mean, "std": std})
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        ref = by_name.get(row["reference"] or "")
        ok = ref is not None and ref is not row and "miou" in row["mean"] and "miou" in ref["mean"]
        row["delta_miou"] = row["mean"]["miou"] - ref["mean"]["miou"] if ok else None
    return rows


def print_summary(summary: Any, *, console: Console | None = None) -> None:
    """Print the comparison table (stdout), the failures and where the results are."""
    out = console or Console(width=None if sys.stdout.isatty() else 200)  # logs: do not squeeze the table
    rows = comparison_rows(summary.results)
    keys = summary_metric_keys([row["mean"] for row in rows])
    table = Table(title=f"{summary.spec.name}: mean ± std over seeds (miou, pixel_acc, bf, biou in %; "
                  "Δmiou vs the reference baseline, in points)", title_justify="left")
    table.add_column("variant", no_wrap=True)
    table.add_column("seeds", justify="right", min_width=5)
    for k in keys:
        table.add_column(k, justify="right")  # wraps "mean ± std" on narrow terminals
    table.add_column("Δmiou", justify="right", min_width=5)
    for row in rows:
        cells = [f"{_num(row['mean'][k], k)} ± {_num(row['std'][k], k)}" if k in row["mean"] else "" for k in keys]
        delta = row["delta_miou"]
        table.add_row(escape(row["variant"]), f"{row['n']}/{row['of']}", *cells,
                      f"{100 * delta:+.1f}" if delta is not None else "")
    out.print(table)
    failed = [r for r in summary.results if r.status in ("failed", "killed")]
    for r in failed:
        out.print(f"{r.status}: {r.cell.name} ({r.cell.hash}) failures={','.join(r.failures) or '-'} "
                  f"see {summary.out_dir / 'cells' / r.cell.hash}", highlight=False, markup=False)
    n_done = sum(r.done for r in summary.results)
    state = "interrupted" if summary.interrupted else "done"
    out.print(f"{state}: {n_done}/{len(summary.results)} cells finished; results in {summary.out_dir}", highlight=False)
    out.print(f"browse: mlflow ui --backend-store-uri {summary.tracking_uri}", highlight=False)


def _num(v: float | None, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if key in _PERCENT or key.startswith("bf_"):
        return f"{100 * v:.1f}"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def _tolerance(key: str) -> float:
    """``bf_2px`` -> 2.0 (sort order of the boundary columns)."""
    digits = key[3:].removesuffix("px")
    try:
        return float(digits)
    except ValueError:
        return math.inf
