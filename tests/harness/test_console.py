"""harness.console: the grid's end-of-run comparison (mean ± std over seeds, as the report computes it)."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from harness.console import comparison_rows, summary_metric_keys


def _result(variant: str, seed: int, miou: float, status: str = "finished"):
    cell = NS(variant=variant, reference="fpn", hash=f"{variant}{seed}")
    return NS(cell=cell, status=status, metrics={"miou": miou})


def test_comparison_rows_mean_std_and_delta():
    rows = comparison_rows([_result("fpn", 0, 0.4), _result("fpn", 1, 0.6), _result("ddsm", 0, 0.7),
                            _result("ddsm", 1, 0.9), _result("ddsm", 2, 0.1, status="failed")])
    fpn, ddsm = rows
    assert (fpn["n"], fpn["mean"]["miou"], fpn["delta_miou"]) == (2, pytest.approx(0.5), None)
    assert fpn["std"]["miou"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of (0.4, 0.6)
    assert (ddsm["n"], ddsm["of"]) == (2, 3)
    assert ddsm["delta_miou"] == pytest.approx(0.3)


def test_one_seed_has_std_0_and_a_variant_without_results_is_listed():
    fpn, ddsm = comparison_rows([_result("fpn", 0, 0.5), _result("ddsm", 0, 0.7, status="failed")])
    assert (fpn["mean"], fpn["std"], fpn["n"]) == ({"miou": 0.5}, {"miou": 0.0}, 1)
    assert (ddsm["n"], ddsm["of"], ddsm["mean"], ddsm["delta_miou"]) == (0, 1, {}, None)


def test_summary_columns_follow_the_catalogue_order():
    keys = summary_metric_keys([{"latency_ms": 1, "bf_2px": 0.1, "miou": 0.5, "bf_0.0075": 0.2, "biou": 0.3,
                                 "step": 4}])
    assert keys == ["miou", "bf_0.0075", "bf_2px", "biou", "latency_ms"]
