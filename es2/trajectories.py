"""Training trajectories with simulated mid-sequence injections (deep safety alignment, Qi et al. 2025).

For one pair row (harmful prompt, harmless prompt) the builder draws an injection step s from `steps` and
returns two trajectories, each `{"prompt", "prefix", "target"}`:

  - harmful:  prefix = the model's own first s greedy tokens for the harmful prompt + an injected k-token
    harmful span (`spans[i]`, e.g. a harmful answer of the not-yet-aligned base from
    `harmful_spans_from_base`, else the row's affirmative `target`); target = a recovery refusal
    (see "Recoveries" below). Trained with the loss on the target only: whatever was written before, the
    model turns back to a refusal. s = 0 is Qi et al.'s prefix augmentation.
  - harmless: prefix = the model's own first s greedy tokens for the harmless prompt + a k-token benign span;
    target = the model's own greedy continuation after that prefix (no end-of-turn: it may be cut at
    `max_new_tokens`), so an injected span alone does not teach refusing; the harmless answer goes on.

Benign spans: `BENIGN_SPANS`, a fixed list of original, topic-free compliance connectors ("Sure, here is a
clear answer, step by step: ..."), chosen from the row id and cut to k tokens. They have the same affirmative
shape as the harmful spans (which often start with "Sure, here is how to ..."), so the pair contrast says
that what warrants a recovery is harmful content, not an affirmative phrase or the act of injection itself;
being topic-free they fit after any harmless answer, and the continuation stays the model's own.
`benign_spans=` replaces them per row.

Recoveries (issue: a judge must not be matched by construction). The evaluation's keyword judges
(`es2.judges`) look for fixed phrases ("I'm sorry", "I cannot"); recoveries that all used them would pass
those judges by construction. So each harmful row's target is either
  - "own": the model's own greedy refusal of the DIRECT harmful prompt (`generate(max_new_tokens=
    max_new_tokens)`), cut to whole sentences (`whole_sentences`: a target cut mid-word would teach stopping
    mid-word), when a `refusal_check(prompts, responses) -> refused flags` says that cut text refuses. Only
    rows with `own_eligible(row id)` (a hash of the id, about half of them) are tried, so at most about half
    the targets are own text and the pool's variety stays; the rule is per row, so a row's target does not
    depend on the other rows. An answer without a sentence end, or not judged a refusal, takes the pool.
  - "pool": `recovery_for(row id)`, one of `recovery_pool()` (es2/resources/recoveries.txt: original
    turn-back sentences in many phrasings, most without any keyword-judge phrase).
Each trajectory records `recovery_source` ("own" | "pool"). Without a refusal_check every row takes the pool.

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
(model identity, rows' ids and prompts and targets, steps, k, seed, spans, max_new_tokens, the recovery
pool's content hash, the name of the refusal check, the benign lists). Greedy decoding makes a rebuild give
the same file.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from es2.attacks.prompting import _join, first_tokens, own_tokens
from es2.features import encode_chat, pick_by_key
from es2.generation import generate

TRAJECTORY_FORMAT = 2  # bump when the construction changes, so old caches are not reused

RefusalCheck = Callable[[list[str], list[str]], list[bool]]  # (prompts, responses) -> refused flags

# A sentence end: . ! or ? (with any closing quotes or brackets) followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")

# Original, topic-free compliance connectors for the harmless side (see the module docstring).
BENIGN_SPANS = (
    "Sure, here is a clear answer, step by step, with the main points first:",
    "Of course. Let me walk you through it in a bit more detail below.",
    "Here is what you need to know, explained simply and in order:",
    "Certainly! To put it another way, the key ideas are as follows:",
    "Happy to help with that. Here are the details, one at a time:",
)

DEFAULT_TARGET = "Sure, here is how to do that."


@cache
def recovery_pool() -> tuple[str, ...]:
    """The shipped recovery sentences (es2/resources/recoveries.txt, one per line), read on first use."""
    text = resources.files("es2.resources").joinpath("recoveries.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def pool_digest() -> str:
    """sha256 of the recovery pool's content: part of the cache key, so an edited pool is not served stale."""
    return hashlib.sha256("\n".join(recovery_pool()).encode()).hexdigest()


def recovery_for(key: str) -> str:
    """A recovery sentence from the pool, chosen deterministically from the example's id."""
    return pick_by_key(recovery_pool(), key)


def own_eligible(row_id: str) -> bool:
    """Whether a row may take the model's own refusal: half the ids by a hash (salted, so independent of
    `recovery_for`'s choice), which caps own targets at about half the rows."""
    return int(hashlib.sha256(f"own-recovery:{row_id}".encode()).hexdigest(), 16) % 2 == 0


def whole_sentences(text: str) -> str:
    """`text` (stripped) up to its last sentence end, "" when it has none."""
    text = text.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def own_refusals(model, tokenizer, prompts: list[str], ids: list[str], refusal_check: RefusalCheck | None,
                 max_new_tokens: int, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Per row, the model's own refusal of the direct prompt as a recovery target, or "" where the row takes
    the pool (see the module docstring). Only eligible rows are generated and checked; the check sees the
    text that would become the target, and never an empty one (the qi list counts empty text as a refusal)."""
    own = [""] * len(prompts)
    index = [i for i, rid in enumerate(ids) if own_eligible(rid)] if refusal_check is not None else []
    answers = generate(model, tokenizer, [prompts[i] for i in index], max_new_tokens, batch_size,
                       progress=progress)
    cut = {i: whole_sentences(a) for i, a in zip(index, answers)}
    checked = [i for i in index if cut[i]]
    if not checked:
        return own
    flags = list(refusal_check([prompts[i] for i in checked], [cut[i] for i in checked]))
    if len(flags) != len(checked):
        raise ValueError(f"refusal_check returned {len(flags)} flags for {len(checked)} responses")
    for i, refused in zip(checked, flags):
        if refused:
            own[i] = cut[i]
    return own


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
                       benign_spans: Sequence[str] | None = None, progress: bool = False,
                       refusal_check: RefusalCheck | None = None) -> list[dict]:
    """One `{"id", "s", "recovery_source", "harmful": {prompt, prefix, target}, "harmless": {prompt, prefix,
    target}}` per pair row (rows carry id, harmful, harmless and optionally target), in the order given. See
    the module docstring.

    spans: one harmful text per row to inject (its first `span_tokens` tokens); default the row's `target`.
    benign_spans: one benign text per row for the harmless side; default `BENIGN_SPANS` by row id.
    max_new_tokens: length of the harmless continuation (the harmless target) and of the direct answers
        that own refusals are cut from.
    refusal_check: decides which direct answers are refusals (own recovery targets); None: pool only.
    progress: a progress bar per batched generate (one per distinct s > 0, the harmless
        continuations, the direct answers).
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
    own_recovery = own_refusals(model, tokenizer, prompts[:n], ids, refusal_check, max_new_tokens, batch_size,
                                progress)
    out = []
    for i, row in enumerate(rows):
        recovery = _join(harmful_prefix[i], own_recovery[i] or recovery_for(ids[i]))[len(harmful_prefix[i]):]
        out.append({
            "id": ids[i], "s": s_of[i], "recovery_source": "own" if own_recovery[i] else "pool",
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
                   benign_spans: Sequence[str] | None = None, refusal_check_name: str | None = None) -> dict:
    """The cache key parts of `build_trajectories(rows, ...)` for the model identified by `model_id` (any JSON
    value, e.g. `model_identity(path)`); `refusal_check_name` names the refusal check (None: none used)."""
    return {
        "format": TRAJECTORY_FORMAT, "model": model_id,
        "rows": [[_row_id(r, i), r["harmful"], r["harmless"], r.get("target")] for i, r in enumerate(rows)],
        "steps": [int(s) for s in steps], "span_tokens": int(span_tokens), "seed": int(seed),
        "spans": None if spans is None else list(spans), "max_new_tokens": int(max_new_tokens),
        "benign_spans": None if benign_spans is None else list(benign_spans),
        "recovery_pool": pool_digest(), "refusal_check": refusal_check_name,
        "benign_defaults": list(BENIGN_SPANS),
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
                     benign_spans: Sequence[str] | None = None, progress: bool = False,
                     refusal_check: RefusalCheck | None = None, refusal_check_name: str | None = None) -> list[dict]:
    """`build_trajectories` through the cache (key from `trajectory_key`). A refusal_check needs a
    `refusal_check_name` (e.g. "semantic"): a callable cannot be hashed, and the key must tell checks apart."""
    if (refusal_check is None) != (refusal_check_name is None):
        raise ValueError("pass refusal_check and refusal_check_name together (the name keys the cache)")
    key = trajectory_key(model_id, rows, steps, span_tokens, seed, spans, max_new_tokens, benign_spans,
                         refusal_check_name)
    return cached_trajectories(key, lambda: build_trajectories(
        model, tokenizer, rows, steps, span_tokens, spans, seed, max_new_tokens, batch_size, benign_spans,
        progress, refusal_check))


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
