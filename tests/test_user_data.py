"""Data that cannot slip in wrong: files a new user really has, each case on a fixture file of its own.

A file saved on Windows (byte-order mark, CRLF) reads exactly like the Linux one; a control character or one
of the model's special tokens inside a prompt is refused naming the row and the character or token; and one
benchmark's file given to another benchmark's importer is refused naming the format it really is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import FIXTURES, REPO, make_records

from es2.config import load_params
from es2.data.importers import FORMATS, _format_of, import_records
from es2.data.readers import file_kind, read_rows
from es2.data.prompt_checks import control_character, special_token, special_token_strings
from es2.data.schema import read_records
from es2.data.validation import validate_datasets
from es2.errors import DataError
from es2.io import write_jsonl

RECORDS = FIXTURES / "records"
IMPORTS = FIXTURES / "importers"
BOM = b"\xef\xbb\xbf"
# The special tokens of tests/tiny_model's tokenizer (checked below against the real tokenizer).
TINY_TOKENS = ("<pad>", "<unk>", "<|im_end|>", "<|im_start|>")
# Each fixture file holds three records, so the row-count floor is lowered to fit.
PARAMS = load_params(REPO / "params.yaml").validate_.model_copy(update={"min_rows": 3})


def validate(tmp_path: Path, harmful: Path, special_tokens: tuple[str, ...] = ()):
    """Validate a fixture as the harmful training file, beside three valid harmless records."""
    harmless = tmp_path / "harmless.jsonl"
    write_jsonl(harmless, make_records("harmless", 3, "recipe"))
    return validate_datasets(harmful, harmless, [], PARAMS, tmp_path / "out", special_tokens=special_tokens)


def failures(report) -> dict[str | None, dict]:
    """The failed expectations by column, as report.json records them."""
    assert report.success is False
    data = json.loads(report.report_path.read_text(encoding="utf-8"))
    return {f["column"]: f for f in data["failures"]}


def refusal(fmt: str, path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as exc:
        import_records(fmt, path, **{"label": None, **kwargs})
    return exc.value


# --- 1. a byte-order mark and CRLF line endings, as Windows editors save --------------------------------------

def test_the_windows_fixtures_really_have_a_bom_and_crlf():
    for path in (RECORDS / "bom_crlf.jsonl", IMPORTS / "harmbench_windows.csv"):
        raw = path.read_bytes()
        assert raw.startswith(BOM) and raw.count(b"\r\n") == raw.count(b"\n"), path


def test_bom_crlf_jsonl_reads_like_the_same_file_saved_on_linux(tmp_path):
    unix = tmp_path / "unix.jsonl"
    unix.write_bytes((RECORDS / "bom_crlf.jsonl").read_bytes().removeprefix(BOM).replace(b"\r\n", b"\n"))
    records = read_records(RECORDS / "bom_crlf.jsonl")
    assert records == read_records(unix)
    assert [r["id"] for r in records] == ["bom-1", "bom-2", "bom-3"]


def test_bom_crlf_jsonl_passes_validation(tmp_path):
    report = validate(tmp_path, RECORDS / "bom_crlf.jsonl")
    assert report.success is True, report.summary()
    assert report.datasets[0]["records"] == 3 and report.datasets[0]["unreadable_lines"] == 0


def test_bom_crlf_jsonl_imports_as_the_generic_format():
    records = import_records("jsonl", RECORDS / "bom_crlf.jsonl", label=None)
    assert [r["id"] for r in records] == ["jsonl-bom-1", "jsonl-bom-2", "jsonl-bom-3"]
    assert not any("\r" in r["prompt"] or "\ufeff" in r["prompt"] for r in records)


def test_a_benchmark_csv_saved_by_excel_imports_like_the_original():
    # CRLF inside the quoted, multi-line ContextString becomes "\n" too: the same prompts either way
    windows = import_records("harmbench", IMPORTS / "harmbench_windows.csv", label=None)
    assert windows == import_records("harmbench", IMPORTS / "harmbench.csv", label=None)
    assert "Dear customer,\nyour parcel" in windows[2]["prompt"]


@pytest.mark.parametrize("fmt, name, label", [
    ("advbench", "advbench.csv", None), ("harmbench", "harmbench.csv", None),
    ("jailbreakbench", "jailbreakbench.csv", "harmful"), ("xstest", "xstest.csv", None),
    ("alpaca", "alpaca.json", "harmless"), ("alpaca", "alpaca.jsonl", "harmless"),
    ("jsonl", "generic.jsonl", None),
])
def test_every_importer_reads_its_file_saved_with_a_bom_and_crlf(tmp_path, fmt, name, label):
    windows = tmp_path / name
    windows.write_bytes(BOM + (IMPORTS / name).read_bytes().replace(b"\n", b"\r\n"))
    assert import_records(fmt, windows, label) == import_records(fmt, IMPORTS / name, label)


# --- 2. control characters in a prompt -------------------------------------------------------------------------

def test_a_nul_in_a_prompt_fails_validation_naming_the_line_id_and_character(tmp_path):
    report = validate(tmp_path, RECORDS / "nul_prompt.jsonl")
    [(column, failure)] = failures(report).items()
    assert column == "prompt_control_char"
    assert failure["check"] == "control character in prompt"
    [example] = failure["examples"]
    assert (example["line"], example["id"], example["value"]) == (2, "nul-2", "U+0000 at character 30")
    assert ('train_harmful line 2 (id "nul-2")' in report.summary()
            and 'prompt_control_char = "U+0000 at character 30"' in report.summary())


def test_a_raw_nul_byte_fails_validation_naming_the_line_and_character(tmp_path):
    report = validate(tmp_path, RECORDS / "nul_byte.jsonl")
    found = failures(report)
    assert set(found) == {"parse_error", None}  # None: two readable records are below the 3-row floor
    [example] = found["parse_error"]["examples"]
    assert example["line"] == 2
    assert example["value"] == "line 2: not valid JSON (raw control character U+0000 inside a string at column 57)"
    assert 'parse_error = "line 2: not valid JSON (raw control character U+0000' in report.summary()


def test_a_raw_nul_byte_is_refused_by_the_record_reader():
    with pytest.raises(DataError) as exc:
        read_records(RECORDS / "nul_byte.jsonl")
    assert exc.value.problem.endswith(
        "nul_byte.jsonl:2: not valid JSON (raw control character U+0000 inside a string at column 57)")


def test_the_importers_refuse_a_nul_naming_the_row_column_and_character():
    exc = refusal("advbench", IMPORTS / "nul_prompt.csv")
    assert exc.problem.endswith("nul_prompt.csv: row 2 (line 3) column 'goal' holds control character "
                                "U+0000 at character 22")
    assert "tab, newline and carriage return are allowed" in exc.hint
    exc = refusal("jsonl", RECORDS / "nul_prompt.jsonl")
    assert exc.problem.endswith("nul_prompt.jsonl: line 2 (id nul-2) column 'prompt' holds control character "
                                "U+0000 at character 30")


@pytest.mark.parametrize("text, found", [
    ("tab\there\r\nand newline\n", None), ("caf\u00e9 \u2028 \U0001f600", None),
    ("a\x00b", "U+0000 at character 2"), ("\x1b[31mred", "U+001B at character 1"),
    ("del\x7f", "U+007F at character 4"), ("c1 \x85", "U+0085 at character 4"),
])
def test_control_character_allows_ordinary_whitespace_only(text, found):
    assert control_character(text) == found


# --- 3. the model's special tokens in a prompt (role injection) ---------------------------------------------

def test_special_token_strings_are_the_tokenizers_special_and_added_tokens():
    from tests.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    assert special_token_strings(tokenizer) == TINY_TOKENS
    tokenizer.add_tokens(["<tool_call>", "    "])  # a non-special marker is kept; a run of spaces is text
    assert special_token_strings(tokenizer) == ("<pad>", "<tool_call>", "<unk>", "<|im_end|>", "<|im_start|>")


def test_a_role_injection_fails_validation_naming_the_line_id_and_token(tmp_path):
    report = validate(tmp_path, RECORDS / "role_injection.jsonl", TINY_TOKENS)
    [(column, failure)] = failures(report).items()
    assert column == "prompt_special_token"
    assert failure["check"] == "model special token in prompt (role injection)"
    [example] = failure["examples"]
    assert (example["line"], example["id"], example["value"]) == (2, "role-2", "<|im_end|>")
    assert 'train_harmful line 2 (id "role-2")' in report.summary()
    assert json.loads(report.report_path.read_text())["special_tokens"] == list(TINY_TOKENS)


def test_the_importers_refuse_a_special_token_naming_the_row_column_and_token():
    exc = refusal("advbench", IMPORTS / "role_injection.csv", special_tokens=TINY_TOKENS)
    assert exc.problem.endswith("role_injection.csv: row 2 (lines 3-5) column 'goal' holds the model's special "
                                "token '<|im_end|>'")
    assert "role marker" in exc.hint
    exc = refusal("jsonl", RECORDS / "role_injection.jsonl", special_tokens=TINY_TOKENS)
    assert exc.problem.endswith("line 2 (id role-2) column 'prompt' holds the model's special token '<|im_end|>'")


def test_special_token_names_the_leftmost_and_longest_token():
    tokens = ("<|im", "<|im_start|>", "<|im_end|>")
    assert special_token("hi <|im_start|>user <|im_end|>", tokens) == "<|im_start|>"
    assert special_token("a <b> tag", tokens) is None
    assert special_token("anything <|im_end|>", ()) is None


# --- 4. one benchmark's file given to another benchmark's importer --------------------------------------------

@pytest.mark.parametrize("fmt, name, problem, right", [
    # the case: JailbreakBench's Behavior column holds short labels, HarmBench's holds the prompts
    ("harmbench", "jailbreakbench.csv",
     "not in the harmbench format: it has no 'SemanticCategory' column, which every harmbench file has; "
     "columns found: ['Index', 'Goal', 'Target', 'Behavior', 'Category', 'Source']; it matches the "
     "jailbreakbench format, and imported as harmbench its 'Behavior' column would become the prompts",
     "jailbreakbench"),
    ("jailbreakbench", "harmbench.csv",
     "not in the jailbreakbench format: it has no 'Goal', 'Target', 'Category' columns, which every "
     "jailbreakbench file has; columns found: ['Behavior', 'FunctionalCategory', 'SemanticCategory', 'Tags', "
     "'ContextString', 'BehaviorID']; it matches the harmbench format", "harmbench"),
    ("advbench", "jailbreakbench.csv",
     "in the jailbreakbench format, not advbench: it has all of jailbreakbench's columns "
     "['Goal', 'Target', 'Behavior', 'Category']", "jailbreakbench"),
    ("jailbreakbench", "advbench.csv",
     "not in the jailbreakbench format: it has no 'Behavior', 'Category' columns, which every jailbreakbench "
     "file has; columns found: ['goal', 'target']; it matches the advbench format, and imported as "
     "jailbreakbench its 'goal' column would become the prompts", "advbench"),
    ("alpaca", "generic.jsonl",
     "not in the alpaca format: it has no 'instruction' column, which every alpaca file has; columns found: "
     "['prompt', 'label', 'category', 'response']; it matches the jsonl format", "jsonl"),
])
def test_an_importer_refuses_another_benchmarks_file_naming_the_right_format(fmt, name, problem, right):
    exc = refusal(fmt, IMPORTS / name, label="harmful")
    assert exc.problem == f"{IMPORTS / name}: {problem}"
    assert f"es2 data import {right} {IMPORTS / name}" in exc.hint


def test_xstest_refuses_a_normalised_csv_that_shares_its_prompt_and_label_columns():
    exc = refusal("xstest", IMPORTS / "normalised.csv")
    assert exc.problem.endswith("normalised.csv: not in the xstest format: it has no 'type' column, which every "
                                "xstest file has; columns found: ['id', 'prompt', 'label', 'source', "
                                "'category']; it matches the csv format")
    assert "--columns FIELD=COL" in exc.hint and f"es2 data import csv {IMPORTS / 'normalised.csv'}" in exc.hint


@pytest.mark.parametrize("fmt, name, right", [
    ("csv", "jailbreakbench.csv", "jailbreakbench"), ("jsonl", "alpaca.jsonl", "alpaca"),
])
def test_a_generic_import_without_a_prompt_column_names_the_benchmark_it_matches(fmt, name, right):
    exc = refusal(fmt, IMPORTS / name, label="harmful")
    assert "no column 'prompt' for the prompt" in exc.problem
    assert exc.hint.startswith(f"the file matches the {right} format: import it with es2 data import {right}")


def test_an_unusual_export_of_a_benchmark_still_imports_with_columns(tmp_path):
    renamed = tmp_path / "advbench_export.csv"
    renamed.write_text("behavior_text,target\nSteal a bike from a rack,\"Sure, here is\"\n", encoding="utf-8")
    exc = refusal("advbench", renamed)
    assert "no 'goal' column" in exc.problem and "--columns FIELD=COL" in exc.hint
    [record] = import_records("advbench", renamed, label=None, columns={"prompt": "behavior_text"})
    assert record["prompt"] == "Steal a bike from a rack" and record["target"] == "Sure, here is"


@pytest.mark.parametrize("name, fmt", [
    ("advbench.csv", "advbench"), ("harmbench.csv", "harmbench"), ("harmbench_windows.csv", "harmbench"),
    ("jailbreakbench.csv", "jailbreakbench"), ("xstest.csv", "xstest"), ("alpaca.json", "alpaca"),
    ("alpaca.jsonl", "alpaca"), ("generic.jsonl", "jsonl"), ("normalised.csv", "csv"), ("generic.csv", "csv"),
])
def test_the_format_found_from_the_columns_is_each_fixtures_own(name, fmt):
    found, _ = read_rows(IMPORTS / name, file_kind(IMPORTS / name, "csv"))
    assert _format_of(found, IMPORTS / name) == fmt and fmt in FORMATS
