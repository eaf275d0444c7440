"""The stratified prompt sample (es2.sampling)."""

from collections import Counter

from es2.sampling import stratified_sample


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
