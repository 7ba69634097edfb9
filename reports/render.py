"""The only place numbers become strings: Markdown, LaTeX (booktabs) and CSV writers for :class:`Table`.

Accuracy metrics (mIoU, accuracies, boundary F, boundary IoU, per-class IoU) are shown in percent and
their deltas in points; cost metrics in their own units. A cell reads ``mean ± std`` (``std`` left out
with one seed, or when it is exactly 0 for a cost metric), or ``median [p25–p75]`` for a cost measured
once per variant by the isolated cost phase, ``(n=k)`` when fewer seeds logged the metric than
finished, then ``(+Δ†)`` vs the reference (``, n/a`` when fewer than two seeds pair up). Best values
are bold, unless the seeds run cannot tell them from the baseline (``bold`` in the cells, see
:mod:`reports.tables`). A power cell reads ``MDD (k seeds)``. CSV files hold the raw numbers (no rounding) under ``# key: value`` provenance lines:
read them with ``pandas.read_csv(path, comment="#")``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from ddsm.metrics.catalogue import lookup
from reports.tables import Table

__all__ = ["cell_status_markdown", "field_label", "latex_escape", "metric_label", "provenance_lines",
           "seeds_text", "to_csv", "to_latex", "to_markdown"]

FIELD_LABELS = {"model.name": "Model", "model.branches": "Branches", "model.num_points": "N",
                "model.backbone": "Backbone", "model.pos_embed": "Pos. embed", "model.fusion": "Fusion",
                "data.name": "Dataset"}
PROVENANCE_KEYS = [("spec", "Spec"), ("spec_path", "Spec file"), ("description", "Description"), ("smoke", "SMOKE RUN"),
                   ("split_leak", "WARNING, SPLIT"), ("accuracy_split", "Accuracy metrics from"),
                   ("cost_source", "Cost columns (latency, train step, memory) from"),
                   ("experiment", "MLflow experiment"), ("experiment_id", "Experiment id"),
                   ("parent_run_ids", "Parent run(s)"), ("tracking_uri", "Tracking URI"), ("git_sha", "Git SHA"),
                   ("hardware", "Hardware"), ("hosts", "Hosts"), ("nodes", "Ray nodes"), ("gpus", "GPUs"),
                   ("torch", "torch"), ("runs_started", "Runs started"), ("generated", "Report generated"), ("baseline", "Baseline (deltas vs)"), ("method", "Significance")]


# ----------------------------------------------------------------------------- labels and numbers


def metric_label(metric: str) -> str:
    """``miou`` -> ``mIoU``, ``bf_2px`` -> ``BF@2px``, ``iou_pole`` -> ``pole`` (the catalogue's labels);
    names not in the catalogue unchanged."""
    info = lookup(metric)
    return info.label if info is not None else metric


def field_label(field: str) -> str:
    """``model.num_points`` -> ``N``; fields without a short name keep their dotted key."""
    return FIELD_LABELS.get(field, field)


def _percent(metric: str) -> bool:
    info = lookup(metric)
    return info is not None and info.unit == "%"


def _number(x: float, metric: str, *, signed: bool = False, minus: str = "-") -> str:
    info = lookup(metric)
    digits = info.digits if info is not None else 2
    value = 100 * x if _percent(metric) else x
    return (f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}").replace("-", minus)


def _present(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and x is not pd.NA


def seeds_text(row: pd.Series) -> str:
    """``3/3``, ``2/3 (1 failed: oom)``, ``1/3 (1 failed: killed, 1 missing)``."""
    extra = []
    if row["n_failed"]:
        extra.append(f"{row['n_failed']} failed" + (f": {row['failures']}" if row["failures"] else ""))
    if row["n_running"]:
        extra.append(f"{row['n_running']} running")
    if row["n_missing"]:
        extra.append(f"{row['n_missing']} missing")
    return f"{row['n_finished']}/{row['n_expected']}" + (f" ({', '.join(extra)})" if extra else "")


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Style:
    pm: str
    dagger: str
    dash: str
    bold: Callable[[str], str]
    escape: Callable[[str], str]
    minus: str = "-"  # how a negative sign is written
    range: str = "\u2013"  # between the ends of an interquartile range


def _cell(c: pd.Series, show: tuple[str, ...], n_finished: int, s: _Style) -> str:
    """One table cell from a row of :func:`reports.tables.compare`."""
    m = c["metric"]
    parts = []
    if "mean" in show:
        if c["n"] == 0:
            parts.append(s.dash)
        else:
            text = _number(c["mean"], m, minus=s.minus)
            parts.append(s.bold(text) if c.get("bold", c["best"]) else text)
            if _present(c.get("q25")) and _present(c.get("q75")):  # one isolated measurement: its IQR
                parts.append(f" [{_number(c['q25'], m)}{s.range}{_number(c['q75'], m)}]")
            elif "std" in show and _present(c["std"]) and (c["std"] != 0 or _percent(m)):
                parts.append(f"{s.pm}{_number(c['std'], m)}")
            if c["n"] < n_finished:
                parts.append(f" (n={c['n']})")
    if "delta" in show and _present(c["delta"]):
        delta = _number(c["delta"], m, signed=True, minus=s.minus)
        mark = s.dagger if c["significant"] else ", n/a" if c["tested"] and not c["testable"] else ""
        parts.append(f" ({delta}{mark})" if "mean" in show else f"{delta}{mark}")
    elif "delta" in show and "mean" not in show:
        parts.append(s.dash)
    if "test" in show:
        parts.append(_test_text(c, s))
    if "power" in show:
        parts.append(_power_text(c, s))
    return "".join(parts).strip()


def _power_text(c: pd.Series, s: _Style) -> str:
    """``3.26 (34 seeds)``: the minimum detectable difference (points) and the seeds 0.5 points would need."""
    if not c["tested"]:
        return s.dash
    if not _present(c["mdd"]):
        return f"n/a (n={c['n_pairs']})"
    seeds = f"{int(c['seeds_needed'])} seeds" if _present(c["seeds_needed"]) else "> 10000 seeds"
    return f"{_number(c['mdd'], c['metric'])} ({seeds})"


def _test_text(c: pd.Series, s: _Style) -> str:
    if not c["tested"]:
        return s.dash
    if not c["testable"]:
        return f"n/a (n={c['n_pairs']})"
    m = c["metric"]
    diff = _number(c["mean_diff"], m, signed=True, minus=s.minus) + (s.dagger if c["significant"] else "")
    if _present(c["p"]):
        return f"{diff} (p={c['p']:.3g}, n={c['n_pairs']})"
    low, high = (_number(c[k], m, signed=True, minus=s.minus) for k in ("ci_low", "ci_high"))
    return f"{diff} (CI [{low}, {high}], n={c['n_pairs']})"


def _grid(table: Table, s: _Style) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, body rows, alignment) as strings in style ``s``."""
    in_points = "test" in table.show or "power" in table.show  # differences, not levels
    unit = {m: " (%)" if _percent(m) and not in_points else "" for m in table.metrics}
    header = ["Variant", *(field_label(f) for f in table.fields), "Seeds",
              *(metric_label(m) + unit[m] for m in table.metrics)]
    cells = table.cells.set_index(["variant", "metric"], drop=False)
    body = []
    for variant, row in table.rows.iterrows():
        texts = [_cell(cells.loc[(variant, m)], table.show, int(row["n_finished"]), s) for m in table.metrics]
        fields = [s.escape(str(row[f])) if _present(row[f]) else s.dash for f in table.fields]
        body.append([s.escape(str(variant)), *fields, s.escape(seeds_text(row)), *texts])
    align = ["l"] * (2 + len(table.fields)) + ["r"] * len(table.metrics)
    return header, body, align


# ----------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


MARKDOWN = _Style(pm=" \u00b1 ", dagger="\u2020", dash="\u2014", bold=lambda t: f"**{t}**", escape=_md_escape)


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with its title and footnotes."""
    header, body, align = _grid(table, MARKDOWN)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [f"### {table.title}", "", _md_row([_md_escape(h) for h in header]), _md_row(rule)]
    lines += [_md_row(r) for r in body]
    lines += [""] + [f"*{_md_escape(n)}*  " for n in table.notes] + [_units_note(table)]
    return "\n".join(lines).rstrip() + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _units_note(table: Table) -> str:
    if not any(_percent(m) for m in table.metrics):
        return ""
    return "*Accuracy metrics in %, their deltas in points.*"


def cell_status_markdown(status: pd.DataFrame) -> str:
    """Variants x seeds: ``ok``, ``failed (oom)``, ``running``, ``missing``; retries add ``, 2 attempts (oom)``."""
    text = status.assign(text=[
        ("ok" if st == "finished" else st) + (f" ({fc})" if fc and st == "failed" else "")
        + (f", {a} attempts" if a > 1 else "") + (f" ({fs})" if fs and a > 1 and st == "finished" else "")
        for st, fc, fs, a in zip(status["state"], status["failure_class"], status["failures"], status["attempts"])])
    grid = text.pivot(index="variant", columns="seed", values="text").reindex(pd.unique(status["variant"]))
    # (variants, seeds)
    lines = [_md_row(["Variant", *(f"seed {s}" for s in grid.columns)]),
             _md_row([":---"] + [":---"] * len(grid.columns))]
    lines += [_md_row([_md_escape(str(v)), *(str(x) for x in r)]) for v, r in grid.iterrows()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- LaTeX

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "\u0394": r"$\Delta$", "\u00b1": r"$\pm$", "\u2020": r"\textsuperscript{\dag}",
                "\u2014": "---", "\u2013": "--", "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials (``_ & % $ # { } ~ ^ \\``) and map the few Unicode symbols we emit."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


LATEX = _Style(pm=r" $\pm$ ", dagger=r"\textsuperscript{\dag}", dash="--", bold=lambda t: rf"\textbf{{{t}}}",
               escape=latex_escape, minus="$-$", range="--")


def to_latex(table: Table, *, provenance: dict[str, Any] | None = None) -> str:
    """A booktabs ``tabular`` ready for ``\\input`` inside a ``table`` float (needs ``\\usepackage{booktabs}``).

    Provenance goes in ``%`` comments at the top; the footnotes follow the tabular in ``\\footnotesize``.
    """
    header, body, align = _grid(table, LATEX)
    lines = [f"% {line}" for line in provenance_lines(provenance or {})]
    lines += [f"% {table.title}", rf"\begin{{tabular}}{{{''.join(align)}}}", r"\toprule",
              " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    # "{}" guards a row that starts with "[": after "\\" it would be read as a [<skip>] argument
    lines += [("{}" if r[0].startswith("[") else "") + " & ".join(r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [n for n in [*table.notes, _units_note(table).strip("*")] if n]
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(latex_escape(n) for n in notes) + "}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CSV and provenance


def to_csv(table: Table, *, provenance: dict[str, Any] | None = None) -> str:
    """Raw numbers, one row per variant: fields, seed counts, then ``<metric>_<stat>`` columns."""
    stats = ["mean", "std", "n", "q25", "q75", "delta", "n_pairs", "mean_diff", "p", "ci_low", "ci_high", "significant",
             "sd_diff", "mdd", "seeds_needed", "best", "bold"]
    wide = table.cells.pivot(index="variant", columns="metric", values=stats)  # (variants, stats x metrics)
    wide.columns = [f"{m}_{s}" for s, m in wide.columns]
    order = [f"{m}_{s}" for m in table.metrics for s in stats]
    counts = ["n_expected", "n_finished", "n_failed", "n_running", "n_missing", "failures"]
    frame = table.rows[[*table.fields, *counts]].join(wide[order]).rename_axis("variant").reset_index()
    head = "".join(f"# {line}\n" for line in [*provenance_lines(provenance or {}), table.title])
    return head + frame.to_csv(index=False)


def provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """``Label: value`` lines in a fixed order; lists are comma-joined, a list of several git SHAs is flagged."""
    lines = []
    for key, label in PROVENANCE_KEYS:
        value = provenance.get(key)
        if value in (None, "", []):
            continue
        if isinstance(value, (list, tuple)):
            text = ", ".join(map(str, value))
            if key == "git_sha" and len(value) > 1:
                text += f" (WARNING: runs come from {len(value)} commits)"
        else:
            text = str(value)
        lines.append(f"{label}: {text}")
    return lines
