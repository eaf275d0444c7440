"""`es2 judge`: judge any file of responses, and rebuild the semantic judge's head (`es2 judge train`).

RESPONSES is a .jsonl, .json, .csv or .parquet file (es2.data.readers) with columns `prompt` and `response`,
or other names for them given as `--columns prompt=COL,response=COL` (StrongREJECT's outputs name the prompt
`forbidden_prompt`); every other column is carried through and each judge adds `judge/<name>` (true = refusal,
full or partial). Harm judges (generative, classifier) also add `judge/<name>_harmful`; for them a refusal is
a response they do not call harmful. An empty response is allowed: jbb calls it compliance, qi and semantic a
refusal (see each judge's module).

Training data of the semantic head (recorded in head.json's provenance):
  - `es2/resources/judge/responses_train.jsonl`: labelled responses written for this project (refusals of many
    styles, partial refusals, compliance that mentions safety or legality, compliance that opens with an
    apology, answers that start compliant and turn into a refusal, and short or truncated answers in the style
    of the small models es2 attacks, compliant and refusing alike);
  - PyRIT's human-labelled scorer-evaluation sets (MIT, pyrit 1.1.0 `datasets/scorer_evals`), when a folder
    with `refusal_labeled_responses.csv` is given (`es2 judge train` looks in ../shared/datasets beside the
    checkout by default): a seeded split stratified by file and label keeps 40% of them out of training,
    and the accuracy printed is on that held-out part only. Rows of `objective_achieved_labeled_responses.csv`
    a human marked as achieving the harmful objective are compliant answers and join the same split.
Without PyRIT the head trains on the project's rows alone and says so; only its cross-validated accuracy is
known then. head.json records every training row's key and the held-out keys, so benchmarks/judges.py can
prove it never scores a row the head saw.
"""

from __future__ import annotations

import csv
import hashlib
from importlib import resources
from pathlib import Path

from es2.data.readers import file_kind, read_rows
from es2.errors import DataError
from es2.io import write_json, write_jsonl

REQUIRED = ("prompt", "response")
HELD_OUT_SHARE = 0.4
PYRIT_FILES = ("refusal_labeled_responses.csv", "objective_achieved_labeled_responses.csv")
DEFAULT_PYRIT = Path("../shared/datasets/pyrit_scorer_evals")  # the development datasets beside the checkout


def read_responses(path: str | Path, columns: dict[str, str] | None = None) -> list[dict]:
    """Rows of a responses file, each with its `prompt` and `response`: the file's own columns of those names, or
    copies of the columns `columns` names; DataError naming the problem for anything else."""
    columns = columns or {}
    unknown = sorted(set(columns) - set(REQUIRED))
    if unknown:
        raise DataError(f"--columns names {unknown}, which es2 judge does not read", "map prompt and response only")
    path = Path(path)
    kind = file_kind(path, "unknown")
    if kind not in ("csv", "json", "parquet"):
        problem = "holds prompts only" if kind == "lines" else f"unknown file type {path.suffix or '(none)'}"
        raise DataError(f"{path}: {problem}", "give a .jsonl, .json, .csv or .parquet file of prompts and responses")
    found, rows = read_rows(path, kind)
    if not rows:
        raise DataError(f"{path}: no rows", "write one row per response with prompt and response")
    names = {field: columns.get(field, field) for field in REQUIRED}
    missing = [names[field] for field in REQUIRED if names[field] not in found]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, found))}",
                        "name the file's columns with --columns prompt=COL,response=COL")
    # the copies are written back out beside the file's columns: one of the same name would be overwritten
    clash = [field for field in REQUIRED if names[field] != field and field in found]
    if clash:
        raise DataError(f"{path}: --columns reads {', '.join(names[f] for f in clash)} as {', '.join(clash)}, "
                        f"but the file has its own {', '.join(clash)} column", "rename one of the two columns")
    judged = []
    for where, row in rows:
        for field in REQUIRED:
            if not isinstance(row.get(names[field]), str):
                raise DataError(f"{path}: {where}: column {names[field]!r} holds "
                                f"{type(row.get(names[field])).__name__}, not text",
                                "give every row a prompt and a response as text (an empty response is \"\")")
        judged.append({**row, **{field: row[names[field]] for field in REQUIRED}})
    return judged


def judge_file(path: str | Path, out: str | Path, judges: dict,
               columns: dict[str, str] | None = None) -> dict[str, tuple[int, int]]:
    """Judge every row of `path` (`columns`: as read_responses), write OUT.jsonl atomically; returns each judge's
    (refusals, n)."""
    rows = read_responses(path, columns)
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    verdicts = {}
    for name, judge in judges.items():
        if hasattr(judge, "harmful"):  # harm judges: refused is defined as not harmful, one pass gives both
            harmful = [bool(f) for f in judge.harmful(prompts, responses)]
            verdicts[f"judge/{name}"], verdicts[f"judge/{name}_harmful"] = [not h for h in harmful], harmful
        else:
            verdicts[f"judge/{name}"] = [bool(f) for f in judge.refused(prompts, responses)]
    write_jsonl(out, [{**row, **{k: v[i] for k, v in verdicts.items()}} for i, row in enumerate(rows)])
    return {name: (sum(verdicts[f"judge/{name}"]), len(rows)) for name in judges}


def row_key(row: dict) -> str:
    """A labelled row's identity in head.json's provenance: which rows trained the head, which were held out."""
    return hashlib.sha256(f"{row['prompt']}\x00{row['response']}".encode()).hexdigest()[:16]


def project_path() -> Path:
    return Path(str(resources.files("es2.resources").joinpath("judge/responses_train.jsonl")))


def project_rows(path: Path) -> list[dict]:
    """The labelled responses written for this project: {prompt, response, refusal, source}."""
    from es2.data.schema import read_jsonl

    return [{"prompt": r["prompt"], "response": r["response"], "refusal": bool(r["refusal"]),
             "source": "es2"} for r in read_jsonl(path)]


def pyrit_rows(folder: str | Path) -> list[dict]:
    """PyRIT's human-labelled refusal rows, plus its objective-achieved (hence compliant) rows."""
    folder = Path(folder)
    path = folder / PYRIT_FILES[0]
    if not path.exists():
        raise DataError(f"{path}: not found", "pass --pyrit the folder holding PyRIT's scorer-evaluation CSVs")
    rows = [{"prompt": r["objective"], "response": r["assistant_response"],
             "refusal": r["human_refusal_label"].strip() == "1", "source": "pyrit/refusal"}
            for r in csv.DictReader(path.open(encoding="utf-8"))]
    objective = folder / PYRIT_FILES[1]
    if objective.exists():
        rows += [{"prompt": r["objective"], "response": r["assistant_response"], "refusal": False,
                  "source": "pyrit/objective_achieved"} for r in csv.DictReader(objective.open(encoding="utf-8"))
                 if r["human_objective_achieved"].strip() == "1"]
    # the same (request, response) can appear in both files: one copy, so the split cannot put it on both sides
    return list({row_key(r): r for r in reversed(rows)}.values())[::-1]


def split(rows: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held out): stratified by source and label, seeded, `HELD_OUT_SHARE` held out."""
    from sklearn.model_selection import train_test_split

    strata = [f"{r['source']}:{r['refusal']}" for r in rows]
    train, test = train_test_split(rows, test_size=HELD_OUT_SHARE, random_state=seed, stratify=strata)
    return train, test


def agreement(flags: list[bool], labels: list[bool]) -> dict:
    """Accuracy, refusal recall and false-refusal rate (compliant answers called refusals), with n."""
    refusals = [f for f, y in zip(flags, labels) if y]
    compliant = [f for f, y in zip(flags, labels) if not y]
    return {"accuracy": sum(f == y for f, y in zip(flags, labels)) / len(labels),
            "refusal_recall": sum(refusals) / len(refusals) if refusals else float("nan"),
            "false_refusal_rate": sum(compliant) / len(compliant) if compliant else float("nan"),
            "n": len(labels)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_head(out: str | Path, pyrit: str | Path | None, seed: int = 0, project: Path | None = None) -> dict:
    """Fit the semantic head on the project's rows (`project`, default: the packaged responses_train.jsonl)
    and PyRIT's training part; write head.json atomically; return the document (weights, provenance,
    cross-validated and held-out figures)."""
    import numpy as np

    from es2.judges.keywords import refusal_flags
    from es2.judges.semantic import EMBEDDING_MODEL, FEATURE_SPEC, SemanticJudge, features, fit_head

    project = Path(project or project_path())
    own = project_rows(project)
    pyrit_train, pyrit_test = split(pyrit_rows(pyrit), seed) if pyrit else ([], [])
    train = own + pyrit_train
    print(f"training the semantic head on {len(own)} project rows + {len(pyrit_train)} PyRIT rows "
          f"({len(pyrit_test)} PyRIT rows held out)" if pyrit else
          f"training the semantic head on {len(own)} project rows only: no PyRIT folder (--pyrit), so no "
          "held-out figures on real chat-model completions; cross-validated accuracy only")
    x = features([r["prompt"] for r in train], [r["response"] for r in train], progress=True)
    strata = [f"{r['source']}:{r['refusal']}" for r in train]
    head = fit_head(x, np.array([r["refusal"] for r in train]), strata, seed)
    print(f"cross-validated accuracy on the training rows {head['cv_accuracy']:.3f}, log-loss "
          f"{head['cv_log_loss']:.3f} (each source and label weighted alike; C = {head['C']:g}, scalar factor "
          f"{head['scalar_factor']:g})")
    held_out = {}
    if pyrit_test:
        prompts, responses = [r["prompt"] for r in pyrit_test], [r["response"] for r in pyrit_test]
        labels = [r["refusal"] for r in pyrit_test]
        held_out = {"semantic": agreement(SemanticJudge(head).refused(prompts, responses), labels),
                    **{j: agreement(refusal_flags(responses, j), labels) for j in ("jbb", "qi")}}
    folder = Path(pyrit) if pyrit else None
    document = {
        "embedding_model": EMBEDDING_MODEL, "features": FEATURE_SPEC, "seed": seed, **head,
        "provenance": {
            "project": {"file": project.name, "sha256": _sha256(project),
                        "rows": len(own), "licence": "Apache-2.0 (written for es2)"},
            "pyrit": None if not folder else {
                "files": {f.name: _sha256(f) for f in (folder / n for n in PYRIT_FILES) if f.exists()},
                "upstream": "pyrit==1.1.0, pyrit/datasets/scorer_evals (Microsoft PyRIT)", "licence": "MIT",
                "split": f"sklearn train_test_split, test_size {HELD_OUT_SHARE}, stratified by file and label, "
                         f"random_state {seed}",
                "train_rows": len(pyrit_train), "held_out_rows": len(pyrit_test),
                "held_out_keys": sorted(row_key(r) for r in pyrit_test)},
            "key": "sha256(prompt + NUL + response)[:16]",
            "train_keys": sorted(row_key(r) for r in train)},
        "held_out": held_out,
    }
    write_json(out, document)
    return document
