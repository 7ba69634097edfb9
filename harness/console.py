"""Terminal output of ``ddsm-bench run`` and ``tune``: live progress, the dry-run table, the summaries.

Grid: on a terminal, a rich Live table shows one row per cell (status, step, last validation mIoU,
elapsed time); elsewhere (CI logs, pipes) one line is printed whenever a cell changes status. At the
end, :func:`print_grid_summary` prints the comparison: per variant, mean ± std over seeds of the final
metrics (computed by :func:`reports.tables.seed_stats`, as in the report) and the mIoU difference to
the reference baseline. Study: one line per trial event (:class:`StudyLog`) and the best trial(s).
Which metrics are fractions shown in percent comes from :mod:`ddsm.metrics.catalogue`.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ddsm.metrics.catalogue import bf_metrics, lookup
from harness.secrets import redact

__all__ = ["ProgressBoard", "StudyLog", "comparison_rows", "print_dry_run", "print_grid_summary",
           "print_study_summary", "stdout_console", "summary_metric_keys"]

_STYLE = {"finished": "green", "skipped": "green", "running": "cyan", "evaluating": "cyan", "retrying": "yellow",
          "failed": "red", "killed": "red", "pending": "dim"}
# Final metrics of the grid comparison, in order; every bf_<r>px goes between these.
_HEAD = ("miou", "pixel_acc")
_TAIL = ("biou", "gflops", "params_m", "latency_ms")


def stdout_console(console: Console | None = None) -> Console:
    """``console``, else one on stdout that does not squeeze tables in logs (width 200 off a terminal)."""
    return console or Console(width=None if sys.stdout.isatty() else 200)


def browse_line(tracking_uri: str, experiment_id: str | None = None) -> str:
    """How to open the runs in the MLflow UI (:func:`harness.mlflow_io.ui_hint`; passwords hidden)."""
    from harness.mlflow_io import ui_hint

    return ui_hint(tracking_uri, experiment_id)


# ============================================================================ grid


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

    def __enter__(self) -> ProgressBoard:
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
                self.console.print(f"[{done}/{len(self.results)}] {r.status:<10} {r.cell.name} "
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
    return [k for k in (*_HEAD, *bf_metrics(present), *_TAIL) if k in present]


def comparison_rows(results: Sequence[Any]) -> list[dict[str, Any]]:
    """Per variant (in cell order): seeds done, mean and std of each final metric, delta mIoU vs reference.

    Returns dicts ``{"variant", "n", "of", "reference", "mean": {k: v}, "std": {k: v}, "delta_miou"}``; cells
    that did not finish are left out (``n`` counts the seeds that did; ``std`` is 0 with one seed).
    """
    import pandas as pd

    from reports.tables import seed_stats

    groups: dict[str, list[Any]] = {}
    for r in results:
        groups.setdefault(r.cell.variant, []).append(r)
    done = {v: [r.metrics for r in rs if r.status in ("finished", "skipped") and r.metrics] for v, rs in groups.items()}
    keys = sorted({k for ms in done.values() for m in ms for k in m})
    values = pd.DataFrame([{"variant": v, "seed": i, **m} for v, ms in done.items() for i, m in enumerate(ms)],
                          columns=["variant", "seed", *keys])
    stats = seed_stats(values, metrics=keys, variants=list(groups)) if keys else values
    by_variant = {v: g for v, g in stats[stats["n"].gt(0)].groupby("variant", sort=False)} if keys else {}
    rows = []
    for variant, rs in groups.items():
        mine = by_variant.get(variant)
        mean = {m: float(x) for m, x in zip(mine["metric"], mine["mean"])} if mine is not None else {}
        std = {m: float(s) if n > 1 else 0.0 for m, s, n in zip(mine["metric"], mine["std"], mine["n"])} \
            if mine is not None else {}
        rows.append({"variant": variant, "n": len(done[variant]), "of": len(rs), "reference": rs[0].cell.reference,
                     "mean": mean, "std": std})
    by_name = {row["variant"]: row for row in rows}
    for row in rows:
        ref = by_name.get(row["reference"] or "")
        ok = ref is not None and ref is not row and "miou" in row["mean"] and "miou" in ref["mean"]
        row["delta_miou"] = row["mean"]["miou"] - ref["mean"]["miou"] if ok else None
    return rows


def print_grid_summary(summary: Any, *, console: Console | None = None) -> None:
    """Print the comparison table (stdout), the failures and where the results are."""
    out = stdout_console(console)
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
    out.print(f"browse: {browse_line(summary.tracking_uri, summary.experiment_id)}", highlight=False, markup=False,
              soft_wrap=True)


def print_report_written(summary: Any, paths: dict[str, Any] | None, error: Exception | None, *,
                         console: Console | None = None) -> None:
    """Where the grid's report went (or why it is missing: the results are safe in MLflow regardless)."""
    out = stdout_console(console)
    if error is not None:
        out.print(f"report not written: {type(error).__name__}: {redact(str(error))}", style="yellow", markup=False)
        return
    out.print(f"report: {summary.out_dir / 'report' / 'report.md'} ({len(paths or {})} files; "
              f"re-create with `ddsm-bench report --run {summary.parent_run_id} "
              f"--tracking-uri {redact(summary.tracking_uri)} --out DIR`)", highlight=False, markup=False)


def print_dry_run(spec: Any, rows: list[dict[str, Any]]) -> None:
    """The ``--dry-run`` table: each cell's hash, what differs from its reference, forward and training FLOPs."""
    res = spec.trial_resources
    table = Table(title=f"{spec.name}: {len(rows)} cells ({len(spec.seeds)} seeds), reference {spec.baseline!r}, "
                  f"{res.num_workers} worker(s) x ({res.cpus:g} CPU, {res.gpus:g} GPU) per trial",
                  title_justify="left")
    for col in ("hash", "cell", "differs from its reference", "GFLOPs/img", "train TFLOPs"):
        table.add_column(col, justify="right" if "FLOP" in col else "left")
    for row in rows:
        what = ", ".join(f"{k}={v[0]}" for k, v in row["diff"].items()) or (
            "(reference)" if row["reference"] else "(no reference)")
        table.add_row(escape(row["hash"]), escape(row["cell"]), escape(what), f"{row['gflops']:.3g}",
                      f"{row['train_tflops']:.3g}")
    console = stdout_console()
    console.print(table)
    total = sum(row["train_tflops"] for row in rows)
    console.print(f"total: {len(rows)} trials, ~{total:.3g} TFLOPs of training "
                  "(3 x forward GFLOPs x global batch x steps; evaluation not counted)", highlight=False)


def _num(v: float | None, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    info = lookup(key)
    if info is not None and info.unit == "%":
        return f"{info.scale * v:.1f}"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


# ============================================================================ study


def stderr_line(console: Console | None = None) -> Any:
    """A ``line(text)`` printer on ``console`` (default: stderr), for the phases around the live table."""
    target = console or Console(stderr=True)
    return lambda text: target.print(text, highlight=False, soft_wrap=True, markup=False)


class StudyLog:
    """A study's progress: one line per trial event, prefixed ``[verdicts/budget]``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.done, self.budget = 0, 0

    def line(self, text: str) -> None:
        """Print one progress line."""
        prefix = f"[{self.done}/{self.budget}] " if self.budget else ""
        self.console.print(prefix + text, highlight=False, soft_wrap=True)

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed as things happen."""


def print_study_summary(summary: Any, best: list[dict[str, Any]], console: Console) -> None:
    """The study's end: trials per state, the best trial(s), how to confirm, where the results are."""
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary.states.items()))
    state = "interrupted" if summary.interrupted else "done"
    console.print(f"{state}: study {summary.study_name}: {summary.finished}/{summary.budget} trials ({states})",
                  highlight=False, soft_wrap=True)
    for entry in best:
        values = ", ".join(f"{m} {v:.4f}" for m, v in entry["values"].items())
        console.print(f"best trial {entry['number']}: {values}  {format_params(entry['params'])}", highlight=False,
                      soft_wrap=True)
    if "best" in summary.outputs:
        console.print(f"confirm with more seeds: ddsm-bench run {summary.outputs['best']}", highlight=False,
                      soft_wrap=True)
    console.print(f"results in {summary.out_dir}; browse: {browse_line(summary.tracking_uri, summary.experiment_id)}",
                  highlight=False, soft_wrap=True)


def format_params(params: dict[str, Any]) -> str:
    """``lr=0.01 num_points=9`` (last key part; floats to 4 significant digits)."""
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in params.items())
