"""The validate stage's results: GX's validation result turned into failures with example rows, a summary for
the terminal, and report.json.

Each failure names its check, where it failed and up to MAX_EXAMPLES offending rows by dataset, file and line,
with the row's id, a prompt excerpt and the offending value.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from es2.config import ValidateParams
from es2.io import write_json

if TYPE_CHECKING:
    from es2.data.validation import Dataset

MAX_EXAMPLES = 5
EXCERPT_CHARS = 80
_PROMPT_COLUMNS = ("prompt", "prompt_text")


@dataclass
class Failure:
    """One failed expectation: what it checks, where it failed, and up to MAX_EXAMPLES offending rows.

    Each example is {"dataset", "file", "line", "id", "prompt" (excerpt), "value"} plus, for duplicates,
    "duplicate_of" (the other rows, as dataset:line) and, for leakage, "train_match" and "train_prompt".
    """

    expectation: str
    check: str
    dataset: str
    file: str | None
    column: str | None
    unexpected_count: int | None
    expected: str = ""
    observed: Any = None
    counts_by_dataset: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    detail: str = ""

    def describe(self) -> str:
        where = self.dataset + (f" ({self.file})" if self.file else "")
        on = f" on column '{self.column}'" if self.column else ""
        lines = [f"- [{self.check}] {self.expectation}{on}, in {where}"]
        if self.unexpected_count is not None:
            per = ", ".join(f"{k}: {v}" for k, v in self.counts_by_dataset.items())
            lines.append(f"    {self.unexpected_count} unexpected row(s)" + (f" ({per})" if per else "")
                         + (f"; expected {self.expected}" if self.expected else ""))
        elif self.observed is not None or self.expected:
            lines.append(f"    observed {_short(self.observed)}; expected {self.expected}")
        if self.detail:
            lines.append(f"    {self.detail}")
        for ex in self.examples:
            text = f"    e.g. {ex['dataset']} line {ex['line']}"
            if ex.get("id") is not None:
                text += f" (id {_short(ex['id'])})"
            if ex.get("prompt") is not None:
                text += f": prompt {json.dumps(ex['prompt'], ensure_ascii=False)}"
            if "value" in ex and self.column not in _PROMPT_COLUMNS:
                text += f" -> {self.column} = {_short(ex['value'])}"
            if ex.get("duplicate_of"):
                text += f" [same as {', '.join(ex['duplicate_of'])}]"
            if ex.get("train_match"):
                prompt = json.dumps(ex["train_prompt"], ensure_ascii=False)
                text += f" [near-duplicate of {ex['train_match']}: {prompt}]"
            lines.append(text)
        return "\n".join(lines)


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure]
    report_path: Path
    data_docs_path: Path
    evaluated_expectations: int = 0
    rows: int = 0
    datasets: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # shown, never failing (opening-word cues)

    def summary(self) -> str:
        files = len(self.datasets)
        if self.success:
            head = (f"Data validation passed: {self.evaluated_expectations} expectations on {self.rows} rows "
                    f"in {files} file(s).")
            body: list[str] = []
        else:
            head = (f"Data validation FAILED: {len(self.failures)} of {self.evaluated_expectations} "
                    f"expectations failed ({self.rows} rows in {files} file(s)).")
            body = [f.describe() for f in self.failures]
        tail = [f"Data Docs: {self.data_docs_path}", f"Report:    {self.report_path}"]
        return "\n".join([head, *body, *(f"warning: {w}" for w in self.warnings), *tail])


def make_report(result, frame, datasets: list[Dataset], out_dir: Path,
                warnings: list[str] | None = None) -> ValidationReport:
    """The report of one validation run over `frame`, with its paths under out_dir."""
    files = {ds.name: str(ds.path) for ds in datasets}
    failures = [_failure(r, frame, files) for r in result.results if not r.success]
    readable = frame["parse_error"].isna()
    summary_rows = [{"name": ds.name, "file": str(ds.path), "split": ds.split,
                     "expected_label": ds.expected_label,
                     "records": int((readable & (frame["dataset"] == ds.name)).sum()),
                     "unreadable_lines": int((~readable & (frame["dataset"] == ds.name)).sum())}
                    for ds in datasets]
    return ValidationReport(
        success=bool(result.success) and not failures, failures=failures, report_path=out_dir / "report.json",
        data_docs_path=out_dir / "data_docs" / "index.html", evaluated_expectations=len(result.results),
        rows=len(frame), datasets=summary_rows, warnings=list(warnings or []),
    )


def write_report(report: ValidationReport, result, params: ValidateParams, special_tokens: tuple[str, ...]):
    """Write report.json (atomically): the summary, every failure with its examples, every expectation's
    outcome, and what was checked against (params, the model's special tokens)."""
    failures = report.failures
    write_json(report.report_path, {
        "success": report.success,
        "statistics": {"evaluated_expectations": len(result.results),
                       "successful_expectations": len(result.results) - len(failures),
                       "unsuccessful_expectations": len(failures), "rows": report.rows},
        "datasets": report.datasets,
        "failures": [_plain(asdict(f)) for f in failures],
        "warnings": report.warnings,
        "results": [_plain({
            "expectation": r.expectation_config.type,
            "check": (r.expectation_config.meta or {}).get("check"),
            "dataset": (r.expectation_config.meta or {}).get("dataset"),
            "column": r.expectation_config.kwargs.get("column"),
            "success": bool(r.success),
            "element_count": (r.result or {}).get("element_count"),
            "unexpected_count": (r.result or {}).get("unexpected_count"),
            "observed_value": (r.result or {}).get("observed_value"),
        }) for r in result.results],
        "params": params.model_dump(),
        "special_tokens": list(special_tokens),
        "data_docs": str(report.data_docs_path),
        "report": str(report.report_path),
    })


def _plain(value):
    """JSON-safe: numpy scalars to Python, NaN to None, anything exotic to its repr."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (ValueError, TypeError):
            return repr(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return repr(value)


def _excerpt(value, limit: int = EXCERPT_CHARS):
    """A string cut to `limit` characters; other values (a number where a prompt should be) as they are."""
    value = _plain(value)
    if isinstance(value, str) and len(value) > limit:
        return value[:limit - 3] + "..."
    return value


def _short(value, limit: int = 2 * EXCERPT_CHARS) -> str:
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _expected_text(kwargs: dict) -> str:
    if "value_set" in kwargs:
        return f"values in {list(kwargs['value_set'])}"
    if "regex" in kwargs:
        return f"no match for /{kwargs['regex']}/"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    upper = "<" if kwargs.get("strict_max") else "<="
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"{upper} {hi}"
    return ""


def _exception_text(info) -> str:
    if not info:
        return ""
    if "raised_exception" in info:
        return info.get("exception_message") or "" if info.get("raised_exception") else ""
    messages = (_exception_text(v) for v in info.values() if isinstance(v, dict))
    return "; ".join(dict.fromkeys(m for m in messages if m))


def _failure(r, frame, files: dict[str, str]) -> Failure:
    config = r.expectation_config
    kwargs = dict(config.kwargs)
    meta = dict(config.meta or {})
    column = kwargs.get("column")
    res = dict(r.result or {})
    index = res.get("unexpected_index_list") or []
    keys = [d["row_key"] for d in index if isinstance(d, dict) and "row_key" in d]
    counts = Counter(k.rsplit(":", 1)[0] for k in keys)
    dataset = ", ".join(counts) if counts else meta.get("dataset", "all files")
    unique = config.type == "expect_column_values_to_be_unique"
    groups: dict[Any, list[str]] = defaultdict(list)
    if unique:
        for d in index:
            groups[repr(d.get(column))].append(d["row_key"])
    examples = []
    rows = frame.set_index("row_key", drop=False)
    for d in index[:MAX_EXAMPLES]:
        row = rows.loc[d["row_key"]]
        ex = {"dataset": row["dataset"], "file": row["file"], "line": int(row["line"]),
              "id": _plain(row["id"]), "prompt": _excerpt(row["prompt"]), "value": _plain(d.get(column))}
        if column in _PROMPT_COLUMNS:
            ex["value"] = _excerpt(d.get(column))
        if unique:
            ex["duplicate_of"] = [k for k in groups[repr(d.get(column))] if k != d["row_key"]][:3]
        if column == "train_jaccard" and row["train_match"]:
            match = rows.loc[row["train_match"]]
            ex["train_match"] = f"{match['dataset']} line {int(match['line'])}"
            ex["train_prompt"] = _excerpt(match["prompt"])
        examples.append(ex)
    observed = res.get("observed_value")
    if config.type == "expect_column_distinct_values_to_contain_set":
        missing = res.get("partial_missing_list") or []
        observed = f"missing {', '.join(map(str, missing))}" if missing else observed
    single = {files[k] for k in counts} if counts else ({files[dataset]} if dataset in files else set())
    return Failure(
        expectation=config.type, check=meta.get("check", config.type), dataset=dataset,
        file=next(iter(single)) if len(single) == 1 else None, column=column,
        unexpected_count=res.get("unexpected_count"), expected=_expected_text(kwargs),
        observed=_plain(observed), counts_by_dataset=dict(counts), examples=examples,
        detail=_exception_text(r.exception_info),
    )
