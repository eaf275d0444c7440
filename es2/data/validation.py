"""The `validate` stage: one Great Expectations suite over every input file, and a readable report.

Every non-blank line of every file becomes one row of a single pandas frame, tagged with its dataset
(`train_harmful`, `train_harmless`, `eval_<stem>`) and line number. Lines that are not UTF-8 or not a JSON
object stay in the frame as rows with a `parse_error`, so one bad line never hides the rest. Checks that
need a parsed value or more than one row (stripped length, normalised text, near-duplicate leakage) are
computed in pandas into derived columns; standard GX expectations then check those columns. So every
problem lands in one GX validation result, in the Data Docs site under `out_dir/data_docs`, in
`out_dir/report.json`, and in `ValidationReport.summary()`, each with example rows named by file and line.

Per-file checks (the expected label, the row-count floor) and training-only checks (class balance) are the
same expectations restricted with a GX `row_condition`.

Great Expectations is imported inside `validate_datasets`: its import takes seconds.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from es2.config import ValidateParams
from es2.data.schema import LABELS, OPTIONAL_FIELDS, REQUIRED_FIELDS
from es2.io import write_json

MAX_EXAMPLES = 5
EXCERPT_CHARS = 80
SHINGLE_WORDS = 3
_PUNCT = re.compile(r"[^\w\s]|_")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_]+")
_PROMPT_COLUMNS = ("prompt", "prompt_text")


# --------------------------------------------------------------------------------------------------- results


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
        return "\n".join([head, *body, *tail])


@dataclass(frozen=True)
class _Dataset:
    name: str
    path: Path
    split: str  # "train" | "eval"
    expected_label: str | None


# ------------------------------------------------------------------------------------- text and leakage


def normalise(text: str) -> str:
    """Casefold (after NFKC), drop punctuation, collapse whitespace: 'Hello,  World!' -> 'hello world'."""
    text = _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(text.split())


def shingles(normalised: str, n: int = SHINGLE_WORDS) -> set[str]:
    """Word n-grams of a normalised text; a text shorter than n words is one shingle of all its words."""
    words = normalised.split()
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def max_jaccard(train: list[set[str]], evals: list[set[str]], chunk: int = 512):
    """For each eval shingle set, the highest Jaccard similarity to any train set and that set's index.

    Sets become rows of a sparse binary matrix over the train vocabulary (an inverted index), so the
    intersection sizes of a chunk of eval rows against all train rows are one sparse product; only pairs
    sharing a shingle are ever touched. Returns (scores: float array, index: int array, -1 where no overlap).
    """
    import numpy as np
    from scipy import sparse

    n_eval = len(evals)
    best = np.zeros(n_eval)
    arg = np.full(n_eval, -1, dtype=np.int64)
    if not train or not n_eval:
        return best, arg
    vocab: dict[str, int] = {}
    indptr, indices = [0], []
    for s in train:
        indices.extend(vocab.setdefault(sh, len(vocab)) for sh in s)
        indptr.append(len(indices))
    if not vocab:
        return best, arg
    t_size = np.diff(indptr)
    train_t = sparse.csr_matrix((np.ones(len(indices), np.int32), indices, indptr),
                                shape=(len(train), len(vocab))).T.tocsr()
    e_ptr, e_idx = [0], []
    for s in evals:
        e_idx.extend(vocab[sh] for sh in s if sh in vocab)
        e_ptr.append(len(e_idx))
    e_size = np.array([len(s) for s in evals])
    eval_m = sparse.csr_matrix((np.ones(len(e_idx), np.int32), e_idx, e_ptr), shape=(n_eval, len(vocab)))
    for start in range(0, n_eval, chunk):
        inter = (eval_m[start:start + chunk] @ train_t).tocoo()
        if inter.nnz == 0:
            continue
        rows = inter.row + start
        jac = inter.data / (e_size[rows] + t_size[inter.col] - inter.data)
        order = np.lexsort((-jac, rows))  # by row, best first
        first = order[np.unique(rows[order], return_index=True)[1]]
        best[rows[first]] = jac[first]
        arg[rows[first]] = inter.col[first]
    return best, arg


# ----------------------------------------------------------------------------------------------- reading


def _read_rows(ds: _Dataset) -> list[dict]:
    """One dict per non-blank line. A line that is not UTF-8 / JSON / an object gets a `parse_error`."""
    base = {"dataset": ds.name, "file": str(ds.path), "split": ds.split}
    try:
        raw = ds.path.read_bytes()
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        reason = "file not found" if missing else f"cannot read file ({exc.strerror})"
        return [{**base, "line": 0, "parse_error": f"{ds.path}: {reason}"}]
    rows, offset = [], 0
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(chunk) + 1
        if not chunk.strip():
            continue
        row = {**base, "line": lineno, "parse_error": None}
        rows.append(row)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            row["parse_error"] = (f"invalid UTF-8 at byte {start + exc.start} (line {lineno}): "
                                  f"{chunk[exc.start:exc.start + 8]!r}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            why = "starts with a byte-order mark (save as UTF-8 without BOM)" if text.startswith("\ufeff") \
                else f"not valid JSON ({exc.msg} at column {exc.colno})"
            row["parse_error"] = f"line {lineno}: {why}"
            continue
        if not isinstance(obj, dict):
            row["parse_error"] = f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
            continue
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            row["parse_error"] = f"line {lineno}: a string holds an unpaired surrogate escape (not UTF-8)"
            continue
        missing = [f for f in REQUIRED_FIELDS if f not in obj]
        row["missing_columns"] = ", ".join(missing) if missing else None
        for key in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            row[key] = obj.get(key)
    return rows


def _build_frame(datasets: list[_Dataset]):
    """The frame GX validates: raw columns as read, plus the derived columns the suite checks."""
    import numpy as np
    import pandas as pd

    columns = ["dataset", "file", "split", "line", "parse_error", "missing_columns",
               *REQUIRED_FIELDS, *OPTIONAL_FIELDS]
    records = [row for ds in datasets for row in _read_rows(ds)]
    frame = pd.DataFrame(records, columns=columns, dtype=object)
    frame = frame.astype(object).where(frame.notna(), None)
    frame["line"] = frame["line"].astype("int64")
    frame["row_key"] = [f"{d}:{n}" for d, n in zip(frame["dataset"], frame["line"])]
    frame["has_required"] = frame["parse_error"].isna() & frame["missing_columns"].isna()

    text = [p if isinstance(p, str) else None for p in frame["prompt"]]
    norm = [normalise(p) if p is not None else None for p in text]
    frame["prompt_text"] = pd.Series(text, index=frame.index, dtype=object)
    frame["prompt_stripped_chars"] = [float(len(p.strip())) if p is not None else np.nan for p in text]
    frame["prompt_normalised"] = pd.Series([n or None for n in norm], index=frame.index, dtype=object)
    frame["is_harmful"] = [1.0 if lab == "harmful" else 0.0 if lab == "harmless" else np.nan
                           for lab in frame["label"]]

    # near-duplicate leakage: each evaluation row against every training row
    is_train = (frame["split"] == "train").to_numpy()
    is_eval = (frame["split"] == "eval").to_numpy() & frame["prompt_text"].notna().to_numpy()
    train_pos = np.flatnonzero(is_train)
    eval_pos = np.flatnonzero(is_eval)
    score = np.full(len(frame), np.nan)
    match: list[str | None] = [None] * len(frame)
    if len(eval_pos):
        train_sets = [shingles(norm[i]) if norm[i] else set() for i in train_pos]
        eval_sets = [shingles(norm[i]) if norm[i] else set() for i in eval_pos]
        best, arg = max_jaccard(train_sets, eval_sets)
        score[eval_pos] = best
        keys = frame["row_key"].to_numpy()
        for pos, a in zip(eval_pos, arg):
            if a >= 0:
                match[pos] = keys[train_pos[a]]
    frame["train_jaccard"] = score
    frame["train_match"] = pd.Series(match, index=frame.index, dtype=object)
    return frame


# ---------------------------------------------------------------------------------------------- the suite


def _expectations(gxe, Column, datasets: list[_Dataset], params: ValidateParams) -> list:
    """The suite, in reading order. `meta.check` is the short name shown in the summary."""

    def meta(check: str, dataset: str = "all files") -> dict:
        return {"check": check, "dataset": dataset}

    parsed = Column("has_required") == True  # noqa: E712 (a GX condition, not a Python comparison)
    out = [
        gxe.ExpectColumnValuesToBeNull(column="parse_error", meta=meta("readable line (UTF-8 JSON object)")),
        gxe.ExpectColumnValuesToBeNull(column="missing_columns", meta=meta("required columns present")),
    ]
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c, row_condition=parsed, meta=meta("value not null"))
            for c in REQUIRED_FIELDS]
    out += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="str", meta=meta("string type"))
            for c in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    out += [
        gxe.ExpectColumnValuesToNotMatchRegex(column="prompt_text", regex=r"^\s*$",
                                              meta=meta("prompt empty after stripping")),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_stripped_chars", min_value=params.min_chars,
                                          row_condition=Column("prompt_stripped_chars") > 0,
                                          meta=meta("prompt too short (stripped)")),
        gxe.ExpectColumnValueLengthsToBeBetween(column="prompt_text", max_value=params.max_chars,
                                                meta=meta("prompt too long")),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS), meta=meta("known label")),
    ]
    out += [gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[ds.expected_label],
                                            row_condition=Column("dataset") == ds.name,
                                            meta=meta("label matches the file", ds.name))
            for ds in datasets if ds.expected_label]
    out += [
        gxe.ExpectColumnValuesToBeUnique(column="id", meta=meta("unique id")),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_text", meta=meta("exact duplicate prompt")),
        gxe.ExpectColumnValuesToBeUnique(column="prompt_normalised",
                                         meta=meta("normalised duplicate prompt")),
    ]
    if any(ds.split == "eval" for ds in datasets):
        out.append(gxe.ExpectColumnValuesToBeBetween(
            column="train_jaccard", max_value=params.near_duplicate_jaccard, strict_max=True,
            meta=meta("train/eval near-duplicate leakage (word 3-gram Jaccard)", "eval files vs training")))
    train = Column("split") == "train"
    out += [
        gxe.ExpectColumnMeanToBeBetween(
            column="is_harmful", min_value=params.harmful_share_min, max_value=params.harmful_share_max,
            row_condition=train, meta=meta("class balance (harmful share of training rows)", "training")),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="label", value_set=list(LABELS), row_condition=train,
            meta=meta("both classes in training", "training")),
    ]
    out += [gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows,
                                               row_condition=(Column("dataset") == ds.name)
                                               & Column("parse_error").is_null(),
                                               meta=meta("row-count floor (readable records)", ds.name))
            for ds in datasets]
    return out


def _run_gx(frame, datasets, params: ValidateParams, docs_dir: Path):
    """Run the suite via a Checkpoint that writes Data Docs into docs_dir; return the validation result."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.expectations.row_conditions import Column

    # An ephemeral context whose only Data Docs site is ours: the default one would go to a fresh /tmp dir.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"es2": {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        progress_bars=ProgressBarsConfig(globally=False),
    )
    ctx = gx.get_context(mode="ephemeral", project_config=config)
    suite = gx.ExpectationSuite(name="es2_prompts")
    for expectation in _expectations(gxe, Column, datasets, params):
        suite.add_expectation(expectation)
    suite = ctx.suites.add(suite)
    batch = (ctx.data_sources.add_pandas("es2").add_dataframe_asset("prompts")
             .add_batch_definition_whole_dataframe("all_rows"))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="es2_prompts", data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="es2_validate", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["es2"])],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row_key"],
                       "return_unexpected_index_query": False},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


# --------------------------------------------------------------------------------------- results -> report


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


def _datasets(train_harmful, train_harmless, eval_files) -> list[_Dataset]:
    out = [_Dataset("train_harmful", Path(train_harmful), "train", "harmful"),
           _Dataset("train_harmless", Path(train_harmless), "train", "harmless")]
    taken = {d.name for d in out}
    for path in map(Path, eval_files):
        base = name = "eval_" + (_UNSAFE_NAME.sub("_", path.stem).strip("_") or "file")
        n = 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        out.append(_Dataset(name, path, "eval", None))
    return out


def validate_datasets(train_harmful, train_harmless, eval_files, params: ValidateParams,
                      out_dir) -> ValidationReport:
    """Validate the training files (and any evaluation files) with Great Expectations.

    Writes `out_dir/report.json` (atomically) and the Data Docs site `out_dir/data_docs/index.html`, and
    nothing outside out_dir. Never raises for bad data: a failed check, an empty or unreadable file, a
    non-UTF-8 byte or a bad JSON line are failures in the returned report (`success` False).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    if (docs_dir / "index.html").exists():  # a previous run's site: start afresh so the index shows this run
        shutil.rmtree(docs_dir)
    report_path = out_dir / "report.json"
    datasets = _datasets(train_harmful, train_harmless, eval_files or [])
    files = {ds.name: str(ds.path) for ds in datasets}

    frame = _build_frame(datasets)
    result = _run_gx(frame, datasets, params, docs_dir)
    failures = [_failure(r, frame, files) for r in result.results if not r.success]

    readable = frame["parse_error"].isna()
    summary_rows = [{"name": ds.name, "file": str(ds.path), "split": ds.split,
                     "expected_label": ds.expected_label,
                     "records": int((readable & (frame["dataset"] == ds.name)).sum()),
                     "unreadable_lines": int((~readable & (frame["dataset"] == ds.name)).sum())}
                    for ds in datasets]
    report = ValidationReport(
        success=bool(result.success) and not failures, failures=failures, report_path=report_path,
        data_docs_path=docs_dir / "index.html", evaluated_expectations=len(result.results),
        rows=len(frame), datasets=summary_rows,
    )
    write_json(report_path, {
        "success": report.success,
        "statistics": {"evaluated_expectations": len(result.results),
                       "successful_expectations": len(result.results) - len(failures),
                       "unsuccessful_expectations": len(failures), "rows": len(frame)},
        "datasets": summary_rows,
        "failures": [_plain(asdict(f)) for f in failures],
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
        "data_docs": str(report.data_docs_path),
        "report": str(report_path),
    })
    return report
