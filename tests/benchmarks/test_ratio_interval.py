"""benchmarks._common.ratio_interval: the bootstrap interval bench_train_step prints beside its step ratio."""
import random
import statistics

import pytest

from benchmarks._common import ratio_interval


def test_an_exact_ratio_has_a_zero_width_interval():
    fpn = [1500.0, 1400.0, 1650.0, 1550.0, 1480.0]
    low, high = ratio_interval([1.2 * t for t in fpn], fpn)
    assert low == pytest.approx(1.2) and high == pytest.approx(1.2)


def test_the_interval_brackets_the_ratio_and_narrows_with_more_rounds():
    rng = random.Random(0)

    def rounds(n):  # a shared per-round load factor, plus each step's own noise (as on the VM: ~10%)
        loads = [rng.uniform(0.8, 1.3) for _ in range(n)]
        return ([1.2 * 1500 * f * rng.gauss(1, 0.1) for f in loads], [1500 * f * rng.gauss(1, 0.1) for f in loads])

    widths = []
    for n in (8, 200):
        ddsm, fpn = rounds(n)
        low, high = ratio_interval(ddsm, fpn)
        assert low <= statistics.median(ddsm) / statistics.median(fpn) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert low < 1.2 < high  # 200 rounds: the true ratio is inside


def test_too_few_rounds_give_none_and_unpaired_lists_are_refused():
    assert ratio_interval([1.0, 2.0], [1.0, 2.0]) is None
    with pytest.raises(ValueError, match="one of each per round"):
        ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0])


def test_the_interval_is_reproducible():
    a, b = [1.0, 1.3, 1.1, 1.6, 1.2, 1.4], [1.0, 1.0, 1.1, 1.2, 1.0, 1.1]
    assert ratio_interval(a, b) == ratio_interval(a, b)
