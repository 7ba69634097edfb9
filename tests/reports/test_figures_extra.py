"""Learning curves with seed bands, per-class boundary F, label placement and the report's figure list (issue 16)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from reports import figures, tables
from reports.build import write_report
from reports.curves import seed_band
from reports.inputs import HISTORY_COLUMNS, FigureInputs, resume_steps
from reports.load import tidy_frame


def _frame() -> pd.DataFrame:
    recs = []
    for i, (variant, seed, miou, pole, sky) in enumerate([("fpn", 0, 0.40, 0.10, 0.80), ("fpn", 1, 0.44, 0.14, 0.82),
                                                           ("ddsm", 0, 0.50, 0.30, 0.81), ("ddsm", 1, 0.52, 0.34, 0.85)]):
        recs.append({"run": {"run_id": f"r{i}", "variant": variant, "seed": seed, "status": "FINISHED",
                             "start_time": i},
                     "params": {"model.name": variant, "train.seed": str(seed), "data.name": "camvid"},
                     "metrics": {"miou": miou, "bf_2px": (pole + sky) / 2, "bf_2px/pole": pole, "bf_2px/sky": sky,
                                 "bf_1px/pole": pole / 2}})
    return tidy_frame(recs)


def _history() -> pd.DataFrame:
    rows = [
        # run, metric, step, value, timestamp (ms)
        ("r0", "miou", 10, 0.20, 1), ("r0", "miou", 20, 0.40, 2),
        ("r1", "miou", 10, 0.30, 1), ("r1", "miou", 20, 0.35, 2), ("r1", "miou", 20, 0.44, 9),  # re-logged: latest
        ("r2", "miou", 10, 0.25, 1), ("r2", "miou", 20, 0.50, 2),
        ("r3", "miou", 10, 0.45, 1), ("r3", "miou", 20, 0.52, 2),
        ("r0", "loss", 10, 2.0, 1), ("r1", "loss", 10, 1.5, 1),
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def test_seed_band_is_mean_and_std_over_seeds():
    band = seed_band(_frame(), _history(), metric="miou").set_index(["variant", "step"])
    fpn10, fpn20, ddsm10 = band.loc[("fpn", 10)], band.loc[("fpn", 20)], band.loc[("ddsm", 10)]
    assert fpn10["mean"] == pytest.approx(0.25) and fpn10["std"] == pytest.approx(np.sqrt(0.005))  # 0.2, 0.3
    assert fpn20["mean"] == pytest.approx(0.42) and fpn20["std"] == pytest.approx(np.sqrt(0.0008))  # 0.40, 0.44
    assert (fpn20["min"], fpn20["max"], fpn20["n"]) == (0.40, 0.44, 2)
    assert ddsm10["mean"] == pytest.approx(0.35) and ddsm10["std"] == pytest.approx(np.std([0.25, 0.45], ddof=1))


def test_resume_steps_from_attempt_start_times():
    hist = pd.DataFrame([("r", "loss", s, 1.0, t) for s, t in [(8, 1000), (16, 2000), (24, 9000), (32, 9500)]],
                        columns=HISTORY_COLUMNS)
    attempts = [{"attempt": 1, "time": 0.5, "resumed": False}, {"attempt": 2, "time": 8.0, "resumed": True}]
    assert resume_steps(hist, attempts) == [24]
    assert resume_steps(hist, attempts[:1]) == []


def test_per_class_bf_table_at_the_chosen_tolerance():
    df = _frame()
    t = tables.per_class_bf_table(df, reference="fpn")
    assert t.metrics == ["bf_1px/pole"]  # the smallest tolerance by default
    t = tables.per_class_bf_table(df, reference="fpn", bf="bf_2px")
    assert t.metrics == ["bf_2px/pole", "bf_2px/sky"]
    delta = t.cells.set_index(["variant", "metric"]).loc[("ddsm", "bf_2px/pole"), "delta"]
    assert delta == pytest.approx(0.32 - 0.12)
    assert tables.per_class_bf_table(df, reference="fpn", bf="bf_3px") is None


def test_labels_never_overlap(tmp_path):
    fig, (ax,) = figures._new()
    xs, ys = np.array([1.0, 1.01, 1.02, 2.0, 1.005]), np.array([5.0, 5.02, 4.98, 3.0, 5.01])
    ax.plot(xs, ys, "o")
    ax.margins(0.3)
    anns = figures.place_labels(ax, xs, ys, ["ddsm[branches=spatial]", "ddsm[branches=dual]", "sfnet", "fpn",
                                             "ddsm[branches=channel]"])
    renderer = fig.canvas.get_renderer()
    boxes = [figures._text_box(a, renderer) for a in anns]  # the text (leader lines may cross)
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())


def test_report_links_every_figure_with_a_caption(tmp_path):
    inputs = FigureInputs(histories=_history(), settings={"tolerance": 2})
    written = write_report(_frame(), tmp_path, baseline="fpn", figure_inputs=inputs)
    assert {"figures/learning_curves.png", "figures/per_class_bf_thin.png", "tables/per_class_bf.md",
            "tables/per_class_bf.tex", "tables/per_class_bf.csv"} <= set(written)
    md = (tmp_path / "report.md").read_text()
    assert "![learning_curves](figures/learning_curves.png)\n\n*Validation mIoU" in md
    assert "Classes: pole, sign_symbol, pedestrian, bicyclist." in md  # CamVid's thin classes
    assert "Per-class boundary F (BF@2px)" in md
