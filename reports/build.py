"""Orchestration: tidy frame -> every table (Markdown, LaTeX, CSV), every figure (PNG), and ``report.md``.

Layout of ``out_dir``::

    report.md               provenance, runs per cell, every table, links to the figures
    provenance.json
    cells.csv               one row per (variant, seed): state, failure class, attempts, run id
    runs.csv                the tidy frame itself: one row per (run, metric), every run and config field
    tables/<name>.{md,tex,csv}   main, axis_<field>, per_class, per_class_delta, significance, power
    tables/all_metrics.csv  the main table over every scalar metric (pixel_acc, mean_acc, train_step_ms, ...)
    figures/<name>.png      miou_vs_gflops, miou_vs_latency, sweep_<field>, bf_vs_tolerance, per_class_delta,
                            per_class_bf_thin, learning_curves, panel_<image>, sampling_<variant>, offset_hist

The last five need :class:`reports.inputs.FigureInputs` (metric histories, the cells' ``views/``).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ddsm.config import ConfigError
from ddsm.metrics.catalogue import bf_key, is_per_class
from reports import figures, render, tables
from reports.inputs import FigureInputs
from reports.load import CELL_STATES, cell_status, finished_values, metric_names, resolve_baseline
from reports.stats import METHODS

__all__ = ["write_report"]


def _stem(name: str) -> str:
    """A file-name-safe stem: ``axis_model.num_points`` -> ``axis_model_num_points``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def write_report(df: pd.DataFrame, out_dir: str | Path, *, baseline: str | None = None,
                 provenance: dict[str, Any] | None = None, method: str = "ttest", alpha: float = 0.05,
                 expected: pd.DataFrame | None = None, figure_inputs: FigureInputs | None = None) -> dict[str, Path]:
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
        figure_inputs: histories and views for the learning curves, panels and sampling figures (None: none).

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
    inputs = figure_inputs or FigureInputs()
    tol = inputs.settings.get("tolerance")
    class_bf = tables.per_class_bf_table(df, bf=bf_key(tol) if tol else None, **kw)
    all_tables = [t for t in (main, *axes, *per_class, *([class_bf] if class_bf else []), signif, power)
                  if len(t.rows)]  # no comparison: no table

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
    every = [m for m in metric_names(df) if not is_per_class(m)]
    write("tables/all_metrics.csv", render.to_csv(tables.main_table(df, metrics=every, **kw), provenance=prov))
    write("cells.csv", status.to_csv(index=False))
    write("runs.csv", df.to_csv(index=False))
    write("provenance.json", json.dumps(prov, indent=2, default=str) + "\n")
    figs = _figures(out, main, axes, per_class, footer=_footer(prov))
    figs.update(_more_figures(out, df, main, class_bf, inputs, footer=_footer(prov)))
    written.update({rel: path for rel, (path, _) in figs.items()})
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
    return {f"figures/{p.name}": (p, CAPTIONS.get(name, f"mIoU and boundary F vs {name[6:]}, one line per group "
                                                   "of the other varying fields."))
            for name, p in made.items() if p is not None}


CAPTIONS = {
    "miou_vs_gflops": "mIoU vs GFLOPs per variant (mean ± std over seeds); the Pareto front in red.",
    "miou_vs_latency": "mIoU vs latency per variant; the Pareto front in red.",
    "bf_vs_tolerance": "Boundary F vs matching tolerance, one line per variant.",
    "per_class_delta": "Per-class IoU change vs the baseline († significant).",
    "per_class_bf_thin": "Boundary F of the thin classes per variant (mean ± std over seeds).",
    "learning_curves": "Validation mIoU, boundary F and train loss vs step: mean ± std over seeds, "
                       "dotted min/max, ▲ resumed.",
    "offset_hist": "|offset| of the DDSM sampling points per branch over the panel images, per variant.",
}


def _more_figures(out: Path, df: pd.DataFrame, main: tables.Table, class_bf: tables.Table | None,
                  inputs: FigureInputs, *, footer: str) -> dict[str, tuple[Path, str]]:
    """Thin-class boundary F, learning curves, panels and sampling figures; ``{rel: (path, caption)}``."""
    from reports import curves, panels

    fig_dir = out / "figures"
    order = list(main.rows.index)
    made: dict[str, tuple[Path, str]] = {}

    def add(path: Path | None, caption: str) -> None:
        if path is not None:
            made[f"figures/{path.name}"] = (path, caption)

    chosen = curves.chosen_runs(df).merge(finished_values(df, ["miou"]), on=["variant", "seed"], how="left")
    views = {r: p for r, p in inputs.views.items() if (p / "index.json").is_file()}  # a failed save: views/error.txt
    folders = panels.choose_runs(chosen, views, panel_seed=inputs.settings.get("panel_seed"), order=order)
    folders = {v: inputs.views[r] for v, r in folders.items()}
    if class_bf is not None:
        thin = _thin_classes(df, folders)
        add(figures.plot_class_bf(class_bf, classes=thin, path=fig_dir / "per_class_bf_thin.png", footer=footer),
            CAPTIONS["per_class_bf_thin"] + f" Classes: {', '.join(thin)}.")
    add(curves.plot_learning_curves(df, inputs.histories, resumes=inputs.resumes, order=order, footer=footer,
                                    path=fig_dir / "learning_curves.png"), CAPTIONS["learning_curves"])
    seed = inputs.settings.get("panel_seed")
    which = f"seed {seed}" if seed is not None else "each variant's best-mIoU seed"
    for name, why in panels.pick_images(folders, differ=int(inputs.settings.get("differ", 2))):
        caption = f"{name} ({why}): input, ground truth, predictions ({which}) and boundary errors."
        add(panels.plot_panel(name, folders, path=fig_dir / f"panel_{_stem(name)}.png", caption=caption,
                              footer=footer), caption)
    for variant, folder in folders.items():
        add(panels.plot_sampling(variant, folder, path=fig_dir / f"sampling_{_stem(variant)}.png", footer=footer),
            f"Where {variant} samples: the N points of every DDSM branch at a thin, a boundary and a flat pixel.")
    add(panels.plot_offset_hist(folders, path=fig_dir / "offset_hist.png", footer=footer), CAPTIONS["offset_hist"])
    return made


def _thin_classes(df: pd.DataFrame, folders: dict[str, Path]) -> list[str]:
    """The dataset's thin classes: from a views index, else :func:`ddsm.data.dataset_info` of ``data.name``."""
    for folder in folders.values():
        return list(json.loads((folder / "index.json").read_text()).get("thin_classes", []))
    names = df["data.name"].dropna().unique() if "data.name" in df else []
    if len(names) != 1:
        return []
    from ddsm.data import dataset_info  # torch import: only when no views say it

    return list(dataset_info(str(names[0])).thin_classes)


def _report_markdown(prov: dict[str, Any], status: pd.DataFrame, all_tables: list[tables.Table],
                     figs: dict[str, tuple[Path, str]]) -> str:
    title = f"# Report: {prov.get('spec') or prov.get('experiment') or 'ablation grid'}"
    counts = status["state"].value_counts()
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in CELL_STATES)
    parts = [title, "", "## Provenance", "", *(f"- {line}" for line in render.provenance_lines(prov)), "",
             f"## Runs per cell ({len(status)} cells: {summary})", "", render.cell_status_markdown(status),
             "## Tables", ""]
    parts += [render.to_markdown(t) for t in all_tables]
    if figs:
        parts += ["## Figures", ""]
        for rel, (_, caption) in figs.items():
            parts += [f"![{Path(rel).stem}]({rel})", "", f"*{caption}*" if caption else "", ""]
    return "\n".join(parts)
