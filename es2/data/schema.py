"""The normalised prompt record and how to read it strictly.

Every data file the pipeline reads is JSONL with one record per line:
  required: id (str), prompt (str), label ("harmful" | "harmless"), source (str)
  optional: category (str; "borderline" marks a benign prompt that sounds dangerous but is safe),
            subcategory (str, e.g. XSTest's type), target (affirmative prefix, e.g. "Sure, here is"),
            response (str)
Files are UTF-8; a byte-order mark and CRLF line endings (what Windows editors write) are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

from es2.errors import DataError

LABELS = ("harmful", "harmless")
REQUIRED_FIELDS = ("id", "prompt", "label", "source")
OPTIONAL_FIELDS = ("category", "subcategory", "target", "response")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS


def read_bytes_as_utf8(path: str | Path) -> str:
    """Return the file's text, or fail naming the first byte offset that is not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found", "check the path (data files come from `dvc pull`)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: invalid UTF-8 at byte {exc.start} (line {line}): {raw[exc.start:exc.start + 8]!r}",
            "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN > OUT`",
        ) from exc


def read_text(path: str | Path) -> str:
    """The file's text as UTF-8 with Windows conventions undone: a leading byte-order mark is dropped and CRLF
    line endings become LF, so a file saved by Notepad or Excel reads exactly like the same file saved on Linux."""
    return read_bytes_as_utf8(path).removeprefix("\ufeff").replace("\r\n", "\n")


def json_error(exc: json.JSONDecodeError) -> str:
    """What is wrong with a JSON line, naming the character when it is a raw control character (JSON requires
    those escaped, and json's own message does not say which one it is)."""
    if exc.msg.startswith("Invalid control character"):
        return f"raw control character U+{ord(exc.doc[exc.pos]):04X} inside a string at column {exc.colno}"
    return f"{exc.msg} at column {exc.colno}"


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of objects. Blank lines are skipped; anything else malformed fails with its line."""
    text = read_text(path)
    rows = []
    # split on "\n" only: str.splitlines() would also break inside records at U+2028, which JSON allows raw
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({json_error(exc)})",
                            "one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                            "one JSON object per line")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: file is empty", "add records, or point params at the right file")
    return rows


def read_records(path: str | Path) -> list[dict]:
    """Read normalised records, checking the required columns exist (values are checked by validation)."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise DataError(
                f"{path}: record {lineno} lacks required column(s) {missing}; it has {sorted(row)}",
                f"every record needs {list(REQUIRED_FIELDS)}; convert other formats with `es2 data import`",
            )
    return rows
