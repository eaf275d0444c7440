"""Forced text for prefilling and injection at evaluation: spans training never used.

A model trained to recover after the records' affirmative targets ("Sure, here is ...") can pass an evaluation
that injects the same kind of span while failing on any other. So the headline's spans come, by default, from
a source training does not use: the evaluated prompts' own answers from the unaligned base model
(`model.name_or_path`, which complies), generated greedily once and cached by content under
`$ES2_CACHE/spans/`. Sources (`evaluate.span_source`):

  base_model   the unaligned base model's greedy answers to the evaluated prompts (default)
  target       the records' `target` (affirmative prefix; the training source `train.trajectory_spans: target`)
  response     the records' `response` (harmful answers the user supplied)
  <file>.jsonl rows {"prompt": ..., "span": ...}: the span for each evaluated prompt, matched by prompt text

Where the base model happens to refuse a prompt its span is a refusal; that row's attack then forces a
refusal, which is honest (the span is what the base wrote) and only makes the attack weaker.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from es2.errors import ConfigError, DataError

SOURCES = ("base_model", "target", "response")
SPAN_FORMAT = 1


def default_target(prompt: str) -> str:
    """The affirmative prefix of a record that has no `target`."""
    return f"Sure, here is how to {prompt[0].lower()}{prompt[1:]}"


def targets(rows: list[dict]) -> list[str]:
    return [r.get("target") or default_target(r["prompt"]) for r in rows]


def check_source(source: str) -> None:
    """Fail before any model loads when the source is neither a known name nor an existing JSONL file."""
    if source in SOURCES:
        return
    if not source.endswith(".jsonl"):
        raise ConfigError(f"evaluate.span_source {source!r} is not a span source",
                          f"use one of {', '.join(SOURCES)} or a .jsonl file of prompt + span rows")
    if not Path(source).is_file():
        raise ConfigError(f"evaluate.span_source {source}: file not found",
                          "give the path of a JSONL file with one {\"prompt\", \"span\"} row per prompt")


def _from_file(path: str, rows: list[dict]) -> list[str]:
    from es2.data.schema import read_jsonl

    by_prompt = {}
    for i, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("span"), str):
            raise DataError(f"{path}: line {i} lacks a string `prompt` and `span`",
                            "write one {\"prompt\": ..., \"span\": ...} object per line")
        by_prompt[row["prompt"]] = row["span"]
    missing = [r["prompt"] for r in rows if r["prompt"] not in by_prompt]
    if missing:
        raise DataError(f"{path}: no span for {len(missing)} evaluated prompt(s), e.g. {missing[0][:80]!r}",
                        "add a row for every evaluated prompt, or use evaluate.span_source: base_model")
    return [by_prompt[r["prompt"]] for r in rows]


def cache_path(parts: dict) -> Path:
    from es2.modeling import cache_dir

    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return cache_dir() / "spans" / f"{digest}.json"


def base_model_spans(prompts: list[str], model_id: dict, tokens: int, load: Callable[[], tuple],
                     batch_size: int = 16, what: str = "held-out spans") -> list[str]:
    """The base model's greedy answers (`tokens` new tokens) to `prompts`, from the cache when the same model
    (`model_id`: es2.trajectories.model_identity), prompts and length were seen before; else generated with
    `load()` -> (model, tokenizer) and stored atomically. `what` names them in the message (the evaluation
    also caches the shipped model's answers to the benign prompts here)."""
    from es2.generation import generate
    from es2.io import write_json

    path = cache_path({"format": SPAN_FORMAT, "model": model_id, "prompts": list(prompts), "tokens": int(tokens)})
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))["spans"]
    model, tokenizer = load()
    print(f"  {what}: the base model's own answers to {len(prompts)} prompts (cached after this run)",
          flush=True)
    spans = generate(model, tokenizer, list(prompts), tokens, batch_size)
    write_json(path, {"model": model_id.get("name_or_path"), "tokens": tokens, "spans": spans})
    return spans


def spans_for(rows: list[dict], source: str, *, model_id: dict | None = None, tokens: int = 32,
              load: Callable[[], tuple] | None = None, batch_size: int = 16) -> list[str]:
    """One span per harmful record from `source` (see the module docstring)."""
    check_source(source)
    if source == "target":
        return targets(rows)
    if source == "response":
        missing = [r["id"] for r in rows if not r.get("response")]
        if missing:
            raise DataError(f"span source `response`: {len(missing)} harmful record(s) have no response, "
                            f"e.g. {missing[0]}", "supply `response` for every harmful record, or use "
                                                  "evaluate.span_source: base_model")
        return [r["response"] for r in rows]
    if source == "base_model":
        if model_id is None or load is None:
            raise ValueError("span source base_model needs model_id and load")
        return base_model_spans([r["prompt"] for r in rows], model_id, tokens, load, batch_size)
    return _from_file(source, rows)
