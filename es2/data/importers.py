"""Convert public benchmark files into normalised records (see es2.data.schema).

`es2 data import FORMAT INPUT --label LABEL --output OUT.jsonl` is `import_records` then `write_records`.
A format is a default map from record field to input column, whatever kind of file holds it: the file's suffix
says how it is read (es2.data.readers), so a benchmark exported from the Hub as JSON Lines or Parquet imports
like its CSV. `columns` overrides that map, so an unusual export of a known benchmark, or any other table,
imports without code. Each benchmark format also has signature columns: a file without them, or one whose
columns are another benchmark's, is refused with the format it really is. `read_prompt_file` is the same
import for commands that take a prompt file directly (`es2 evaluate --harmful F`): it finds the format from
the columns.
"""

from __future__ import annotations

from pathlib import Path

from es2.data.prompt_checks import control_character, special_token
from es2.data.readers import KINDS, file_kind, read_rows
from es2.data.schema import LABELS, REQUIRED_FIELDS, read_records
from es2.errors import DataError
from es2.io import write_jsonl

# Fields a column can feed. `context` goes before the prompt and `input` after it, each separated by a blank
# line: that is how HarmBench (ContextString) and Alpaca (input) present them to a model.
MAPPABLE_FIELDS = ("id", "prompt", "label", "category", "subcategory", "target", "response", "context", "input")

# XSTest says safe/unsafe for the same two classes; case and surrounding spaces vary between exports.
LABEL_ALIASES = {"harmful": "harmful", "harmless": "harmless", "unsafe": "harmful", "safe": "harmless"}

# XSTest's two classes: safe prompts are the borderline ("sounds dangerous but is safe") set by design, and the
# unsafe ones are their contrasts.
XSTEST_CATEGORY = {"harmless": "borderline", "harmful": "contrast"}

# Generic files use the normalised names, so a file already in the record format re-imports as is.
_GENERIC = {field: field for field in ("id", "prompt", "label", "category", "subcategory", "target", "response")}

# format -> (field -> column, label when the file has no label column). AdvBench, HarmBench, StrongREJECT,
# Do-Not-Answer and SimpleSafetyTests hold nothing but harmful requests. JailbreakBench ships a benign split
# with the same columns, and Alpaca-style files exist for both classes, so those need an explicit label.
_SPECS = {
    "advbench": ({"prompt": "goal", "target": "target"}, "harmful"),
    "harmbench": ({"id": "BehaviorID", "prompt": "Behavior", "category": "SemanticCategory",
                   "context": "ContextString"}, "harmful"),
    "jailbreakbench": ({"id": "Index", "prompt": "Goal", "target": "Target", "category": "Category"}, None),
    "strongreject": ({"prompt": "forbidden_prompt", "category": "category"}, "harmful"),
    "donotanswer": ({"id": "id", "prompt": "question", "category": "risk_area", "subcategory": "types_of_harm"},
                    "harmful"),
    "simplesafetytests": ({"id": "id", "prompt": "prompts_final", "category": "harm_area"}, "harmful"),
    # XSTest's `type` (homonyms, figurative_language, ..., contrast_*) is kept as the subcategory; the category
    # is set below: every safe XSTest prompt is one that sounds dangerous but is safe.
    "xstest": ({"id": "id", "prompt": "prompt", "subcategory": "type", "label": "label"}, None),
    "alpaca": ({"prompt": "instruction", "input": "input", "response": "output", "category": "category"}, None),
    "jsonl": (_GENERIC, None),
    "csv": (_GENERIC, None),
}
FORMATS = tuple(_SPECS)
_GENERIC_FORMATS = ("jsonl", "csv")
BENCHMARK_FORMATS = tuple(fmt for fmt in FORMATS if fmt not in _GENERIC_FORMATS)
# How a format's files are read when their suffix does not say (es2.data.readers): Alpaca ships JSON.
_JSON_FORMATS = ("alpaca", "jsonl")

# The columns that identify each format's files (case is ignored). Benchmarks share column names: AdvBench's
# goal and target are also JailbreakBench's, and JailbreakBench's Behavior (a short label such as "Fake
# charity") is HarmBench's prompt column. Without this check a JailbreakBench file "imports" as HarmBench
# with labels for prompts. The generic formats take any table, so theirs is only used to name them.
_SIGNATURES = {
    "advbench": ("goal", "target"),
    "harmbench": ("Behavior", "SemanticCategory"),
    "jailbreakbench": ("Goal", "Target", "Behavior", "Category"),
    "strongreject": ("forbidden_prompt",),
    "donotanswer": ("question", "risk_area"),
    "simplesafetytests": ("prompts_final",),
    "xstest": ("prompt", "type", "label"),
    "alpaca": ("instruction",),
    "jsonl": ("prompt",),
    "csv": ("prompt",),
}


def import_records(fmt: str, path, label: str | None, columns: dict[str, str] | None = None,
                   source: str | None = None, special_tokens: tuple[str, ...] = ()) -> list[dict]:
    """Read `path` as `fmt` and return normalised records; any problem raises DataError naming the fix.

    `label` applies to every row and is required unless the file has a label column. `columns` maps
    field -> input column and overrides the format's defaults. `source` defaults to the format name.
    A prompt may hold no control character and none of `special_tokens` (the target model's, from
    es2.data.prompt_checks.special_token_strings).
    """
    if fmt not in _SPECS:
        raise DataError(f"unknown import format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    columns = columns or {}
    unknown = sorted(set(columns) - set(MAPPABLE_FIELDS))
    if unknown:
        raise DataError(f"--columns names unknown field(s) {unknown}",
                        f"map any of: {', '.join(MAPPABLE_FIELDS)}")
    if label is not None and label.strip().lower() not in LABEL_ALIASES:
        raise DataError(f"--label {label!r} is not a label", f"use one of: {', '.join(LABELS)}")
    path = Path(path)
    found, rows = read_rows(path, file_kind(path, "json" if fmt in _JSON_FORMATS else "csv"))
    return _records(fmt, path, found, rows, label, columns, source or fmt, special_tokens)


def read_prompt_file(path, label: str) -> list[dict]:
    """The `label` records of any prompt file es2 reads, for commands that take one directly (es2 evaluate).

    Normalised JSONL is read as it is (es2.data.schema). Any other file is imported in the benchmark format its
    columns show, else as a generic table with a `prompt` column (source: the file's name), or one prompt per
    line (.txt). A file with its own label column (XSTest, a table with `label`) keeps its labels and only its
    `label` rows are returned; the rows of any other file all get `label`, e.g. a StrongREJECT file given as
    harmful prompts. A benchmark of harmful requests only (AdvBench, ...) given as the harmless set is refused.
    """
    path = Path(path)
    if path.suffix.lower() not in KINDS:
        raise DataError(f"{path}: unknown file type {path.suffix!r}",
                        "use .jsonl, .json, .csv, .parquet or .txt (one prompt per line)")
    found, rows = read_rows(path, KINDS[path.suffix.lower()])
    if path.suffix.lower() == ".jsonl" and all(field in found for field in REQUIRED_FIELDS):
        records = read_records(path)
    else:
        fmt = _format_of(found, path)
        spec, holds_only = _SPECS[fmt]
        own_labels = "label" in spec and _column(found, spec["label"]) is not None
        if holds_only not in (None, label):  # e.g. AdvBench given as the benign set: a mistake, never a choice
            raise DataError(f"{path}: {fmt} files hold {holds_only} prompts only; this one was given as the "
                            f"{label} set",
                            f"give it as the {holds_only} set, and a file of {label} prompts as the {label} set")
        if _column(found, spec["prompt"]) is None:
            flag = "" if own_labels else f" --label {label}"
            raise DataError(f"{path}: no 'prompt' column and no benchmark's columns; columns found: {found}",
                            f"convert it first and pass the result: es2 data import {fmt} {path}{flag} "
                            "--columns prompt=COL --output prompts.jsonl")
        source = path.stem if fmt in _GENERIC_FORMATS else fmt
        records = _records(fmt, path, found, rows, None if own_labels else label, None, source, ())
    chosen = [r for r in records if r["label"] == label]
    if not chosen:
        raise DataError(f"{path}: no {label} prompts; its labels are {sorted({r['label'] for r in records})}",
                        f"pass a file that holds {label} prompts")
    return chosen


def parse_column_mapping(spec: str) -> dict[str, str]:
    """Parse the --columns option, e.g. "prompt=question,category=topic", into {field: column}."""
    mapping = {}
    for item in spec.split(","):
        field, equals, column = (part.strip() for part in item.partition("="))
        if not (equals and field and column):
            raise DataError(f"--columns {spec!r}: {item.strip()!r} is not FIELD=COLUMN",
                            "write e.g. --columns prompt=question,category=topic")
        if field in mapping:
            raise DataError(f"--columns {spec!r}: field {field!r} is mapped twice", "map each field once")
        mapping[field] = column
    return mapping


def write_records(records: list[dict], output) -> int:
    """Write records as JSONL atomically (an existing file is replaced only on success); return the count."""
    return write_jsonl(output, records)


def _records(fmt: str, path: Path, found: list[str], rows: list[tuple[str, dict]], label: str | None,
             columns: dict[str, str] | None, source: str, special_tokens: tuple[str, ...]) -> list[dict]:
    """The records of rows read from `path` as `fmt` (import_records' arguments)."""
    columns = columns or {}
    defaults, default_label = _SPECS[fmt]
    if not rows:
        raise DataError(f"{path}: no data rows (only a header or an empty list)",
                        "point at the file that holds the records")
    detected = _detect(found, path)
    _check_format(path, fmt, found, detected, overridden={defaults[f] for f in columns if f in defaults})
    mapping = _resolve_columns(path, found, {**defaults, **columns}, explicit=set(columns), detected=detected)

    # One source of labels only: silently letting --label override a file's own labels (or the reverse)
    # would mislabel rows, e.g. all 450 XSTest prompts as one class.
    if "label" in mapping and label is not None:
        raise DataError(f"{path}: the file has its own labels (column {mapping['label']!r}) and --label "
                        f"{label} was also given", "drop --label to keep the file's labels")
    if "label" not in mapping and label is None and default_label is None:
        raise DataError(f"{path}: no labels: the file has no label column and no --label was given",
                        "pass --label harmful or --label harmless (every row gets it), "
                        "or name the file's label column with --columns label=COL")
    fixed_label = LABEL_ALIASES[label.strip().lower()] if label is not None else default_label

    records = []
    for index, (where, row) in enumerate(rows):
        cell = {field: _text(path, where, row, column) for field, column in mapping.items()}
        if not cell["prompt"]:
            raise DataError(f"{path}: {where} has an empty prompt (column {mapping['prompt']!r})",
                            "fill in or delete that row")
        for field in ("context", "prompt", "input"):
            if cell.get(field):
                row_name = f"{where} (id {cell['id']})" if cell.get("id") else where
                _check_prompt_text(path, row_name, mapping[field], cell[field], special_tokens)
        parts = (cell.get("context"), cell["prompt"], cell.get("input"))
        record = {
            "id": _record_id(source, cell.get("id"), index),
            "prompt": "\n\n".join(part for part in parts if part),
            "label": _row_label(path, where, cell["label"]) if "label" in mapping else fixed_label,
            "source": source,
        }
        # Optional fields are left out rather than written empty (Alpaca's category is always null).
        record.update({field: cell[field] for field in ("category", "subcategory", "target", "response")
                       if cell.get(field)})
        if fmt == "xstest":
            record["category"] = XSTEST_CATEGORY[record["label"]]
        records.append(record)
    return records


def _format_of(found: list[str], path: Path) -> str:
    """The format of a file with columns `found`: the benchmark whose columns it has, else the generic one."""
    return _detect(found, path) or _generic(path)


def _generic(path: Path) -> str:
    """The generic format for a file of this kind."""
    return "jsonl" if path.suffix.lower() in (".json", ".jsonl") else "csv"


def _detect(found: list[str], path: Path) -> str | None:
    """The benchmark format whose signature columns are all present, the most specific when several are (a
    JailbreakBench file has AdvBench's columns too); else the generic format of the file's kind when it has a
    prompt column; else None."""
    matches = [fmt for fmt, signature in _SIGNATURES.items()
               if fmt not in _GENERIC_FORMATS and all(_column(found, c) for c in signature)]
    generic = _generic(path) if _column(found, "prompt") else None
    return max(matches, key=lambda fmt: len(_SIGNATURES[fmt]), default=generic)


def _check_format(path: Path, fmt: str, found: list[str], detected: str | None, overridden: set[str]) -> None:
    """Refuse a file that lacks the signature columns of `fmt` or that is a more specific benchmark's file.

    A signature column the user re-pointed with --columns is not required: that is how an unusual export of
    the benchmark imports. The generic formats accept any table.
    """
    if fmt in _GENERIC_FORMATS:
        return
    overridden = {column.casefold() for column in overridden}
    missing = [c for c in _SIGNATURES[fmt] if c.casefold() not in overridden and not _column(found, c)]
    if missing:
        names = ", ".join(map(repr, missing)) + (" columns" if len(missing) > 1 else " column")
        problem = (f"{path}: not in the {fmt} format: it has no {names}, which every {fmt} file has; "
                   f"columns found: {found}")
        if detected:
            problem += f"; it matches the {detected} format"
        # Another benchmark's column that the wrong importer would take the prompts from makes the danger
        # concrete.
        prompt = _column(found, _SPECS[fmt][0]["prompt"])
        if detected not in (None, *_GENERIC_FORMATS) and prompt:
            problem += f", and imported as {fmt} its {prompt!r} column would become the prompts"
    elif detected not in (None, fmt) and len(_SIGNATURES[detected]) > len(_SIGNATURES[fmt]):
        problem = (f"{path}: in the {detected} format, not {fmt}: it has all of {detected}'s columns "
                   f"{list(_SIGNATURES[detected])}")
    else:
        return
    if detected and detected not in _GENERIC_FORMATS:
        raise DataError(problem, f"import it with its own format: es2 data import {detected} {path} ...")
    # Re-pointing columns is offered only when no other benchmark matches: mapping a JailbreakBench file's
    # columns onto HarmBench's would import it wrong again.
    raise DataError(problem, f"if the file is an export of {fmt} with other column names, map them with "
                             f"--columns FIELD=COL; any other table imports with es2 data import {_generic(path)} "
                             f"{path} ...")


def _column(found: list[str], column: str) -> str | None:
    """The file's name for `column`: exact first, then ignoring case, as exports differ ("goal" vs "Goal")."""
    return next((c for c in found if c == column), None) or next(
        (c for c in found if c.casefold() == column.casefold()), None)


def _resolve_columns(path: Path, found: list[str], wanted: dict[str, str], explicit: set[str],
                     detected: str | None) -> dict:
    """Map each field to a column the file really has. Default columns that are absent are optional,
    except the prompt; a column the user named must exist."""
    mapping = {}
    for field, column in wanted.items():
        match = _column(found, column)
        if match is not None:
            mapping[field] = match
        elif field == "prompt" or field in explicit:
            fix = f"name the {field} column with --columns {field}=COL"
            if field == "prompt" and detected:
                fix = (f"the file matches the {detected} format: import it with es2 data import {detected}; "
                       f"or {fix}")
            raise DataError(f"{path}: no column {column!r} for the {field}; columns found: {found}", fix)
    return mapping


def _check_prompt_text(path: Path, where: str, column: str, text: str, special_tokens: tuple[str, ...]) -> None:
    control = control_character(text)
    if control:
        raise DataError(f"{path}: {where} column {column!r} holds control character {control}",
                        "delete it: prompts hold text only (tab, newline and carriage return are allowed)")
    token = special_token(text, special_tokens)
    if token:
        raise DataError(f"{path}: {where} column {column!r} holds the model's special token {token!r}",
                        "remove it: inside a prompt it would be encoded as the real chat-template token, "
                        "injecting a role marker into the training data")


def _text(path: Path, where: str, row: dict, column: str) -> str:
    """The stripped text of one cell; missing and null cells are empty."""
    value = row.get(column)
    if isinstance(value, (dict, list)):
        raise DataError(f"{path}: {where} column {column!r} holds a JSON {type(value).__name__}, not text",
                        "map a column that holds plain text")
    return "" if value is None else str(value).strip()


def _record_id(source: str, value: str | None, index: int) -> str:
    # Ids are prefixed with the source so that files merged from several benchmarks stay unique
    # (XSTest and JailbreakBench both number from 1); an id already carrying the prefix is kept.
    if not value:
        return f"{source}-{index:05d}"
    return value if value.startswith(f"{source}-") else f"{source}-{value}"


def _row_label(path: Path, where: str, value: str) -> str:
    if value.lower() not in LABEL_ALIASES:
        raise DataError(f"{path}: {where} has label {value!r}, not one of {list(LABELS)}",
                        "use harmful or harmless (safe and unsafe are read as harmless and harmful)")
    return LABEL_ALIASES[value.lower()]
