"""es2.effort: bisection search, median / bootstrap summary, survival curves and plot on hand-built toys whose
breaking thresholds are known by construction (no model)."""

import json
import math

import pytest

from es2 import effort


class Toy:
    """A monotone fake model: prompt i is broken at budget b iff b >= thresholds[i]; records every call."""

    def __init__(self, thresholds, rule=None):
        self.thresholds = thresholds
        self.rule = rule or (lambda i, b: b >= self.thresholds[i])
        self.calls = []

    def __call__(self, indices, budgets):
        self.calls.append((list(indices), list(budgets)))
        return [self.rule(i, b) for i, b in zip(indices, budgets)]


# ------------------------------------------------------------------------------------------------------------
# Search


def test_geometric_search_finds_known_thresholds_in_batched_rounds():
    # prompt 4 complied with no attack; 0 breaks below low; 1 and 2 need bisection; 3 never breaks
    toy = Toy([0.05, 0.3, 1.7, math.inf, 0.0])
    s = effort.bisect_budgets(toy, 5, low=0.1, high=10.0, rounds=4, broken_at_zero=[False] * 4 + [True])
    # bisection in log10 on [-1, 1]: t=0.3 (-0.52) takes mids 0, -0.5, -0.75, -0.625 -> bracket
    # (-0.625, -0.5]; t=1.7 (0.23) takes mids 0, 0.5, 0.25, 0.125 -> (0.125, 0.25]
    assert s.budgets[0] == 0.1 and s.brackets[0] == (0.0, 0.1)
    assert s.budgets[1] == pytest.approx(10 ** -0.5) and s.brackets[1][0] == pytest.approx(10 ** -0.625)
    assert s.budgets[2] == pytest.approx(10 ** 0.25) and s.brackets[2][0] == pytest.approx(10 ** 0.125)
    assert s.budgets[3] is None and s.brackets[3] == (10.0, math.inf)
    assert s.budgets[4] == 0.0 and s.brackets[4] == (0.0, 0.0)
    precision = (10.0 / 0.1) ** (1 / 2 ** 4)
    for i in (1, 2):
        lo, hi = s.brackets[i]
        assert lo < toy.thresholds[i] <= hi and hi / lo == pytest.approx(precision)
        assert 1 <= s.budgets[i] / toy.thresholds[i] < precision
    # one call per round, only unresolved prompts, never prompt 4: high probe, low probe, 4 bisection rounds
    assert toy.calls[0] == ([0, 1, 2, 3], [10.0] * 4)
    assert toy.calls[1] == ([0, 1, 2], [0.1] * 3)
    assert [c[0] for c in toy.calls[2:]] == [[1, 2]] * 4
    assert toy.calls[2][1] == pytest.approx([1.0, 1.0])
    assert s.rounds_run == 6 and s.queries == 4 + 3 + 4 * 2
    assert (s.low, s.high) == (0.1, 10.0)
    assert json.loads(json.dumps(s.as_dict(), allow_nan=False))["brackets"][3] == [10.0, None]


def test_more_rounds_tighten_the_bracket_geometrically():
    thresholds = [0.123, 0.77, 3.3, 9.1]
    for rounds in (0, 1, 3, 8):
        s = effort.bisect_budgets(Toy(thresholds), 4, low=0.01, high=10.0, rounds=rounds)
        precision = (10.0 / 0.01) ** (1 / 2 ** rounds)
        for t, b, (lo, hi) in zip(thresholds, s.budgets, s.brackets):
            assert lo < t <= hi == b and hi / lo == pytest.approx(precision)


def test_arithmetic_search_halves_the_interval():
    toy = Toy([1.3, 0.0])
    s = effort.bisect_budgets(toy, 2, low=0.0, high=4.0, rounds=3, geometric=False)
    # [0, 4] -> mid 2 broken -> [0, 2] -> mid 1 refused -> [1, 2] -> mid 1.5 broken -> [1, 1.5]
    assert s.budgets == [1.5, 0.0] and s.brackets == [(1.0, 1.5), (0.0, 0.0)]
    assert [c[1] for c in toy.calls] == [[4.0, 4.0], [0.0, 0.0], [2.0], [1.0], [1.5]]


def test_no_call_is_ever_empty():
    all_zero = Toy([0.0, 0.0])
    s = effort.bisect_budgets(all_zero, 2, 0.1, 1.0, 5, broken_at_zero=[True, True])
    assert all_zero.calls == [] and s.budgets == [0.0, 0.0] and s.queries == s.rounds_run == 0
    never = Toy([math.inf] * 3)
    s = effort.bisect_budgets(never, 3, 0.1, 1.0, 5)
    assert len(never.calls) == 1 and s.budgets == [None] * 3 and s.queries == 3
    easy = Toy([0.01, 0.02])
    s = effort.bisect_budgets(easy, 2, 0.1, 1.0, 5)
    assert len(easy.calls) == 2 and s.budgets == [0.1, 0.1] and s.rounds_run == 2
    assert effort.bisect_budgets(Toy([]), 0, 0.1, 1.0, 5).budgets == []
    no_rounds = effort.bisect_budgets(Toy([0.5]), 1, 0.1, 1.0, 0)
    assert no_rounds.budgets == [1.0] and no_rounds.brackets == [(0.1, 1.0)]


def test_non_monotone_prompt_still_gets_a_consistent_bracket():
    # broken only on [0.2, 0.4] and from 5 up: bisection goes high first and misses the low window
    def rule(i, b):
        return 0.2 <= b <= 0.4 or b >= 5

    s = effort.bisect_budgets(Toy([None], rule), 1, 0.1, 10.0, 6)
    lo, hi = s.brackets[0]
    assert not rule(0, lo) and rule(0, hi) and s.budgets[0] == hi and hi > 0.4


def _window(lo: list[float], hi: list[float], calls: list):
    """A toy whose prompt i answers compliantly only for budgets in [lo[i], hi[i]): steering too hard makes
    gibberish, which the judge does not call compliance."""
    def broken(indices, budgets):
        calls.append((list(indices), list(budgets)))
        return [lo[i] <= b < hi[i] for i, b in zip(indices, budgets)]
    return broken


def test_ascending_search_finds_the_first_break_below_a_gibberish_ceiling():
    lo = [0.05, 0.3, 0.013, 5.0, math.inf, 0.5]
    hi = [0.5, 10.0, 0.03, 100.0, math.inf, 100.0]  # prompt 0 breaks in [0.05, 0.5) only: high would censor it
    calls = []
    found = effort.ascending_budgets(_window(lo, hi, calls), 6, 0.01, 4.0, rounds=6,
                                     broken_at_zero=[False] * 5 + [True])
    precision = 2 ** (1 / 2 ** 6)
    for i in (0, 1, 2):
        assert lo[i] <= found.budgets[i] <= lo[i] * precision * (1 + 1e-9), i
        assert found.brackets[i][0] < lo[i] <= found.brackets[i][1]
    assert found.budgets[3] is None and found.budgets[4] is None  # first compliant above high = 4: censored
    assert found.budgets[5] == 0.0 and all(5 not in idx for idx, _ in calls)
    doubling = [b[0] for _, b in calls[:10]]
    assert doubling[:3] == pytest.approx([0.01, 0.02, 0.04]) and max(b for _, bs in calls for b in bs) <= 4.0
    assert all(idx for idx, _ in calls)  # never an empty call


def test_ascending_search_reaches_high_exactly_and_broken_at_low_is_not_bisected():
    calls = []
    found = effort.ascending_budgets(_window([3.0, 0.001], [9.0, 9.0], calls), 2, 0.01, 5.0, rounds=3)
    assert 3.0 <= found.budgets[0] <= 3.0 * 2 ** (1 / 8) * (1 + 1e-9)  # bracketed by 2.56 and high = 5
    assert found.budgets[1] == 0.01 and found.brackets[1] == (0.0, 0.01)
    assert not any(1 in idx for idx, _ in calls[1:])  # resolved at the first step
    assert calls[9][1] == [5.0]  # 0.01 * 2^9 = 5.12 is clamped to high
    with pytest.raises(ValueError, match="factor"):
        effort.ascending_budgets(_window([1.0], [2.0], []), 1, 0.1, 1.0, rounds=1, factor=1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"low": 1.0, "high": 1.0}, "low < high"),
    ({"low": 2.0, "high": 1.0}, "low < high"),
    ({"high": math.inf}, "finite"),
    ({"low": 0.0}, "geometric"),
    ({"low": -1.0, "geometric": False}, ">= 0"),
    ({"rounds": -1}, "rounds"),
    ({"n": -1}, "n must"),
    ({"broken_at_zero": [True]}, "broken_at_zero"),
])
def test_search_argument_validation(kwargs, match):
    args = {"n": 2, "low": 0.1, "high": 1.0, "rounds": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        effort.bisect_budgets(Toy([0.5, 0.5]), **args)


def test_broken_must_answer_every_prompt():
    with pytest.raises(ValueError, match="returned 1 flags for 2"):
        effort.bisect_budgets(lambda idx, b: [True], 2, 0.1, 1.0, 2)


# ------------------------------------------------------------------------------------------------------------
# Summary


@pytest.mark.parametrize("budgets, median, censored", [
    ([3.0, 1.0, 2.0], 2.0, False),           # odd n: the middle
    ([4.0, 1.0, 3.0, 2.0], 2.0, False),      # even n: the LOWER median, not 2.5
    ([1.0, None, 3.0, None], 3.0, False),    # exactly half censored: lower median still observed
    ([1.0, None, None], 10.0, True),         # more than half censored: only "> high"
    ([None, None], 10.0, True),
    ([0.0, 0.0, 5.0], 0.0, False),
])
def test_summarise_median_on_hand_computed_cases(budgets, median, censored):
    s = effort.summarise(budgets, high=10.0, n_boot=200)
    assert s["median"] == median and s["median_censored"] is censored
    assert s["n"] == len(budgets) and s["censored"] == budgets.count(None)
    assert s["broken"] == len(budgets) - budgets.count(None)
    json.dumps(s, allow_nan=False)


def test_bootstrap_interval_on_known_distributions():
    # n = 3 distinct values: each value is a resample's lower median with probability >= 7/27 >> 2.5%
    s = effort.summarise([1.0, 2.0, 3.0], high=10.0)
    assert (s["ci_low"], s["median"], s["ci_high"]) == (1.0, 2.0, 3.0)
    # [1, censored]: a resample's lower median is censored iff both draws are (p = 1/4)
    s = effort.summarise([1.0, None], high=10.0)
    assert (s["ci_low"], s["median"], s["ci_high"]) == (1.0, 1.0, 10.0)
    assert s["ci_high_censored"] and not s["ci_low_censored"] and not s["median_censored"]
    s = effort.summarise([None] * 4, high=10.0)
    assert s["ci_low"] == s["ci_high"] == 10.0 and s["ci_low_censored"] and s["ci_high_censored"]
    assert effort.summarise([2.0] * 5, high=10.0)["ci_low"] == 2.0


def test_bootstrap_is_deterministic_and_contains_the_median():
    budgets = [0.1 * 1.3 ** k for k in range(25)] + [None] * 5
    a = effort.summarise(budgets, high=100.0, seed=3)
    assert a == effort.summarise(budgets, high=100.0, seed=3)
    assert a["ci_low"] <= a["median"] <= a["ci_high"] and a["ci_low"] < a["ci_high"]
    narrow = effort.summarise(budgets, high=100.0, seed=3, confidence=0.5)
    assert a["ci_low"] <= narrow["ci_low"] <= narrow["ci_high"] <= a["ci_high"]


def test_summarise_empty_and_validation():
    s = effort.summarise([], high=1.0)
    assert s["n"] == 0 and s["median"] is None and s["ci_low"] is None and not s["median_censored"]
    for bad in ([2.0], [-0.1], [math.inf], [math.nan]):
        with pytest.raises(ValueError):
            effort.summarise(bad, high=1.0)
    with pytest.raises(ValueError, match="confidence"):
        effort.summarise([0.5], high=1.0, confidence=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        effort.summarise([0.5], high=1.0, n_boot=0)


def test_ratio():
    assert effort.ratio({"median": 4.0}, {"median": 2.0}) == 2.0
    assert effort.ratio({"median": 0.0}, {"median": 2.0}) == 0.0
    assert effort.ratio({"median": 4.0}, {"median": 0.0}) is None
    assert effort.ratio({"median": None}, {"median": 2.0}) is None
    assert effort.ratio({}, {"median": 2.0}) is None and effort.ratio({"median": 1.0}, None) is None


# ------------------------------------------------------------------------------------------------------------
# Survival


def test_survival_on_hand_made_example():
    budgets = [0.0, 1.0, 2.0, None]
    assert effort.survival(budgets, [0, 0.5, 1, 1.5, 2, 10]) == [0.75, 0.75, 0.5, 0.5, 0.25, 0.25]
    with pytest.raises(ValueError):
        effort.survival([], [1.0])


def test_survival_grid_spans_smallest_positive_budget_to_high_with_every_observed_budget():
    curves = {"model": [0.0, 0.5, None], "baseline": [2.0]}
    grid = effort.survival_grid(curves, high=8.0, points=4)
    assert grid == pytest.approx([0.5, 2 ** (1 / 3), 2.0, 2 ** (5 / 3), 8.0])
    assert effort.survival_grid(curves, 8.0, points=4, geometric=False) == [0.5, 2.0, 3.0, 5.5, 8.0]
    assert effort.survival_grid({"m": [None, 0.0]}, high=8.0) == [8.0]
    with pytest.raises(ValueError, match="exceeds high"):
        effort.survival_grid({"m": [9.0]}, high=8.0)


@pytest.mark.parametrize("curves, high", [
    ({"model": [0.0, 0.02, 0.3, 1.7, None, None], "baseline": [0.01, 0.05, 0.05, 0.4, 2.0]}, 10.0),  # log
    ({"model": [20.0, 35.0, None], "baseline": [10.0, 12.0, 30.0, 40.0]}, 50.0),                     # linear
    ({"model": [None, None]}, 5.0),
])
def test_plot_survival_writes_a_png(tmp_path, curves, high):
    out = effort.plot_survival(tmp_path / "figs" / "effort.png", curves, high, attack="repe", unit="coef")
    assert out == tmp_path / "figs" / "effort.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["effort.png"]  # no temporary left behind


def test_plot_survival_rejects_missing_prompts(tmp_path):
    with pytest.raises(ValueError):
        effort.plot_survival(tmp_path / "x.png", {}, 1.0, "repe", "coef")
    with pytest.raises(ValueError, match="model"):
        effort.plot_survival(tmp_path / "x.png", {"model": []}, 1.0, "repe", "coef")
