"""The validate stage on small files, with real Great Expectations: a valid set passes, each bad input fails.

Every failing test checks the same three things: `success` is False, the summary names the failing
expectation with an example row (file and line), and report.json records the same failure.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import time
from pathlib import Path

import pytest

from es2.config import ValidateParams, load_params
from es2.data.validation import max_jaccard, normalise, shingles, validate_datasets
from es2.io import write_jsonl
from tests.conftest import REPO, make_records

# min_rows 20, min_chars 8, max_chars 2000, share 0.2-0.8, Jaccard 0.8
PARAMS = load_params(REPO / "params.yaml").validate_
VALID = {
    "train_harmful": make_records("harmful", 24, "weapon"),
    "train_harmless": make_records("harmless", 24, "recipe"),
    "eval_harmful": make_records("harmful", 20, "poison"),
    "eval_harmless": make_records("harmless", 20, "garden"),
}
LONG = ("could you explain step by step how the old lighthouse keeper on the northern island "
        "managed to repair the broken lamp during the winter storm")


def write_files(root: Path, files: dict) -> dict[str, Path]:
    """Write each file: a list of records as JSONL, or raw bytes as they are."""
    paths = {}
    for name, content in files.items():
        split, kind = name.split("_")  # the project's layout: train/harmful.jsonl, eval/harmless.jsonl, ...
        paths[name] = root / split / f"{kind}.jsonl"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            paths[name].write_bytes(content)
        else:
            write_jsonl(paths[name], content)
    return paths


def run(tmp_path: Path, mutate=None, with_eval: bool = True, params: ValidateParams = PARAMS):
    """Validate a copy of VALID after `mutate(files)` edits it; output goes to tmp_path/out."""
    files = copy.deepcopy(VALID)
    if mutate:
        mutate(files)
    paths = write_files(tmp_path / "data", files)
    evals = [paths["eval_harmful"], paths["eval_harmless"]] if with_eval else []
    return validate_datasets(paths["train_harmful"], paths["train_harmless"], evals, params, tmp_path / "out")


def assert_fails(report, expectation: str, column: str | None, *in_summary: str) -> dict:
    """The run failed on `expectation` (on `column`); the summary and report.json both say so."""
    assert report.success is False
    summary = report.summary()
    blocks = [b for b in summary.split("\n- ") if expectation in b]
    block = next((b for b in blocks if column is None or f"'{column}'" in b), None)
    assert block is not None, f"{expectation} on {column} not in summary:\n{summary}"
    for text in in_summary:
        assert text in block, f"{text!r} not in the {expectation} entry:\n{block}"
    assert str(report.data_docs_path) in summary and str(report.report_path) in summary
    data = json.loads(report.report_path.read_text(encoding="utf-8"))
    assert data["success"] is False
    entries = [f for f in data["failures"] if f["expectation"] == expectation and f["column"] == column]
    assert entries, f"{expectation} on {column} not in report.json failures"
    return entries[0]


def failed_checks(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


# ------------------------------------------------------------------------------------------------ valid


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("valid"))


def test_valid_dataset_passes_and_writes_report_and_data_docs(valid_run):
    assert valid_run.success is True, valid_run.summary()
    assert valid_run.failures == []
    assert valid_run.data_docs_path.name == "index.html" and valid_run.data_docs_path.is_file()
    assert valid_run.data_docs_path.parent == valid_run.report_path.parent / "data_docs"
    assert list(valid_run.data_docs_path.parent.glob("validations/**/*.html")), "no validation page"
    data = json.loads(valid_run.report_path.read_text(encoding="utf-8"))
    assert data["success"] is True and data["failures"] == []
    assert data["statistics"]["unsuccessful_expectations"] == 0
    assert data["statistics"]["rows"] == 88
    assert {d["name"]: d["records"] for d in data["datasets"]} == {
        "train_harmful": 24, "train_harmless": 24, "eval_harmful": 20, "eval_harmless": 20}
    checked = {(r["expectation"], r["column"]) for r in data["results"]}
    assert ("expect_column_values_to_be_between", "train_jaccard") in checked
    assert ("expect_table_row_count_to_be_between", None) in checked
    assert all(r["success"] for r in data["results"])
    assert "passed" in valid_run.summary()


def test_valid_training_files_without_eval_files_pass(tmp_path):
    report = run(tmp_path, with_eval=False)
    assert report.success is True, report.summary()
    assert [d["name"] for d in report.datasets] == ["train_harmful", "train_harmless"]


def test_rerun_replaces_the_report_and_data_docs(tmp_path):
    run(tmp_path, lambda f: f["train_harmful"][0].update(label="unsafe"))
    report = run(tmp_path)
    assert report.success is True
    assert json.loads(report.report_path.read_text())["success"] is True
    pages = list(report.data_docs_path.parent.glob("validations/**/*.html"))
    assert len(pages) == 1, "the previous run's Data Docs page should be gone"


# ------------------------------------------------------------------------------------------ bad inputs


def test_empty_file(tmp_path):
    report = run(tmp_path, lambda f: f.update(train_harmless=b""))
    entry = assert_fails(report, "expect_table_row_count_to_be_between", None, "train_harmless",
                         "train/harmless.jsonl", "observed 0")
    assert entry["dataset"] == "train_harmless" and entry["observed"] == 0
    assert ("expect_column_distinct_values_to_contain_set", "label") in failed_checks(report)


def test_missing_column(tmp_path):
    def drop_source(files):
        for rec in files["train_harmful"]:
            del rec["source"]

    report = run(tmp_path, drop_source)
    entry = assert_fails(report, "expect_column_values_to_be_null", "missing_columns",
                         "train_harmful line 1", "missing_columns = \"source\"", "24 unexpected")
    assert entry["examples"][0]["value"] == "source" and entry["examples"][0]["line"] == 1
    assert entry["file"].endswith("train/harmful.jsonl")


def test_wrong_type_prompt_as_number(tmp_path):
    report = run(tmp_path, lambda f: f["train_harmless"][4].update(prompt=12345))
    entry = assert_fails(report, "expect_column_values_to_be_of_type", "prompt",
                         "train_harmless line 5", "recipe-4", "prompt 12345")
    assert entry["examples"][0]["value"] == 12345


def test_non_utf8_bytes_are_reported_with_offset_and_other_files_still_validated(tmp_path):
    good = b"".join(json.dumps(r).encode() + b"\n" for r in VALID["eval_harmless"])
    bad = good + b'{"id": "g-x", "prompt": "caf\xe9 au lait please", "label": "harmless", "source": "s"}\n'
    offset = len(good) + bad[len(good):].index(b"\xe9")

    def mutate(files):
        files["eval_harmless"] = bad
        files["train_harmful"][2]["label"] = "unsafe"  # a problem in another file is still found

    report = run(tmp_path, mutate)
    entry = assert_fails(report, "expect_column_values_to_be_null", "parse_error",
                         "eval_harmless line 21", f"invalid UTF-8 at byte {offset}")
    assert entry["examples"][0]["line"] == 21
    assert ("expect_column_values_to_be_in_set", "label") in failed_checks(report)
    assert {d["name"]: d["records"] for d in report.datasets}["eval_harmless"] == 20


def test_bad_json_line_is_a_failure_not_a_traceback(tmp_path):
    lines = [json.dumps(r).encode() + b"\n" for r in VALID["train_harmful"]]
    lines.insert(5, b'{"id": "weapon-x", "prompt": "unterminated\n')
    report = run(tmp_path, lambda f: f.update(train_harmful=b"".join(lines)))
    entry = assert_fails(report, "expect_column_values_to_be_null", "parse_error",
                         "train_harmful line 6", "not valid JSON")
    assert entry["examples"][0]["line"] == 6
    # the unparsable line is reported once, not again as a null id/prompt/label/source
    assert failed_checks(report) == {("expect_column_values_to_be_null", "parse_error")}


def test_whitespace_prompt(tmp_path):
    report = run(tmp_path, lambda f: f["train_harmful"][6].update(prompt=" \t\n "))
    assert_fails(report, "expect_column_values_to_not_match_regex", "prompt_text",
                 "train_harmful line 7", "weapon-6")


def test_exact_duplicate_prompt(tmp_path):
    def dup(files):
        files["eval_harmful"][3]["prompt"] = files["train_harmful"][9]["prompt"]

    report = run(tmp_path, dup)
    entry = assert_fails(report, "expect_column_values_to_be_unique", "prompt_text",
                         "train_harmful line 10", "same as eval_harmful:4")
    assert entry["unexpected_count"] == 2
    assert entry["counts_by_dataset"] == {"train_harmful": 1, "eval_harmful": 1}


def test_normalised_duplicate_prompt(tmp_path):
    def near(files):
        files["train_harmless"][0]["prompt"] = "Hello, world! How are you?"
        files["train_harmless"][1]["prompt"] = "hello   world how are YOU"

    report = run(tmp_path, near)
    assert_fails(report, "expect_column_values_to_be_unique", "prompt_normalised",
                 "train_harmless line 1", "Hello, world!", "same as train_harmless:2")
    assert ("expect_column_values_to_be_unique", "prompt_text") not in failed_checks(report)


def test_unknown_label(tmp_path):
    report = run(tmp_path, lambda f: f["eval_harmless"][7].update(label="unsafe"))
    entry = assert_fails(report, "expect_column_values_to_be_in_set", "label",
                         "eval_harmless line 8", 'label = "unsafe"')
    assert entry["examples"][0]["value"] == "unsafe"


def test_only_one_class_in_training(tmp_path):
    def relabel(files):
        for rec in files["train_harmless"]:
            rec["label"] = "harmful"

    report = run(tmp_path, relabel)
    entry = assert_fails(report, "expect_column_values_to_be_in_set", "label",
                         "train_harmless line 1", 'label = "harmful"')
    assert entry["dataset"] == "train_harmless" and entry["unexpected_count"] == 24
    assert_fails(report, "expect_column_distinct_values_to_contain_set", "label", "missing harmless")
    assert_fails(report, "expect_column_mean_to_be_between", "is_harmful",
                 "observed 1", "between 0.2 and 0.8")


def test_train_eval_near_duplicate_leakage(tmp_path):
    def leak(files):
        files["train_harmless"][5]["prompt"] = LONG
        files["eval_harmless"][2]["prompt"] = LONG.replace("winter storm", "winter gale")

    report = run(tmp_path, leak)
    entry = assert_fails(report, "expect_column_values_to_be_between", "train_jaccard",
                         "eval_harmless line 3", "near-duplicate of train_harmless line 6", "expected < 0.8")
    assert 0.8 <= entry["examples"][0]["value"] < 1
    assert failed_checks(report) == {("expect_column_values_to_be_between", "train_jaccard")}


def test_over_long_prompt(tmp_path):
    report = run(tmp_path, lambda f: f["train_harmful"][11].update(prompt="x" * 2001))
    entry = assert_fails(report, "expect_column_value_lengths_to_be_between", "prompt_text",
                         "train_harmful line 12", "<= 2000")
    assert len(entry["examples"][0]["prompt"]) <= 80  # an excerpt, not the whole prompt


def test_too_short_prompt(tmp_path):
    report = run(tmp_path, lambda f: f["train_harmful"][1].update(prompt="  hi?  "))
    assert_fails(report, "expect_column_values_to_be_between", "prompt_stripped_chars",
                 "train_harmful line 2", ">= 8")


def test_too_few_rows(tmp_path):
    report = run(tmp_path, lambda f: f.update(eval_harmful=f["eval_harmful"][:5]))
    entry = assert_fails(report, "expect_table_row_count_to_be_between", None, "eval_harmful", "observed 5")
    assert entry["observed"] == 5 and entry["expected"] == ">= 20"


def test_duplicate_id(tmp_path):
    report = run(tmp_path, lambda f: f["train_harmless"][3].update(id="weapon-0"))
    assert_fails(report, "expect_column_values_to_be_unique", "id",
                 "train_harmful line 1", "same as train_harmless:4")


def test_failing_run_writes_nothing_outside_out_dir(tmp_path, monkeypatch):
    for name in ("tmp", "home", "cwd"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    files = copy.deepcopy(VALID)
    files["train_harmful"][0]["label"] = "unsafe"
    paths = write_files(tmp_path / "data", files)

    def snapshot():
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
                if p.is_file() and (tmp_path / "out") not in p.parents}

    before = snapshot()
    report = validate_datasets(paths["train_harmful"], paths["train_harmless"], [paths["eval_harmful"]],
                               PARAMS, tmp_path / "out")
    assert report.success is False
    assert snapshot() == before
    for name in ("tmp", "home", "cwd"):
        assert not any((tmp_path / name).iterdir()), f"something was written to {name}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data_docs", "report.json"]


# ------------------------------------------------------------------------------------ text and leakage


def test_normalise():
    assert normalise("Hello, world") == normalise("hello world") == "hello world"
    assert normalise("  HOW\tdo I\n  bake_bread?! ") == "how do i bakebread"


def test_shingles():
    assert shingles("a b c d") == {"a b c", "b c d"}
    assert shingles("a b") == {"a b"}
    assert shingles("") == set()


def test_max_jaccard_matches_brute_force():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    train = [shingles(" ".join(rng.choices(vocab, k=rng.randint(1, 12)))) for _ in range(200)]
    evals = [shingles(" ".join(rng.choices(vocab, k=rng.randint(1, 12)))) for _ in range(60)] + [set()]
    evals[:5] = [set(t) for t in train[:5]]
    best, arg = max_jaccard(train, evals, chunk=16)
    for i, e in enumerate(evals):
        scores = [len(e & t) / len(e | t) if e | t else 0.0 for t in train]
        assert best[i] == pytest.approx(max(scores))
        if best[i] > 0:
            assert scores[arg[i]] == pytest.approx(best[i])
        else:
            assert arg[i] == -1
    assert list(best[:5]) == [1.0] * 5


def test_max_jaccard_is_fast_on_10k_by_2k():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)] + ["how", "do", "i", "make", "a", "the"] * 100
    train = [shingles(" ".join(rng.choices(vocab, k=rng.randint(5, 40)))) for _ in range(10_000)]
    evals = [shingles(" ".join(rng.choices(vocab, k=rng.randint(5, 40)))) for _ in range(2_000)]
    start = time.perf_counter()
    max_jaccard(train, evals)
    assert time.perf_counter() - start < 10  # about 0.3 s on 2 cores


def test_an_opening_word_that_predicts_the_class_is_a_warning_that_names_the_fix(tmp_path):
    report = run(tmp_path)  # every harmful training prompt opens with "weapon", no harmless one does
    assert report.success is True
    assert report.warnings == ["shortcut cue: 24 of 24 training prompts opening with 'weapon' are harmful (all "
                               "prompts: 50%); add harmless prompts that open with 'weapon' so the model learns "
                               "the intent, not the word"]
    assert "warning: shortcut cue: 24 of 24" in report.summary()
    assert json.loads(report.report_path.read_text())["warnings"] == report.warnings

    def balance(files):  # 20 harmless prompts open with it too: 24 of 44 harmful, under the 0.6 share
        for r in files["train_harmless"][:20]:
            r["prompt"] = "weapon " + r["prompt"]
    assert run(tmp_path / "balanced", balance).warnings == []
