"""The baseline's evaluation, kept between runs (evaluate.reuse_baseline).

A `dvc repro` after a training change and every run of the equal-budget study evaluate the same warm start
under the same protocol: half of each evaluation re-measured a model that did not change. Its run (attack
answers, efforts, benign answers, states) is stored under $ES2_CACHE/evaluations, keyed by everything that
determines it: the model's files, the evaluate settings, the prompts, spans and probe sets, the layers, the judges,
and the es2 source itself, so any code change evaluates it afresh. Only the model's identity is cheap to get
wrong; folders are identified by their files' sizes and modification times (es2.trajectories.model_identity).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import es2

_SOURCE = Path(es2.__file__).parent


def source_digest() -> str:
    """sha256 over every file of the es2 package (code and resources): an evaluation from other code is stale."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _SOURCE.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(_SOURCE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(model_id: dict, **parts) -> str:
    """The cache key of one model's evaluation: its identity, the protocol parts (JSON values) and the source."""
    text = json.dumps({"model": model_id, "source": source_digest(), **parts}, sort_keys=True, default=str,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_run(key: str, build: Callable[[], dict]) -> dict:
    """The run stored under `key`, else `build()` stored there atomically (a killed run leaves no entry)."""
    import torch

    from es2.io import atomic_path
    from es2.modeling import cache_dir

    path = cache_dir() / "evaluations" / f"{key}.pt"
    if path.exists():
        print(f"  baseline: reusing its evaluation from {path} (evaluate.reuse_baseline)", flush=True)
        return torch.load(path, weights_only=False)  # our own file, written below
    run = build()
    with atomic_path(path) as tmp:
        torch.save(run, tmp)
    return run
