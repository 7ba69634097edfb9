"""Statistical power in the report (known answers), bold withheld below the detectable difference, the IQR of an
isolated cost, descriptor fields only for the models that read them, and the split/cost provenance lines."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from reports import render
from reports.build import write_report
from reports.load import tidy_frame
from reports.stats import min_detectable_difference, paired_power, seeds_needed
from reports.tables import axis_tables, main_table, power_table


def _frame(per_variant: dict[str, tuple[dict, dict[int, dict]]]):
    """variant -> (params beyond the seed, {seed: metrics}) as the harness logs them (unread fields absent)."""
    records = []
    for variant, (params, seeds) in per_variant.items():
        for seed, metrics in seeds.items():
            records.append({"run": {"run_id": f"{variant}/{seed}", "variant": variant, "seed": seed, "status": "FINISHED",
                                    "start_time": 0, "attempts": 1},
                            "params": {**params, "train.seed": seed}, "metrics": metrics})
    return tidy_frame(records)


FPN = {"model.name": "fpn"}
# mIoU per seed: ddsm - fpn = +1, +2, +3 points (mean 2, sd 1 point); far = +10 every seed but for noise
FRAME = {
    "fpn": (FPN, {0: {"miou": 0.50}, 1: {"miou": 0.51}, 2: {"miou": 0.52}}),
    "ddsm[branches=dual]": ({"model.name": "ddsm", "model.branches": "dual"},
                            {0: {"miou": 0.51}, 1: {"miou": 0.53}, 2: {"miou": 0.55}}),
    "ddsm[branches=spatial]": ({"model.name": "ddsm", "model.branches": "spatial"},
                               {0: {"miou": 0.60}, 1: {"miou": 0.611}, 2: {"miou": 0.619}}),
}


def _bisect_mdd(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The hand computation: bisection on the noncentral-t power of the two-sided paired t-test."""
    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    lo, hi = 0.0, 100 * sd
    for _ in range(200):
        mid = (lo + hi) / 2
        nc = mid / (sd / math.sqrt(n))
        if stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc) < power:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_known_answers_noncentral_t():
    # sd of the paired differences 1 point, 3 pairs: MDD = 3.264 points (bisection on scipy.stats.nct by hand);
    # the normal approximation (z_0.975 + z_0.8) * sd / sqrt(n) = 1.618 would claim twice the sensitivity
    assert min_detectable_difference(0.01, 3) == pytest.approx(_bisect_mdd(0.01, 3), rel=1e-6)
    assert min_detectable_difference(0.01, 3) == pytest.approx(0.032640, abs=5e-6)
    assert paired_power(min_detectable_difference(0.01, 3), 0.01, 3) == pytest.approx(0.8, abs=1e-9)
    # Cohen's d_z = 0.5 (0.5 points at sd 1 point), alpha 0.05 two-sided, power 0.8: 34 pairs (G*Power's answer)
    assert seeds_needed(0.005, 0.01) == 34
    assert seeds_needed(0.005, 0.0) is None and math.isnan(min_detectable_difference(0.01, 1))


def test_power_table_states_the_hand_computed_mdd_and_seeds():
    df = _frame(FRAME)
    table = power_table(df, reference="fpn")
    dual = table.cells.set_index(["variant", "metric"]).loc[("ddsm[branches=dual]", "miou")]
    assert dual["n_pairs"] == 3 and dual["sd_diff"] == pytest.approx(0.01)
    assert dual["mdd"] == pytest.approx(_bisect_mdd(0.01, 3), rel=1e-6) and dual["seeds_needed"] == 34
    md = render.to_markdown(table)
    assert "| ddsm[branches=dual] | 3/3 | 3.26 (34 seeds) |" in md and "noncentral t" in md


def test_bold_is_withheld_below_the_minimum_detectable_difference():
    df = _frame({k: v for k, v in FRAME.items() if k != "ddsm[branches=spatial]"})
    cells = main_table(df, reference="fpn").cells.set_index(["variant", "metric"])
    best = cells.loc[("ddsm[branches=dual]", "miou")]
    assert best["best"] and best["delta"] == pytest.approx(0.02) and best["mdd"] > 0.03 and not best["bold"]
    df = _frame(FRAME)  # spatial: +10 points with a spread of 0.1 point: far above its MDD
    cells = main_table(df, reference="fpn").cells.set_index(["variant", "metric"])
    far = cells.loc[("ddsm[branches=spatial]", "miou")]
    assert far["best"] and far["bold"] and abs(far["delta"]) > far["mdd"]
    assert "**61.00**" in render.to_markdown(main_table(df, reference="fpn"))


def test_an_isolated_cost_prints_its_interquartile_range():
    frame = {v: (p, {s: {**m, "latency_ms": 5.0 + i, "latency_ms_p25": 4.5 + i, "latency_ms_p75": 5.5 + i}
                     for s, m in seeds.items()}) for i, (v, (p, seeds)) in enumerate(FRAME.items())}
    table = main_table(_frame(frame), reference="fpn")
    md = render.to_markdown(table)
    assert "**5.00** [4.50\u20135.50]" in md and "6.00 [5.50\u20136.50] (+1.00)" in md
    assert "median [p25\u2013p75]" in md
    assert r"\textbf{5.00} [4.50--5.50]" in render.to_latex(table)


def test_descriptors_only_for_models_that_read_the_field():
    frame = {**FRAME, "sfnet": ({"model.name": "sfnet"}, {0: {"miou": 0.5}, 1: {"miou": 0.5}, 2: {"miou": 0.5}})}
    df = _frame(frame)
    table = main_table(df, reference="fpn")
    md = render.to_markdown(table)
    assert "| fpn | fpn | \u2014 |" in md and "| ddsm[branches=dual] | ddsm | dual |" in md
    by_field = {t.fields[0]: t for t in axis_tables(df, reference="fpn")}
    model = by_field["model.name"]
    assert list(model.rows.index) == ["fpn", "ddsm[branches=dual]", "sfnet"]  # DDSM at its default branches
    assert "held: model.branches" not in model.notes[0] and "model.branches" in model.fields
    branches = by_field["model.branches"]
    assert list(branches.rows.index)[0] == "fpn" and branches.reference == "fpn"  # fpn heads the DDSM sweep
    assert "held: model.name=ddsm" in branches.notes[0]


def test_provenance_says_where_accuracy_and_cost_come_from(tmp_path):
    prov = {"accuracy_split": "val (the dataset's validation split), 6 runs",
            "cost_source": "isolated cost phase: one profiling task per variant",
            "split_leak": "WARNING: tuned on val, the split the confirm run reports"}
    paths = write_report(_frame(FRAME), tmp_path, baseline="fpn", provenance=prov)
    text = paths["report.md"].read_text()
    assert "- Accuracy metrics from: val" in text
    assert "- Cost columns (latency, train step, memory) from: isolated cost phase" in text
    assert "- WARNING, SPLIT: WARNING: tuned on val" in text
    assert "tables/power.md" in paths
