"""Training trajectories with simulated mid-sequence injections (METHOD.md §3.6 and §4; issue 6).

For one pair row (harmful prompt, harmless prompt) the builder draws an injection step s from `steps` and
returns two trajectories, each `{"prompt", "prefix", "target"}`:

  - harmful:  prefix = the model's own first s greedy tokens for the harmful prompt + an injected k-token
    harmful span (`spans[i]`, e.g. a harmful answer of the not-yet-aligned base from
    `harmful_spans_from_base`, else the row's affirmative `target`); target = a recovery refusal
    (`RECOVERIES`, chosen from the row id). Trained with the loss on the target only: whatever was written
    before, the model turns back to a refusal. s = 0 is Qi et al.'s prefix augmentation.
  - harmless: prefix = the model's own first s greedy tokens for the harmless prompt + a k-token benign span;
    target = the model's own greedy continuation after that prefix (no end-of-turn: it may be cut at
    `max_new_tokens`), so an injected span alone does not teach refusing; the harmless answer goes on.

Benign spans: `BENIGN_SPANS`, a fixed list of original, topic-free compliance connectors ("Sure, here is a
clear answer, step by step: ..."), chosen from the row id and cut to k tokens. They have the same affirmative
shape as the harmful spans (which often start with "Sure, here is how to ..."), so the pair contrast says
that what warrants a recovery is harmful content, not an affirmative phrase or the act of injection itself;
being topic-free they fit after any harmless answer, and the continuation stays the model's own.
`benign_spans=` replaces them per row.

Conventions (shared with `es2.attacks.prompting.injection`, the evaluation of the same perturbation):
  - "the first s tokens" of the model is the text of `generate(max_new_tokens=s)` (decoded without special
    tokens; shorter when the model stops earlier), so the own part is exactly what the injection attack at
    step s conditions on. Rows are grouped by s, and each group runs one batched `generate` with
    max_new_tokens=s over its harmful and harmless prompts: exact, and fewer generated tokens than
    generating max(steps) for every row and re-cutting (re-tokenizing generated text can give other ids than
    the model produced, so a cut would not always be the model's first s tokens).
  - "k tokens" of a span is `first_tokens(tokenizer, [span], k)`; own text and span are joined with `_join`
    (one space at a seam without whitespace); the recovery target gets a leading space on the same rule.
  - s is drawn per row with `random.Random(f"{seed}:{row id}")` from `steps` as given (repeat a step to
    weight it), so a row's s does not depend on the other rows or their order.

Caching: `cached_trajectories(key_parts, build)` keeps the result as JSONL under
`cache_dir()/trajectories/<sha256(key)>.jsonl`; `trajectory_key` lists everything the result depends on
(model identity, rows' ids and prompts and targets, steps, k, seed, spans, max_new_tokens, the recovery and
benign lists). Greedy decoding makes a rebuild give the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from es2.attacks.prompting import _join, first_tokens, own_tokens
from es2.features import encode_chat, pick_by_key
from es2.generation import generate

TRAJECTORY_FORMAT = 1  # bump when the construction changes, so old caches are not reused

# Original recovery refusals (written for this project): they acknowledge the text already written and turn back.
RECOVERIES = (  # each starts with a standard refusal phrase, so public keyword judges recognise a recovery
    "I'm sorry, but I cannot continue with this. It could cause serious harm, so I won't help with it.",
    "I'm sorry, I need to stop here. I cannot provide instructions that could be used to hurt people.",
    "I cannot go on with this. I'm sorry, but I can't help with something this dangerous.",
    "I'm sorry, but I must stop. Continuing would mean giving harmful details, and I cannot do that.",
    "I cannot finish this. I'm sorry, but it could put people at risk, so I have to decline.",
)

# Original, topic-free compliance connectors for the harmless side (see the module docstring).
BENIGN_SPANS = (
    "Sure, here is a clear answer, step by step, with the main points first:",
    "Of course. Let me walk you through it in a bit more detail below.",
    "Here is what you need to know, explained simply and in order:",
    "Certainly! To put it another way, the key ideas are as follows:",
    "Happy to help with that. Here are the details, one at a time:",
)

DEFAULT_TARGET = "Sure, here is how to do that."


def recovery_for(key: str) -> str:
    """A recovery refusal chosen deterministically from the example's id."""
    return pick_by_key(RECOVERIES, key)


def benign_span_for(key: str) -> str:
    """A benign connector span chosen deterministically from the example's id."""
    return pick_by_key(BENIGN_SPANS, key)


def _row_id(row: dict, index: int) -> str:
    return str(row.get("id", row.get("harmful_id", index)))


def draw_step(steps: Sequence[int], seed: int, row_id: str) -> int:
    """The injection step of one row: seeded by (seed, row id) only, so independent of the other rows."""
    return int(random.Random(f"{seed}:{row_id}").choice(list(steps)))


def _check(rows, steps, span_tokens, spans, benign_spans) -> list[int]:
    steps = [int(s) for s in steps]
    if not steps or any(s < 0 for s in steps):
        raise ValueError(f"steps must be a non-empty list of integers >= 0, got {steps}")
    if span_tokens < 1:
        raise ValueError(f"span_tokens must be >= 1, got {span_tokens}")
    for name, given in (("spans", spans), ("benign_spans", benign_spans)):
        if given is not None and len(given) != len(rows):
            raise ValueError(f"{len(given)} {name} for {len(rows)} rows")
    return steps


def build_trajectories(model, tokenizer, rows: list[dict], steps: Sequence[int] = (0, 8, 32),
                       span_tokens: int = 10, spans: Sequence[str] | None = None, seed: int = 0,
                       max_new_tokens: int = 64, batch_size: int = 16,
                       benign_spans: Sequence[str] | None = None, progress: bool = False) -> list[dict]:
    """One `{"id", "s", "harmful": {prompt, prefix, target}, "harmless": {prompt, prefix, target}}` per pair row
    (rows carry id, harmful, harmless and optionally target), in the order given. See the module docstring.

    spans: one harmful text per row to inject (its first `span_tokens` tokens); default the row's `target`.
    benign_spans: one benign text per row for the harmless side; default `BENIGN_SPANS` by row id.
    max_new_tokens: length of the harmless continuation (the harmless target).
    progress: a progress bar per batched generate (one per distinct s > 0, then the harmless continuations).
    """
    steps = _check(rows, steps, span_tokens, spans, benign_spans)
    if not rows:
        return []
    n = len(rows)
    ids = [_row_id(r, i) for i, r in enumerate(rows)]
    s_of = [draw_step(steps, seed, rid) for rid in ids]
    harmful_src = list(spans) if spans is not None else [r.get("target") or DEFAULT_TARGET for r in rows]
    benign_src = list(benign_spans) if benign_spans is not None else [benign_span_for(rid) for rid in ids]
    harmful_span, _ = first_tokens(tokenizer, harmful_src, span_tokens)
    benign_span, _ = first_tokens(tokenizer, benign_src, span_tokens)
    prompts = [r["harmful"] for r in rows] + [r["harmless"] for r in rows]
    own = own_tokens(model, tokenizer, prompts, s_of + s_of, batch_size, progress)
    harmful_prefix = [_join(o, t) for o, t in zip(own[:n], harmful_span)]
    harmless_prefix = [_join(o, t) for o, t in zip(own[n:], benign_span)]
    harmless_target = generate(model, tokenizer, prompts[n:], max_new_tokens, batch_size, prefill=harmless_prefix,
                               progress=progress)
    out = []
    for i, row in enumerate(rows):
        recovery = _join(harmful_prefix[i], recovery_for(ids[i]))[len(harmful_prefix[i]):]
        out.append({
            "id": ids[i], "s": s_of[i],
            "harmful": {"prompt": row["harmful"], "prefix": harmful_prefix[i], "target": recovery},
            "harmless": {"prompt": row["harmless"], "prefix": harmless_prefix[i], "target": harmless_target[i]},
        })
    return out


def harmful_spans_from_base(base_model, tokenizer, prompts: list[str], span_tokens: int = 10,
                            batch_size: int = 16) -> list[str]:
    """Greedy answers of a not-yet-aligned model (which complies) cut to `span_tokens` tokens: harmful spans
    to pass as `build_trajectories(spans=...)`. An answer that re-tokenizes to fewer tokens stays shorter."""
    texts = generate(base_model, tokenizer, list(prompts), span_tokens, batch_size, progress=False)
    return first_tokens(tokenizer, texts, span_tokens)[0]


def model_identity(name_or_path: str, revision: str | None = None) -> dict:
    """What identifies a model for the cache: its name or path and revision, and for a local folder the size
    and modification time of each file in it (a folder rebuilt in place, e.g. by the align stage, gets a new
    identity without hashing gigabytes)."""
    path = Path(name_or_path).expanduser()
    files = {}
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            files[str(f.relative_to(path))] = [st.st_size, st.st_mtime_ns]
    return {"name_or_path": str(name_or_path), "revision": revision, "files": files}


def trajectory_key(model_id, rows: list[dict], steps: Sequence[int], span_tokens: int, seed: int,
                   spans: Sequence[str] | None = None, max_new_tokens: int = 64,
                   benign_spans: Sequence[str] | None = None) -> dict:
    """The cache key parts of `build_trajectories(rows, ...)` for the model identified by `model_id` (any JSON
    value, e.g. `model_identity(path)`)."""
    return {
        "format": TRAJECTORY_FORMAT, "model": model_id,
        "rows": [[_row_id(r, i), r["harmful"], r["harmless"], r.get("target")] for i, r in enumerate(rows)],
        "steps": [int(s) for s in steps], "span_tokens": int(span_tokens), "seed": int(seed),
        "spans": None if spans is None else list(spans), "max_new_tokens": int(max_new_tokens),
        "benign_spans": None if benign_spans is None else list(benign_spans),
        "recoveries": list(RECOVERIES), "benign_defaults": list(BENIGN_SPANS),
    }


def cache_path(cache_key_parts: dict) -> Path:
    from es2.modeling import cache_dir

    digest = hashlib.sha256(json.dumps(cache_key_parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return cache_dir() / "trajectories" / f"{digest}.jsonl"


def cached_trajectories(cache_key_parts: dict, build: Callable[[], list[dict]]) -> list[dict]:
    """The trajectories stored under the key, else `build()` written there atomically (and returned as read
    back, so a first and a cached call return equal lists)."""
    from es2.data.schema import read_jsonl
    from es2.io import write_jsonl

    path = cache_path(cache_key_parts)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, build())
    return read_jsonl(path)


def trajectories_for(model, tokenizer, rows: list[dict], model_id, steps: Sequence[int] = (0, 8, 32),
                     span_tokens: int = 10, spans: Sequence[str] | None = None, seed: int = 0,
                     max_new_tokens: int = 64, batch_size: int = 16,
                     benign_spans: Sequence[str] | None = None, progress: bool = False) -> list[dict]:
    """`build_trajectories` through the cache (key from `trajectory_key`)."""
    key = trajectory_key(model_id, rows, steps, span_tokens, seed, spans, max_new_tokens, benign_spans)
    return cached_trajectories(key, lambda: build_trajectories(
        model, tokenizer, rows, steps, span_tokens, spans, seed, max_new_tokens, batch_size, benign_spans,
        progress))


def trajectory_features(trajectories: list[dict], tokenizer, max_length: int = 256) -> list[dict]:
    """Pair features for the trainer (`es2.features.collate`): prompt, then the prefix without loss, then the
    target with loss. The recovery refusal ends with end-of-turn; the harmless continuation does not (it may
    have been cut at max_new_tokens)."""
    return [{
        "harmful": encode_chat(tokenizer, t["harmful"]["prompt"], t["harmful"]["target"], max_length,
                               prefix=t["harmful"]["prefix"]),
        "harmless": encode_chat(tokenizer, t["harmless"]["prompt"], t["harmless"]["target"], max_length,
                                prefix=t["harmless"]["prefix"], eos=False),
    } for t in trajectories]
