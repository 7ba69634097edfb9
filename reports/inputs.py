"""What the figures beyond the tables read: metric histories, resume points and each cell's ``views/``.

:class:`FigureInputs` is filled by :func:`harness.mlflow_io.load_figure_inputs` from MLflow alone (no model,
no GPU, no dataset) and by tests from plain frames; :func:`reports.build.write_report` draws from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["HISTORY_COLUMNS", "FigureInputs", "resume_steps"]

HISTORY_COLUMNS = ["run_id", "metric", "step", "value", "timestamp"]


@dataclass
class FigureInputs:
    """histories: one row per logged point (:data:`HISTORY_COLUMNS`, timestamp in ms); resumes: columns
    run_id, step (where a later attempt resumed the cell from a checkpoint); views: run id -> a local copy of
    the cell's ``views/`` folder (:mod:`ddsm.viz.views`); settings: the spec's ``figures`` block."""

    histories: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=HISTORY_COLUMNS))
    resumes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["run_id", "step"]))
    views: dict[str, Path] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def resume_steps(history: pd.DataFrame, attempts: list[dict[str, Any]]) -> list[int]:
    """The steps where the attempts after the first resumed one run: the first step that run logged after
    that attempt started (``attempts.jsonl`` records each launch's start ``time`` in s and ``resumed``).

    history: the run's points (:data:`HISTORY_COLUMNS`) of any train metric.
    """
    out = []
    for a in attempts[1:]:
        if not a.get("resumed"):
            continue
        later = history[history["timestamp"] >= float(a["time"]) * 1000.0]
        if len(later):
            out.append(int(later["step"].min()))
    return sorted(set(out))
