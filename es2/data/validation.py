"""The `validate` stage: one Great Expectations suite over every input file, and a readable report.

Every non-blank line of every file becomes one row of a single pandas frame, tagged with its dataset
(`train_harmful`, `train_harmless`, `eval_<stem>`) and line number. Lines that are not UTF-8 or not a JSON
object stay in the frame as rows with a `parse_error`, so one bad line never hides the rest. Checks that
need a parsed value or more than one row (stripped length, normalised text, control characters, the model's
special tokens, near-duplicate leakage) are computed in pandas into derived columns; standard GX expectations
(es2.data.validation_suite) then check those columns. So every problem lands in one GX validation result, in
the Data Docs site under `out_dir/data_docs`, in `out_dir/report.json`, and in `ValidationReport.summary()`
(es2.data.validation_report), each with example rows named by file and line.

Great Expectations is imported inside `run_suite`: its import takes seconds.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from es2.config import ValidateParams
from es2.data.prompt_checks import control_character, special_token
from es2.data.schema import OPTIONAL_FIELDS, REQUIRED_FIELDS, json_error
from es2.data.validation_report import ValidationReport, make_report, write_report
from es2.data.validation_suite import run_suite

SHINGLE_WORDS = 3
_PUNCT = re.compile(r"[^\w\s]|_")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_]+")


@dataclass(frozen=True)
class Dataset:
    """One input file: its name in the report, its split, and the label its records must have (None: any)."""

    name: str
    path: Path
    split: str  # "train" | "eval"
    expected_label: str | None


def validate_datasets(train_harmful, train_harmless, eval_files, params: ValidateParams, out_dir,
                      special_tokens: tuple[str, ...] = ()) -> ValidationReport:
    """Validate the training files (and any evaluation files) with Great Expectations.

    `special_tokens` are the model's special-token strings (es2.data.prompt_checks.special_token_strings);
    a prompt containing one fails. Writes `out_dir/report.json` (atomically) and the Data Docs site
    `out_dir/data_docs/index.html`, and nothing outside out_dir. Never raises for bad data: a failed check,
    an empty or unreadable file, a non-UTF-8 byte or a bad JSON line are failures in the returned report
    (`success` False).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    if (docs_dir / "index.html").exists():  # a previous run's site: start afresh so the index shows this run
        shutil.rmtree(docs_dir)
    special_tokens = tuple(special_tokens)
    datasets = _datasets(train_harmful, train_harmless, eval_files or [])
    frame = _build_frame(datasets, special_tokens)
    result = run_suite(frame, datasets, params, docs_dir, check_special_tokens=bool(special_tokens))
    report = make_report(result, frame, datasets, out_dir,
                         warnings=opening_word_cues(frame, params.opening_word_share_max))
    write_report(report, result, params, special_tokens)
    return report


def opening_word_cues(frame, share_max: float, min_rows: int = 5) -> list[str]:
    """Opening words of the training prompts that predict the class: a word that opens `min_rows` or more
    labelled training prompts, more than `share_max` of them harmful. A shortcut a model learns instead of the
    intent (refusing "Write a birthday poem" because most "Write ..." prompts were harmful), so a warning
    that names the fix; not a failure, since a user's data may be skewed on purpose."""
    rows = frame[(frame["split"] == "train") & frame["prompt_normalised"].notna() & frame["is_harmful"].notna()]
    overall = rows["is_harmful"].mean() if len(rows) else 0.0
    opening = rows["prompt_normalised"].str.split().str[0]
    counts = rows.groupby(opening)["is_harmful"].agg(["sum", "count"])
    cues = counts[(counts["count"] >= min_rows) & (counts["sum"] > share_max * counts["count"])]
    return [f"shortcut cue: {int(c['sum'])} of {int(c['count'])} training prompts opening with '{word}' are "
            f"harmful (all prompts: {overall:.0%}); add harmless prompts that open with '{word}' so the model "
            "learns the intent, not the word" for word, c in cues.sort_values("count", ascending=False).iterrows()]


def _datasets(train_harmful, train_harmless, eval_files) -> list[Dataset]:
    out = [Dataset("train_harmful", Path(train_harmful), "train", "harmful"),
           Dataset("train_harmless", Path(train_harmless), "train", "harmless")]
    taken = {d.name for d in out}
    for path in map(Path, eval_files):
        base = name = "eval_" + (_UNSAFE_NAME.sub("_", path.stem).strip("_") or "file")
        n = 2
        while name in taken:
            name, n = f"{base}_{n}", n + 1
        taken.add(name)
        out.append(Dataset(name, path, "eval", None))
    return out



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


def _read_rows(ds: Dataset) -> list[dict]:
    """One dict per non-blank line. A line that is not UTF-8 / JSON / an object gets a `parse_error`."""
    base = {"dataset": ds.name, "file": str(ds.path), "split": ds.split}
    try:
        raw = ds.path.read_bytes()
    except OSError as exc:
        missing = isinstance(exc, FileNotFoundError)
        reason = "file not found" if missing else f"cannot read file ({exc.strerror})"
        return [{**base, "line": 0, "parse_error": f"{ds.path}: {reason}"}]
    # A byte-order mark (which Windows editors write) belongs to the file, not to its first record. CRLF needs
    # nothing: the "\r" left at each line's end is JSON whitespace.
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    rows, offset = [], bom
    for lineno, chunk in enumerate(raw[bom:].split(b"\n"), start=1):
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
            why = ("starts with a byte-order mark: two files joined into one? (remove the mark)"
                   if text.startswith("\ufeff") else f"not valid JSON ({json_error(exc)})")
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


def _build_frame(datasets: list[Dataset], special_tokens: tuple[str, ...]):
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
    frame["prompt_control_char"] = pd.Series([control_character(p) if p is not None else None for p in text],
                                             index=frame.index, dtype=object)
    frame["prompt_special_token"] = pd.Series(
        [special_token(p, special_tokens) if p is not None else None for p in text], index=frame.index, dtype=object)
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

