"""Reports: a tracking store filled here with known values -> tables, markers, LaTeX, PNGs, CLI.

The grid (3 seeds each, reference ``fpn``), logged the way ``harness/grid.py`` logs a grid::

    fpn                 seeds 0 1 2 finished (seed 2 by an earlier launch, under an older parent run)
    ddsm[num_points=4]  seeds 0 1 2 finished (seed 1 after an oom retry; per-class IoU only as an artifact)
    ddsm[num_points=9]  seeds 0 1 finished, seed 2 FAILED (oom) after logging a partial miou of 0.99
    ddsm[num_points=16] seed 0 finished, seed 1 never started, seed 2 KILLED
    ddsm[num_points=25] planned in the parent's grid.json, never started

Expected p-values are closed forms of Student's t: two-sided p = 1 - (2/pi) atan|t| for 1 degree of
freedom and p = 1 - |t| / sqrt(t^2 + 2) for 2.
"""
from __future__ import annotations

import math
import re
import types

import numpy as np
import pandas as pd
import pytest

from reports import render
from reports.build import write_report
from reports.figures import pareto_front
from reports.load import (cell_status, coerce_param, select_attempts, tidy_frame, tolerance_of, varying_fields)
from reports.stats import paired_test
from reports.tables import axis_tables, main_table, per_class_tables

# variant -> (baseline tag, model.name, model.num_points, {seed: metrics} of the finished seeds)
FINISHED = {
    "fpn": ("fpn", "fpn", 9, {
        0: dict(miou=0.50, bf_1px=0.30, bf_2px=0.40, biou=0.20, gflops=10.0, params_m=12.0, latency_ms=5.0,
                peak_mem_mb=500.0, iou_road=0.90, iou_pole=0.10),
        1: dict(miou=0.52, bf_1px=0.32, bf_2px=0.42, biou=0.21, gflops=10.0, params_m=12.0, latency_ms=5.2,
                peak_mem_mb=500.0, iou_road=0.90, iou_pole=0.12),
        2: dict(miou=0.54, bf_1px=0.34, bf_2px=0.44, biou=0.22, gflops=10.0, params_m=12.0, latency_ms=5.1,
                peak_mem_mb=500.0, iou_road=0.90, iou_pole=0.14)}),
    "ddsm[num_points=4]": ("ddsm", "ddsm", 4, {
        0: dict(miou=0.55, bf_1px=0.31, bf_2px=0.41, biou=0.22, gflops=11.0, params_m=12.5, latency_ms=6.0,
                peak_mem_mb=600.0, iou_road=0.90, iou_pole=0.20),
        1: dict(miou=0.56, bf_1px=0.31, bf_2px=0.41, biou=0.24, gflops=11.0, params_m=12.5, latency_ms=6.1,
                peak_mem_mb=600.0, iou_road=0.91, iou_pole=0.20),
        2: dict(miou=0.60, bf_1px=0.37, bf_2px=0.47, biou=0.24, gflops=11.0, params_m=12.5, latency_ms=6.2,
                peak_mem_mb=600.0, iou_road=0.89, iou_pole=0.26)}),
    "ddsm[num_points=9]": ("ddsm", "ddsm", 9, {
        0: dict(miou=0.52, bf_1px=0.33, bf_2px=0.43, biou=0.21, gflops=12.0, params_m=12.5, latency_ms=7.0,
                peak_mem_mb=650.0, iou_road=0.88, iou_pole=0.15),
        1: dict(miou=0.56, bf_1px=0.36, bf_2px=0.46, biou=0.23, gflops=12.0, params_m=12.5, latency_ms=7.2,
                peak_mem_mb=650.0, iou_road=0.90, iou_pole=0.18)}),
    "ddsm[num_points=16]": ("ddsm", "ddsm", 16, {
        0: dict(miou=0.58, bf_1px=0.40, bf_2px=0.50, biou=0.25, gflops=14.0, params_m=12.6, latency_ms=9.0,
                peak_mem_mb=800.0, iou_road=0.90, iou_pole=0.30)}),
}
# (variant, seed, status, failure_class, partial metrics logged before failing)
UNFINISHED = [("ddsm[num_points=9]", 2, "FAILED", "oom", {"miou": 0.99}),
              ("ddsm[num_points=16]", 2, "KILLED", "killed", {})]
PLANNED = [{"variant": v, "seed": s, "hash": f"h{n}{s}"}
           for v, n in [(v, spec[2]) for v, spec in FINISHED.items()] + [("ddsm[num_points=25]", 25)]
           for s in (0, 1, 2)]
SHA = "0123456789abcdef0123456789abcdef01234567"


def fill_store(uri: str, artifact_root: str, *, experiment: str = "toy") -> dict[str, str]:
    """Create the grid above in an MLflow store; return the experiment and parent run ids."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(uri)
    exp = client.create_experiment(experiment, artifact_location=artifact_root)
    grid_tags = {"kind": "grid", "spec": "ablations/toy.yaml", "git_sha": SHA, "baseline": "fpn", "smoke": "False"}
    older = client.create_run(exp, tags=grid_tags, run_name="grid (earlier launch)").info.run_id
    parent = client.create_run(exp, tags=grid_tags, run_name="grid").info.run_id
    client.log_batch(parent, params=[Param("seeds", "[0, 1, 2]"), Param("cells", str(len(PLANNED)))])
    client.log_dict(parent, {"name": experiment, "cells": PLANNED}, "grid.json")

    def child(variant: str, family: str, name: str, n: int, seed: int, metrics: dict, status: str,
              failure: str = "none") -> None:
        retried = variant == "ddsm[num_points=4]" and seed == 1
        tags = {"mlflow.parentRunId": older if (variant, seed) == ("fpn", 2) else parent, "kind": "cell",
                "variant": variant, "seed": str(seed), "cell_hash": f"h{n}{seed}", "baseline": family,
                "git_sha": SHA, "device": "NVIDIA H100 80GB HBM3", "torch": "2.14.1", "failure_class": failure,
                "attempts": "2" if retried else "1", "failures": "oom" if retried else ""}
        run = client.create_run(exp, tags=tags, run_name=f"{variant}/seed={seed}").info.run_id
        params = {"model.name": name, "model.num_points": n, "model.branches": "dual", "data.name": "synthetic",
                  "eval.tolerances": "[1.0, 2.0]", "train.seed": seed}
        as_artifact = variant == "ddsm[num_points=4]" and status == "FINISHED"
        logged = {k: v for k, v in metrics.items() if not (as_artifact and k.startswith("iou_"))}
        client.log_batch(run, metrics=[Metric(k, v, 0, 0) for k, v in logged.items()],
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("mlflow.runName", f"{variant}/seed={seed}")])
        if as_artifact:
            client.log_text(run, f"class_id,class_name,iou\n0,road,{metrics['iou_road']}\n"
                                 f"1,pole,{metrics['iou_pole']}\n", "per_class_iou.csv")
        client.set_terminated(run, status)

    for variant, (family, name, n, per_seed) in FINISHED.items():
        for seed, metrics in per_seed.items():
            child(variant, family, name, n, seed, metrics, "FINISHED")
    for variant, seed, status, failure, partial in UNFINISHED:
        family, name, n, _ = FINISHED[variant]
        child(variant, family, name, n, seed, partial, status, failure)
    client.set_terminated(older, "FAILED")
    client.set_terminated(parent, "FINISHED")
    return {"experiment_id": exp, "parent": parent, "older": older}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ids = fill_store(uri, (root / "artifacts").as_uri())
    return types.SimpleNamespace(uri=uri, **ids)


@pytest.fixture(scope="module")
def grid(store):
    from harness.mlflow_io import load_runs

    return load_runs(store.uri, experiment="toy")


@pytest.fixture(scope="module")
def main(grid):
    status = cell_status(grid.frame, expected=grid.expected)
    return main_table(grid.frame, reference="fpn", status=status)


def cell(table, variant, metric):
    return table.cells.set_index(["variant", "metric"]).loc[(variant, metric)]


def p_df1(t):
    return 1 - 2 / math.pi * math.atan(abs(t))


def p_df2(t):
    return 1 - abs(t) / math.sqrt(t * t + 2)


# ----------------------------------------------------------------------------- loading


def test_load_excludes_parent_and_keeps_every_cell_run(grid, store):
    from harness.mlflow_io import load_runs

    runs = grid.frame.groupby("run_id").head(1)
    assert len(runs) == 11 and not {store.parent, store.older} & set(runs["run_id"])
    assert set(runs["variant"]) == set(FINISHED)
    assert grid.provenance["parent_run_ids"] == [store.older, store.parent]
    assert grid.provenance["spec"] == "toy" and grid.provenance["spec_path"] == "ablations/toy.yaml"
    assert grid.provenance["git_sha"] == [SHA] and grid.provenance["spec_baseline"] == "fpn"
    assert grid.provenance["hardware"] == ["NVIDIA H100 80GB HBM3"]
    assert grid.frame["model.num_points"].dtype.kind == "i"  # params come back as numbers
    assert len(grid.expected) == 15  # from grid.json
    bare = load_runs(store.uri, experiment="toy", read_artifacts=False)  # expected = variants seen x seeds param
    assert len(bare.expected) == 12 and set(bare.expected["seed"]) == {0, 1, 2}


def test_per_class_iou_from_artifact(grid):
    d4 = grid.frame[grid.frame["variant"].eq("ddsm[num_points=4]") & grid.frame["metric"].eq("iou_pole")]
    assert sorted(d4["value"]) == pytest.approx([0.20, 0.20, 0.26])


def test_pagination_small_pages_on_the_store(store, grid):
    from harness.mlflow_io import load_runs

    # 13 runs -> 5 pages; fpn seed 2 (finished under the older parent) is found by its planned hash
    paged = load_runs(store.uri, parent_run_id=store.parent, page_size=3)
    assert sorted(paged.frame["run_id"].unique()) == sorted(grid.frame["run_id"].unique())
    assert paged.provenance["parent_run_ids"] == [store.parent]


# ----------------------------------------------------------------------------- numbers


def test_means_stds_and_deltas_match_hand_values(main):
    c = cell(main, "ddsm[num_points=4]", "miou")
    assert (c["mean"], c["n"], c["delta"]) == (pytest.approx(0.57), 3, pytest.approx(0.05))
    assert c["std"] == pytest.approx(math.sqrt((0.02**2 + 0.01**2 + 0.03**2) / 2))
    base = cell(main, "fpn", "miou")
    assert (base["mean"], base["std"]) == (pytest.approx(0.52), pytest.approx(0.02)) and np.isnan(base["delta"])
    # the failed seed's partial miou (0.99) is not averaged in
    d9 = cell(main, "ddsm[num_points=9]", "miou")
    assert (d9["mean"], d9["n"], d9["delta"]) == (pytest.approx(0.54), 2, pytest.approx(0.02))
    assert cell(main, "ddsm[num_points=16]", "latency_ms")["delta"] == pytest.approx(9.0 - 5.1)


def test_significance_markers_match_closed_form_p(main):
    d4 = cell(main, "ddsm[num_points=4]", "miou")  # diffs .05 .04 .06
    assert d4["p"] == pytest.approx(p_df2(0.05 / (0.01 / math.sqrt(3))), rel=1e-6) and d4["significant"]
    bf = cell(main, "ddsm[num_points=4]", "bf_1px")  # diffs .01 -.01 .03
    assert bf["p"] == pytest.approx(p_df2(0.01 / (0.02 / math.sqrt(3))), rel=1e-6) and not bf["significant"]
    d9 = cell(main, "ddsm[num_points=9]", "miou")  # diffs .02 .04 (seed 2 failed)
    assert (d9["n_pairs"], d9["mean_diff"]) == (2, pytest.approx(0.03))
    assert d9["p"] == pytest.approx(p_df1(3.0), rel=1e-6) and not d9["significant"]
    d16 = cell(main, "ddsm[num_points=16]", "miou")
    assert d16["n_pairs"] == 1 and not d16["testable"] and not d16["significant"]
    assert not cell(main, "ddsm[num_points=4]", "gflops")["tested"]  # cost metrics are not tested


def test_best_per_column_higher_accuracy_lower_cost(main):
    best = main.cells[main.cells["best"]].set_index("metric")["variant"]
    assert best["miou"] == "ddsm[num_points=16]" and best["gflops"] == "fpn" and best["latency_ms"] == "fpn"


def test_failed_missing_and_planned_cells_are_counted(main):
    rows = main.rows
    assert render.seeds_text(rows.loc["ddsm[num_points=9]"]) == "2/3 (1 failed: oom)"
    assert render.seeds_text(rows.loc["ddsm[num_points=16]"]) == "1/3 (1 failed: killed, 1 missing)"
    assert render.seeds_text(rows.loc["ddsm[num_points=25]"]) == "0/3 (3 missing)"
    assert render.seeds_text(rows.loc["fpn"]) == "3/3"
    assert list(rows.index)[0] == "fpn" and main.fields == ["model.name", "model.num_points"]


def test_axis_tables_hold_the_other_fields(grid):
    tables = {t.fields[0]: t for t in axis_tables(grid.frame, reference="fpn")}
    assert list(tables["model.name"].rows.index) == ["fpn", "ddsm[num_points=9]"]
    sweep = tables["model.num_points"]
    assert list(sweep.rows.index) == ["ddsm[num_points=4]", "ddsm[num_points=9]", "ddsm[num_points=16]"]
    assert sweep.reference == "ddsm[num_points=9]"  # the row with the reference's N
    assert cell(sweep, "ddsm[num_points=4]", "miou")["delta"] == pytest.approx(0.57 - 0.54)


def test_per_class_deltas(grid):
    means, deltas = per_class_tables(grid.frame, reference="fpn")
    assert cell(deltas, "ddsm[num_points=4]", "iou_pole")["delta"] == pytest.approx(0.22 - 0.12)
    assert "fpn" not in deltas.rows.index and cell(means, "fpn", "iou_road")["mean"] == pytest.approx(0.90)


# ----------------------------------------------------------------------------- rendering and files


def test_markdown_cells_show_mean_std_delta_marker_and_na(main):
    md = render.to_markdown(main)
    row = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "57.00 ± 2.65 (+5.00†)" in row["ddsm[num_points=4]"]
    # the best mIoU rests on one seed: no paired test, no power, so it is not bold (bold = tellable from fpn)
    assert "| 58.00 (+6.00, n/a)" in row["ddsm[num_points=16]"]
    assert "54.00 ± 2.83 (+2.00)" in row["ddsm[num_points=9]"] and "2/3 (1 failed: oom)" in row["ddsm[num_points=9]"]
    assert "**10.00**" in row["fpn"]  # lowest GFLOPs in bold, no "± 0.00" for a constant cost
    assert "ttest_rel" in md and "n/a: fewer than 2 paired seeds" in md


def _unescaped(text: str, ch: str) -> int:
    return len(re.findall(rf"(?<!\\){re.escape(ch)}", text))


def test_latex_is_booktabs_and_balanced(main):
    tex = render.to_latex(main, provenance={"spec": "toy_grid", "git_sha": [SHA]})
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    text = "\n".join(body)
    assert text.index(r"\toprule") < text.index(r"\midrule") < text.index(r"\bottomrule")
    assert _unescaped(text, "{") == _unescaped(text, "}")
    for ch in "_%#":
        assert _unescaped(text, ch) == 0, ch
    rows = [line for line in body if line.endswith(r"\\") and "&" in line]
    assert {_unescaped(r, "&") for r in rows} == {len(main.fields) + 2 + len(main.metrics) - 1}
    assert r"num\_points" in text and "% Spec: toy_grid" in tex


def test_latex_escape():
    assert render.latex_escape("a_b & 50% #1 {x} ~ ^") == r"a\_b \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{}"


def test_write_report_files(grid, tmp_path):
    written = write_report(grid.frame, tmp_path, provenance=grid.provenance, expected=grid.expected)
    pngs = [p for rel, p in written.items() if rel.endswith(".png")]
    assert {p.name for p in pngs} == {"miou_vs_gflops.png", "miou_vs_latency.png", "bf_vs_tolerance.png",
                                      "sweep_model_num_points.png", "per_class_delta.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    report = written["report.md"].read_text()
    head = report[: report.index("## Runs per cell")]
    for must in ("toy", grid.provenance["experiment_id"], grid.provenance["parent_run_ids"][0], SHA, "H100",
                 "Baseline (deltas vs): fpn"):
        assert must in head
    assert "failed (oom)" in report and "missing" in report and "ok, 2 attempts (oom)" in report
    csv = pd.read_csv(written["tables/main.csv"], comment="#")
    assert csv.set_index("variant").loc["ddsm[num_points=4]", "miou_mean"] == pytest.approx(0.57)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("which", [["--experiment", "nope"], ["--run", "0" * 32]])
def test_cli_unknown_experiment_or_run_exits_2(store, tmp_path, capsys, which):
    from harness.cli import main

    assert main(["report", *which, "--tracking-uri", store.uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err


def test_cli_missing_store_exits_2_without_creating_it(tmp_path, capsys):
    from harness.cli import main

    db = tmp_path / "none.db"
    assert main(["report", "--experiment", "toy", "--tracking-uri", str(db), "--out", str(tmp_path)]) == 2
    assert not db.exists() and "does not exist" in capsys.readouterr().err


def test_cli_writes_report_for_a_parent_run(store, tmp_path):
    from harness.cli import main

    assert main(["report", "--run", store.parent, "--tracking-uri", store.uri, "--out", str(tmp_path),
                 "--baseline", "ddsm[num_points=9]", "--method", "bootstrap"]) == 0
    assert "Baseline (deltas vs): ddsm[num_points=9]" in (tmp_path / "report.md").read_text()
    assert "CI [" in (tmp_path / "tables" / "significance.md").read_text()


def test_cli_unknown_baseline_exits_2(store, tmp_path, capsys):
    from harness.cli import main

    assert main(["report", "--experiment", "toy", "--tracking-uri", store.uri, "--out", str(tmp_path),
                 "--baseline", "deeplab"]) == 2
    assert "baseline='deeplab'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pure helpers


def test_coerce_param_and_tolerance():
    assert [coerce_param(v) for v in ["9", "0.5", "None", "True", "[1.0, 2.0]", "fpn"]] == \
        [9, 0.5, None, True, "[1.0, 2.0]", "fpn"]
    assert (tolerance_of("bf_2px"), tolerance_of("bf_0.0075"), tolerance_of("biou")) == (2.0, 0.0075, None)


def test_pareto_front_known_answer():
    # (cost, acc): fpn (10, .52) d4 (11, .57) d9 (12, .54) d16 (14, .58) tie (11, .57)
    mask = pareto_front(np.array([10, 11, 12, 14, 11, np.nan]), np.array([0.52, 0.57, 0.54, 0.58, 0.57, 0.9]))
    assert mask.tolist() == [True, True, False, True, True, False]


def test_paired_test_bootstrap_and_untestable():
    a, b = pd.Series([0.6, 0.7], index=[0, 1]), pd.Series([0.5, 0.6], index=[0, 1])
    r = paired_test(a, b, method="bootstrap")  # identical differences: the interval is the point 0.1
    assert r.testable and r.significant and (r.ci_low, r.ci_high) == (pytest.approx(0.1), pytest.approx(0.1))
    r = paired_test(a, pd.Series([0.5], index=[1]))
    assert (r.n_pairs, r.testable) == (1, False)


def _record(run_id, variant, seed, status, start, miou, data_seed):
    return {"run": {"run_id": run_id, "variant": variant, "seed": seed, "status": status, "start_time": start},
            "params": {"model.name": variant, "data.seed": str(data_seed), "train.seed": str(seed)},
            "metrics": {"miou": miou} if miou is not None else {}}


def test_variant_derived_from_varying_params_when_untagged():
    rec = [{"run": {"run_id": f"r{i}", "status": "FINISHED"}, "metrics": {"miou": 0.5},
            "params": {"model.name": name, "train.seed": str(seed), "data.seed": str(seed)}}
           for i, (name, seed) in enumerate([("fpn", 0), ("ddsm", 0), ("fpn", 1)])]
    df = tidy_frame(rec)
    assert df[["variant", "seed"]].values.tolist() == [["model.name=fpn", 0], ["model.name=ddsm", 0],
                                                       ["model.name=fpn", 1]]


def test_reports_package_never_imports_mlflow():
    import ast
    from pathlib import Path

    for path in Path(__file__).resolve().parents[2].joinpath("reports").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("mlflow", "harness")], path


def test_attempts_and_varying_fields_on_a_hand_frame():
    df = tidy_frame([_record("a", "fpn", 0, "FAILED", 1, None, 0), _record("b", "fpn", 0, "FINISHED", 2, 0.5, 0),
                     _record("c", "fpn", 0, "FAILED", 3, None, 0), _record("d", "ddsm", 0, "FINISHED", 4, 0.6, 1)])
    chosen = select_attempts(df.groupby("run_id").head(1))
    assert chosen.set_index("variant").loc["fpn", ["run_id", "attempts"]].tolist() == ["b", 3]
    assert varying_fields(df) == ["model.name", "data.seed"]
    status = cell_status(df)
    assert status["state"].tolist() == ["finished", "finished"]


def test_all_metrics_marks_the_lowest_cost_best_and_no_best_for_counters(tmp_path):
    """Every scalar metric is in tables/all_metrics.csv; cost (gmacs, train_time_s) is best when lowest, and a
    metric the catalogue has no direction for (step) is never marked."""
    runs = {"fpn": dict(miou=0.50, gmacs=5.0, train_time_s=20.0, step=64),
            "ddsm": dict(miou=0.60, gmacs=6.0, train_time_s=30.0, step=64)}
    df = tidy_frame({"run": {"run_id": f"{v}{seed}", "variant": v, "seed": seed, "status": "FINISHED"},
                     "params": {"model.name": v, "train.seed": str(seed)},
                     "metrics": {k: x + 0.01 * seed for k, x in m.items()}}
                    for v, m in runs.items() for seed in (0, 1))
    written = write_report(df, tmp_path, baseline="fpn")
    csv = pd.read_csv(written["tables/all_metrics.csv"], comment="#").set_index("variant")
    assert csv.loc["fpn", "gmacs_best"] and not csv.loc["ddsm", "gmacs_best"]
    assert csv.loc["fpn", "train_time_s_best"] and not csv.loc["ddsm", "train_time_s_best"]
    assert csv.loc["ddsm", "miou_best"] and not csv.loc["fpn", "miou_best"]
    assert not csv["step_best"].any()
    assert csv.loc["ddsm", "gmacs_mean"] == pytest.approx(6.005)
