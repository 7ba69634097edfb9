"""Orchestration: tidy frame -> every table (Markdown, LaTeX, CSV), every figure (PNG), and ``report.md``.

Layout of ``out_dir``::

    report.md               provenance, runs per cell, every table, links to the figures
    provenance.json
    cells.csv               one row per (variant, seed): state, failure class, attempts, run id
    runs.csv                the tidy frame itself: one row per (run, metric), every run and config field
    tables/<name>.{md,tex,csv}   main, axis_<field>, per_class, per_class_delta, significance, power
    tables/all_metrics.csv  the main table over every scalar metric (pixel_acc, mean_acc, train_step_ms, ...)
    figures/<name>.png      miou_vs_gflops, miou_vs_latency, sweep_<field>, bf_vs_tolerance, per_class_delta
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ddsm.config import ConfigError
from reports import figures, render, tables
from reports.load import CELL_STATES, cell_status, metric_names, resolve_baseline
from reports.stats import METHODS

__all__ = ["write_report"]


def _stem(name: str) -> str:
    """A file-name-safe stem: ``axis_model.num_points`` -> ``axis_model_num_points``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def write_report(df: pd.DataFrame, out_dir: str | Path, *, baseline: str | None = None,
                 provenance: dict[str, Any] | None = None, method: str = "ttest", alpha: float = 0.05,
                 expected: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write the whole report of one grid and return ``{relative path: absolute path}`` of every file.

    Args:
        df: the tidy frame (:mod:`reports.load`).
        out_dir: created if needed; files of an earlier report are overwritten.
        baseline: the variant (or spec baseline name) deltas are taken against; default: the spec's
            baseline (``provenance["spec_baseline"]``), else the first variant.
        provenance: spec, experiment, parent run ids, git SHA, hardware, ... (see README); printed at the
            top of every file.
        method: significance test, ``ttest`` or ``bootstrap`` (:mod:`reports.stats`).
        alpha: significance level.
        expected: planned cells (``variant``, ``seed``) so that cells that never ran show as missing.

    Raises:
        ConfigError: the frame has no run, ``baseline`` names no variant, or ``method`` is unknown.
    """
    if df.empty:
        raise ConfigError("no runs to report: the experiment or parent run has no child runs")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed: expected one of {', '.join(METHODS)}")
    prov = dict(provenance or {})
    reference = resolve_baseline(df, baseline, default=prov.get("spec_baseline"))
    prov.update(baseline=reference, method=f"{method}, alpha={alpha:g}",
                generated=prov.get("generated") or dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    out = Path(out_dir)
    status = cell_status(df, expected=expected)
    kw = dict(reference=reference, method=method, alpha=alpha, status=status)
    main = tables.main_table(df, **kw)
    axes = tables.axis_tables(df, **kw)
    per_class = tables.per_class_tables(df, reference=reference, method=method, alpha=alpha, status=status)
    signif = tables.significance_table(df, **kw)
    power = tables.power_table(df, **kw)
    all_tables = [t for t in (main, *axes, *per_class, signif, power) if len(t.rows)]  # no comparison: no table

    written: dict[str, Path] = {}

    def write(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written[rel] = path

    for t in all_tables:
        write(f"tables/{_stem(t.name)}.md", render.to_markdown(t))
        write(f"tables/{_stem(t.name)}.tex", render.to_latex(t, provenance=prov))
        write(f"tables/{_stem(t.name)}.csv", render.to_csv(t, provenance=prov))
    every = [m for m in metric_names(df) if not m.startswith("iou_")]
    write("tables/all_metrics.csv", render.to_csv(tables.main_table(df, metrics=every, **kw), provenance=prov))
    write("cells.csv", status.to_csv(index=False))
    write("runs.csv", df.to_csv(index=False))
    write("provenance.json", json.dumps(prov, indent=2, default=str) + "\n")
    figs = _figures(out, main, axes, per_class, footer=_footer(prov))
    written.update(figs)
    write("report.md", _report_markdown(prov, status, all_tables, figs))
    return written


def _footer(prov: dict[str, Any]) -> str:
    sha = prov.get("git_sha") or []
    sha = ",".join(s[:10] for s in (sha if isinstance(sha, list) else [sha]))
    parts = [f"spec {prov['spec']}" if prov.get("spec") else "", f"git {sha}" if sha else "",
             f"generated {prov['generated']}"]
    return " | ".join(p for p in parts if p)


def _figures(out: Path, main: tables.Table, axes: list[tables.Table], per_class: list[tables.Table], *,
             footer: str) -> dict[str, Path]:
    """Every figure the tables allow; ``{relative path: path}``."""
    fig_dir = out / "figures"
    made = {
        "miou_vs_gflops": figures.plot_accuracy_vs_cost(main, cost="gflops", path=fig_dir / "miou_vs_gflops.png",
                                                        footer=footer),
        "miou_vs_latency": figures.plot_accuracy_vs_cost(main, cost="latency_ms",
                                                         path=fig_dir / "miou_vs_latency.png", footer=footer),
        "bf_vs_tolerance": figures.plot_bf_vs_tolerance(main, path=fig_dir / "bf_vs_tolerance.png", footer=footer),
    }
    for t in axes:
        field = t.fields[0]
        made[f"sweep_{_stem(field)}"] = figures.plot_sweep(main, field=field, footer=footer,
                                                           path=fig_dir / f"sweep_{_stem(field)}.png")
    if per_class:
        made["per_class_delta"] = figures.plot_per_class_delta(per_class[1], path=fig_dir / "per_class_delta.png",
                                                               footer=footer)
    return {f"figures/{p.name}": p for p in made.values() if p is not None}


def _report_markdown(prov: dict[str, Any], status: pd.DataFrame, all_tables: list[tables.Table],
                     figs: dict[str, Path]) -> str:
    title = f"# Report: {prov.get('spec') or prov.get('experiment') or 'ablation grid'}"
    counts = status["state"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in CELL_STATES)
    parts = [title, "", "## Provenance", "", *(f"- {line}" for line in render.provenance_lines(prov)), "",
             f"## Runs per cell ({len(status)} cells: {summary})", "", render.cell_status_markdown(status),
             "## Tables", ""]
    parts += [render.to_markdown(t) for t in all_tables]
    if figs:
        parts += ["## Figures", ""] + [f"![{Path(rel).stem}]({rel})" for rel in figs] + [""]
    return "\n".join(parts)
