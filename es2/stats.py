"""Small statistics over binary outcomes: a rate's interval and the paired comparison of two rates.

Pure functions over booleans (no I/O), built on scipy. A paired comparison reads two outcome lists over the SAME
items in the same order (e.g. one model's and its baseline's attack successes on each prompt): position i of
`a` and of `b` is one item. The 2x2 table of such pairs is written
              b true   b false
    a true      n11      n10
    a false     n01      n00
so n10 counts the items where only `a` is true and n01 those where only `b` is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import binomtest, norm


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (z = 1.96: 95%); (0, 1) when n = 0.

    Raises ValueError unless 0 <= successes <= n (both integers).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    confidence = 2 * norm.cdf(z) - 1  # binomtest takes a level, callers think in z
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def rate_with_interval(flags: Sequence[bool], z: float = 1.96) -> tuple[float, float, float, int]:
    """(rate of True, Wilson low, Wilson high, n); the rate is NaN and the interval (0, 1) for no flags."""
    n = len(flags)
    hits = sum(bool(f) for f in flags)
    low, high = wilson_interval(hits, n, z)
    return (hits / n if n else math.nan), low, high, n


def paired_table(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(n11, n10, n01, n00) of paired outcomes (see the module docstring); ValueError on unequal lengths."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    pairs = [(bool(x), bool(y)) for x, y in zip(a, b)]
    return (pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
            pairs.count((False, False)))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes: H0 P(a true) = P(b true).

    Under H0 each discordant pair is equally likely to go either way, so the test is a binomial test of n10
    successes in n10 + n01 trials at p = 1/2 (concordant pairs carry no information). 1.0 when no pair is
    discordant. E.g. n10 = 5, n01 = 0: p = 2 * 0.5^5 = 0.0625.
    """
    _, n10, n01, _ = paired_table(a, b)
    if n10 + n01 == 0:
        return 1.0
    return float(binomtest(n10, n10 + n01, 0.5).pvalue)


def paired_difference_interval(a: Sequence[bool], b: Sequence[bool], alpha: float = 0.05) -> tuple[float, float]:
    """Confidence interval (level 1 - alpha) for p_a - p_b, the difference of two paired proportions.

    Newcombe's hybrid score ("square-and-add") interval for paired data, method 10 of Newcombe (1998),
    "Improving the confidence interval for the difference between two binomial proportions based on paired
    data", Statistics in Medicine 17:2635-2650. With Wilson limits (l_a, u_a), (l_b, u_b) of each margin and
    the estimated correlation phi of the two margins,
        low  = d - sqrt((p_a - l_a)^2 - 2 phi (p_a - l_a)(u_b - p_b) + (u_b - p_b)^2)
        high = d + sqrt((p_b - l_b)^2 - 2 phi (p_b - l_b)(u_a - p_a) + (u_a - p_a)^2)
    where d = p_a - p_b. As in the paper, phi's numerator n11 n00 - n10 n01 is continuity-corrected (reduced
    by n/2 when above it, 0 when in [0, n/2]) and phi = 0 when any margin is empty; this reproduces the
    published example of Fagerland, Lydersen & Laake (2017, table [[59, 6], [16, 80]]: -0.1186 to -0.0046).
    Unlike the Wald interval it stays inside [-1, 1] and has non-zero width when every pair agrees.
    (-1, 1) when there are no pairs; ValueError on unequal lengths or alpha outside (0, 1).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    n11, n10, n01, n00 = paired_table(a, b)
    n = n11 + n10 + n01 + n00
    if n == 0:
        return -1.0, 1.0
    z = float(norm.ppf(1 - alpha / 2))
    p_a, p_b = (n11 + n10) / n, (n11 + n01) / n
    l_a, u_a = wilson_interval(n11 + n10, n, z)
    l_b, u_b = wilson_interval(n11 + n01, n, z)
    margins = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    cross = n11 * n00 - n10 * n01
    corrected = cross - n / 2 if cross > n / 2 else (0.0 if cross >= 0 else cross)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    d = p_a - p_b
    # max(0, .): the radicands are >= 0 in exact arithmetic (|phi| <= 1); rounding must not make them negative
    low = d - math.sqrt(max(0.0, (p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2))
    high = d + math.sqrt(max(0.0, (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2))
    return max(-1.0, low), min(1.0, high)
