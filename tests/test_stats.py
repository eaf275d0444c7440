"""Paired statistics (es2.stats) against hand-computed values."""

import math

import pytest

from es2.stats import mcnemar_exact, paired_difference_interval, rate_with_interval, wilson_interval

T, F = True, False


def _pairs(both, only_a, only_b, neither):
    a = [T] * both + [T] * only_a + [F] * only_b + [F] * neither
    b = [T] * both + [F] * only_a + [T] * only_b + [F] * neither
    return a, b


def _closed_form_wilson(k, n, z=1.96):
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_wilson_matches_the_closed_form():
    assert wilson_interval(3, 10) == pytest.approx(_closed_form_wilson(3, 10), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
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


@pytest.mark.parametrize("k, n, z", [(0, 1, 1.96), (1, 1, 1.96), (0, 24, 1.96), (24, 24, 1.96), (7, 24, 2.576),
                                     (50, 100, 1.0)])
def test_wilson_is_the_closed_form_at_the_edges_and_other_levels(k, n, z):
    assert wilson_interval(k, n, z) == pytest.approx(_closed_form_wilson(k, n, z), abs=1e-9)


def test_wilson_refuses_bad_counts_and_rate_of_nothing_is_nan():
    for k, n in ((-1, 3), (0, -1), (4, 3)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)
    rate, low, high, n = rate_with_interval([])
    assert math.isnan(rate) and (low, high, n) == (0.0, 1.0, 0)


def test_newcombe_reproduces_the_published_example():
    # Fagerland, Lydersen & Laake (2017), "Statistical Analysis of Contingency Tables", ch. 8: complete response
    # before/after consolidation therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]; Newcombe square-and-add
    # estimate -0.0621, 95% CI -0.1186 to -0.0046 (both margins are "row 1" and "column 1" successes).
    a, b = _pairs(59, 6, 16, 80)
    low, high = paired_difference_interval(a, b)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)
    assert (6 - 16) / 161 == pytest.approx(-0.0621, abs=5e-5)


def test_newcombe_all_concordant_and_level():
    low, high = paired_difference_interval(*_pairs(6, 0, 0, 6))
    assert low < 0 < high and low == pytest.approx(-high)  # no discordant pair: centred on 0, still wide
    low, high = paired_difference_interval([T] * 12, [T] * 12)
    assert -1 < low < 0 < high < 1
    wide = paired_difference_interval(*_pairs(3, 6, 1, 10), alpha=0.01)
    narrow = paired_difference_interval(*_pairs(3, 6, 1, 10), alpha=0.2)
    assert wide[0] < narrow[0] and narrow[1] < wide[1]
    for alpha in (0, 1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            paired_difference_interval([T], [F], alpha)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_interval([T], [T, F])
