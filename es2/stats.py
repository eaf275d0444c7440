"""Statistics for rates measured on the same prompts: Wilson intervals, the exact McNemar test, and an interval
for the difference of two paired proportions.

Pure functions over booleans (scipy underneath). Two models evaluated on the same prompts give paired outcomes;
testing them as two independent samples would throw away the pairing and overstate the noise, so every
comparison in es2 uses McNemar's test on the discordant pairs and Newcombe's paired interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import binomtest, norm


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (z = 1.96: 95%); (0, 1) when n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=2 * norm.cdf(z) - 1, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def rate_with_interval(flags: Sequence[bool]) -> tuple[float, float, float, int]:
    """(rate, Wilson 95% low, high, n) of True among `flags`; rate NaN for none."""
    n, k = len(flags), sum(bool(f) for f in flags)
    low, high = wilson_interval(k, n)
    return (k / n if n else float("nan")), low, high, n


def _discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both, a only, b only, neither) counts of paired outcomes."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b)]
    return (pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
            pairs.count((False, False)))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: under no difference, each discordant pair (True in one, False in the
    other) falls either way with probability 1/2, so the count of one kind is Binomial(discordant, 1/2).
    1.0 when there is no discordant pair."""
    _, only_a, only_b, _ = _discordant(a, b)
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_difference_interval(a: Sequence[bool], b: Sequence[bool], alpha: float = 0.05) -> tuple[float, float]:
    """Interval for rate(a) - rate(b) on paired outcomes: Newcombe's hybrid score interval (Newcombe 1998,
    "Improved confidence intervals for the difference between binomial proportions based on paired data",
    Statistics in Medicine 17:2635-2650, method 10). It combines the Wilson limits of each margin with the
    correlation phi of the 2x2 table, so it stays inside [-1, 1] and behaves at rates of 0 or 1 and small n,
    where the Wald interval does not. (-1, 1) when there are no pairs."""
    both, only_a, only_b, neither = _discordant(a, b)
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    z = float(norm.ppf(1 - alpha / 2))
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_interval(both + only_a, n, z)
    l2, u2 = wilson_interval(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # phi = 0 when a margin is empty (the table has no correlation to use), as Newcombe specifies
    phi = 0.0 if margins == 0 else (both * neither - only_a * only_b) / math.sqrt(margins)
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)
