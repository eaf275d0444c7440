"""The stratified prompt sample (es2.sampling)."""

from collections import Counter

import pytest

from es2.sampling import allocate, stratified_sample


def _rows(counts: dict) -> list[dict]:
    return [{"id": f"{c}{i}", "category": c} for c, k in counts.items() for i in range(k)]


def test_every_category_is_present_in_proportion():
    rows = _rows({"general": 70, "borderline": 30})
    sample = stratified_sample(rows, 24, seed=0)
    counts = Counter(r["category"] for r in sample)
    assert len(sample) == 24 and counts == {"general": 17, "borderline": 7}


def test_small_categories_get_one_row_each():
    rows = _rows({"a": 50, "b": 1, "c": 1, "d": 2})
    sample = stratified_sample(rows, 5, seed=3)
    assert len(sample) == 5 and {r["category"] for r in sample} == {"a", "b", "c", "d"}


def test_seed_stable_and_in_file_order():
    rows = _rows({"x": 40, "y": 40})
    first, again = stratified_sample(rows, 10, 0), stratified_sample(rows, 10, 0)
    assert first == again and first == sorted(first, key=rows.index)
    assert stratified_sample(rows, 10, 1) != first


def test_rows_without_the_key_and_more_asked_than_there_are():
    rows = _rows({"x": 3}) + [{"id": "none"}]
    assert stratified_sample(rows, 10, 0) == rows
    assert {r.get("category") for r in stratified_sample(rows, 2, 0)} == {"x", None}
    assert stratified_sample(rows, 0, 0) == []


@pytest.mark.parametrize("sizes, n, expected", [
    ([60, 30, 10], 10, [6, 3, 1]),          # exact quotas
    ([70, 30], 24, [17, 7]),                # 16.8 / 7.2: largest remainders
    ([50, 1, 1, 2], 5, [2, 1, 1, 1]),       # the one-row floors overshoot: the over-served stratum gives back
    ([5, 3, 2], 2, [1, 1, 0]),              # fewer rows than strata: the largest strata get them
    ([1, 1, 1], 3, [1, 1, 1]),
])
def test_allocation_is_proportional_with_one_row_floors(sizes, n, expected):
    assert allocate(sizes, n) == expected


def test_allocation_sums_to_n_and_respects_sizes():
    import random

    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
        n = rng.randint(0, sum(sizes) - 1)
        take = allocate(sizes, n)
        assert sum(take) == n and all(0 <= t <= s for t, s in zip(take, sizes))
        if n >= len(sizes):
            assert min(take) >= 1


def test_different_seeds_usually_differ_and_larger_n_extends_the_sample():
    rows = _rows({"x": 30, "y": 20, "z": 10})
    samples = {tuple(r["id"] for r in stratified_sample(rows, 6, seed)) for seed in range(10)}
    assert len(samples) >= 8
    small, large = stratified_sample(rows, 6, 4), stratified_sample(rows, 30, 4)
    assert all(r in large for r in small)


def test_categories_of_size_one_and_the_borderline_share_of_a_benign_set():
    rows = _rows({"general": 200}) + _rows({"borderline": 25}) + _rows({"rare": 1})
    sample = stratified_sample(rows, 24, seed=0)
    counts = Counter(r["category"] for r in sample)
    assert counts == {"general": 21, "borderline": 2, "rare": 1}
    with pytest.raises(ValueError):
        stratified_sample(rows, -1, 0)
