"""Data files as columns and rows, read the way the file's suffix says.

.csv is a table, .json a JSON array (or JSON Lines), .jsonl JSON Lines, .parquet a table as the Hugging Face Hub
serves every dataset, .txt one prompt per line. A file whose suffix says none of these is read as the kind its
caller expects (`es2 data import alpaca data.export` is JSON). Each row comes with its place in the file ("row 3
(line 4)", "line 7", "record 2"), so that an error can name it, and every problem raises a DataError naming the
fix.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from es2.data.schema import json_error, read_text
from es2.errors import DataError

KINDS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "lines"}


def file_kind(path, otherwise: str) -> str:
    """How `path` is read: by its suffix, in any case, else as `otherwise`."""
    return KINDS.get(Path(path).suffix.lower(), otherwise)


def read_rows(path, kind: str) -> tuple[list[str], list[tuple[str, dict]]]:
    """The file's columns and its (place, row) pairs; `kind` is one of KINDS' values."""
    readers = {"csv": _read_csv, "json": _read_json, "parquet": _read_parquet, "lines": _read_lines}
    return readers[kind](Path(path))


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file", "point at the data file inside it")
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty", "point at the file that holds the records")
    return text


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """Return the header and (place, row) pairs; a place such as "row 3 (line 4)" locates errors, and a quoted
    value spanning lines gives its row's first and last line, "row 3 (lines 4-6)"."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        header = [name.strip() for name in next(reader)]
        first = reader.line_num + 1  # the line the next row starts on
        for fields in reader:
            lines = f"line {first}" if first == reader.line_num else f"lines {first}-{reader.line_num}"
            first = reader.line_num + 1
            if not any(field.strip() for field in fields):
                continue
            # More values than headers usually means an unquoted comma split a prompt in two.
            if any(field.strip() for field in fields[len(header):]):
                raise DataError(f"{path}: line {reader.line_num} has {len(fields)} values but the header "
                                f"has {len(header)} columns", "quote values that contain commas")
            rows.append((f"row {len(rows) + 1} ({lines})", dict(zip(header, fields))))
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num} is not valid CSV ({exc})",
                        "save the file as standard comma-separated CSV") from exc
    return header, rows


def _read_json(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """Read a JSON array of objects (Alpaca's own format) or JSON Lines; return columns and (place, row)."""
    text = _read_text(path)
    try:
        parsed = json.loads(text)
        items = parsed if isinstance(parsed, list) else [parsed]
        places = [f"record {n}" for n in range(1, len(items) + 1)]
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({json_error(exc)})",
                            "fix the JSON array, or write one object per line (JSONL)") from exc
        items, places = [], []
        # Split on "\n" only: str.splitlines would also split inside strings holding U+2028 and similar.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as line_exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({json_error(line_exc)})",
                                "write one JSON object per line, or a single JSON array") from line_exc
            places.append(f"line {lineno}")
    for place, item in zip(places, items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {place} is a JSON {type(item).__name__}, not an object",
                            "each record must be an object such as {\"prompt\": \"...\"}")
    found = list(dict.fromkeys(key for item in items for key in item))
    return found, list(zip(places, items))


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """A Parquet file, as the Hugging Face Hub serves every dataset. pyarrow is imported here, not above: it
    takes longer to import than the rest of the CLI, and only Parquet files need it."""
    import pyarrow
    import pyarrow.parquet

    if path.is_dir():  # a downloaded Hub dataset is a folder of shards
        raise DataError(f"{path}: is a folder, not a file", "point at one of the .parquet files inside it")
    if not path.is_file():
        raise DataError(f"{path}: file not found", "check the path")
    try:
        table = pyarrow.parquet.read_table(path)
    except pyarrow.ArrowException as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})",
                        "export the data as .csv or .jsonl, or point at the dataset's .parquet file") from exc
    # dates, bytes and decimals become text: the rows are written back out as JSON (es2 judge keeps every column)
    rows = [{key: value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)
             for key, value in row.items()} for row in table.to_pylist()]
    return table.column_names, [(f"row {n}", row) for n, row in enumerate(rows, start=1)]


def _read_lines(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    """One prompt per non-blank line."""
    lines = enumerate(_read_text(path).split("\n"), start=1)
    return ["prompt"], [(f"line {n}", {"prompt": line.strip()}) for n, line in lines if line.strip()]
