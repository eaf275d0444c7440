"""Paired statistics (es2.stats) against hand-computed values."""

import math

import pytest

from es2.stats import mcnemar_exact, paired_difference_interval, rate_with_interval, wilson_interval

T, F = True, False


def _pairs(both, only_a, only_b, neither):
    a = [T] * both + [T] * only_a + [F] * only_b + [F] * neither
    b = [T] * both + [F] * only_a + [T] * only_b + [F] * neither
    return a, b


def test_wilson_matches_the_closed_form():
    k, n, z = 3, 10, 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-4) and high == pytest.approx(centre + half, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    rate, lo, hi, n = rate_with_interval([T, F, F, F])
    assert (rate, n) == (0.25, 4) and lo < 0.25 < hi


@pytest.mark.parametrize("only_a, only_b, expected", [
    (5, 0, 2 * 0.5 ** 5),                        # 0.0625
    (6, 1, 2 * (1 + 7) / 2 ** 7),                # 0.125
    (8, 0, 2 * 0.5 ** 8),
    (3, 3, 1.0),
])
def test_mcnemar_exact_against_hand_computed_values(only_a, only_b, expected):
    a, b = _pairs(4, only_a, only_b, 5)  # concordant pairs never matter
    assert mcnemar_exact(a, b) == pytest.approx(expected)
    assert mcnemar_exact(b, a) == pytest.approx(expected)


def test_mcnemar_without_discordant_pairs_and_on_unequal_lengths():
    assert mcnemar_exact([T, F], [T, F]) == 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([T], [T, F])


def test_newcombe_interval_contains_the_estimate_and_stays_in_range():
    a, b = _pairs(2, 8, 1, 9)  # 20 pairs: rate(a) 0.5, rate(b) 0.15
    low, high = paired_difference_interval(a, b)
    assert -1 <= low < 0.35 < high <= 1
    assert 0 < low  # 8 vs 1 discordant: clearly positive
    assert paired_difference_interval([], []) == (-1.0, 1.0)
    extreme = paired_difference_interval([T] * 10, [F] * 10)
    assert extreme[1] == 1.0 and 0.5 < extreme[0] < 1.0


def test_newcombe_interval_shrinks_with_n_and_is_symmetric_under_swapping():
    widths = []
    for scale in (1, 4, 16):
        a, b = _pairs(5 * scale, 3 * scale, 3 * scale, 9 * scale)
        low, high = paired_difference_interval(a, b)
        assert low < 0 < high and low == pytest.approx(-high, abs=1e-9)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    a, b = _pairs(3, 6, 1, 10)
    low, high = paired_difference_interval(a, b)
    assert paired_difference_interval(b, a) == pytest.approx((-high, -low))
