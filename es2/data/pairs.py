"""Pair construction, pure functions on embeddings (no I/O).

Each harmful prompt is paired with `k` harmless prompts: its nearest neighbours by cosine similarity (hard
negatives: the harmless prompts that look most alike, e.g. "kill a process" for "kill a person"), or random ones.
Splits are made over groups of near-duplicate prompts, so no prompt has a near-copy on the other side of a split.
"""

from __future__ import annotations

import numpy as np
import torch


def nearest_neighbours(queries: np.ndarray, pool: np.ndarray, k: int, block_size: int = 4096,
                       exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours of each unit-norm query row in `pool`: (indices [n,k], similarities [n,k]).

    Blocked so memory is block_size x len(pool). Candidates are found with a bfloat16 matmul (about twice as fast
    as float32 on CPUs with AVX512-BF16) and re-ranked exactly in float32; the margin of 8 extra candidates makes
    a bf16 rounding swap at the k-th place the only possible difference from an exact search.
    `exclude_self` drops index i from row i's neighbours (query set == pool).
    """
    k = min(k, len(pool) - int(exclude_self))
    n_candidates = min(len(pool), k + 8 + int(exclude_self))
    pool32 = torch.from_numpy(np.ascontiguousarray(pool, dtype=np.float32))
    pool16 = pool32.to(torch.bfloat16)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    out_sim = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), block_size):
        q32 = torch.from_numpy(np.ascontiguousarray(queries[start:start + block_size], dtype=np.float32))
        candidates = (q32.to(torch.bfloat16) @ pool16.T).topk(n_candidates, dim=1).indices
        exact = torch.einsum("qd,qcd->qc", q32, pool32[candidates])
        if exclude_self:
            rows = torch.arange(start, start + len(q32)).unsqueeze(1)
            exact = exact.masked_fill(candidates == rows, float("-inf"))
        sims, order = exact.topk(k, dim=1)
        out_idx[start:start + len(q32)] = candidates.gather(1, order).numpy()
        out_sim[start:start + len(q32)] = sims.numpy()
    return out_idx, out_sim


def near_duplicate_groups(embeddings: np.ndarray, threshold: float, k: int = 8) -> np.ndarray:
    """Group id per row: rows linked by cosine >= threshold (through any chain) share a group, numbered in
    order of their first row (the connected components of the graph of each row's k nearest neighbours)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(embeddings)
    if n < 2:
        return np.arange(n)
    idx, sim = nearest_neighbours(embeddings, embeddings, k, exclude_self=True)
    rows, cols = np.nonzero(sim >= threshold)
    links = coo_matrix((np.ones(len(rows)), (rows, idx[rows, cols])), shape=(n, n))
    return connected_components(links, directed=False)[1]


def split_by_group(groups: np.ndarray, fraction: float, rng: np.random.Generator,
                   strata: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the held-out rows: whole groups, in shuffled order, taken while every stratum (e.g. the
    class label) they touch is still below `fraction` of its rows, so each stratum is held out in proportion."""
    strata = np.zeros(len(groups), dtype=int) if strata is None else strata
    labels, counts = np.unique(strata, return_counts=True)
    target = dict(zip(labels.tolist(), np.round(fraction * counts).tolist()))
    taken = dict.fromkeys(target, 0)
    held_out = np.zeros(len(groups), dtype=bool)
    for group in rng.permutation(np.unique(groups)):
        members = groups == group
        touched = np.unique(strata[members]).tolist()
        if all(taken[s] < target[s] for s in touched):
            held_out[members] = True
            for s in touched:
                taken[s] += int((strata[members] == s).sum())
    return held_out


def choose_partners(harmful_emb: np.ndarray, harmless_emb: np.ndarray, k: int, strategy: str,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(partner indices [n,k], cosine similarities [n,k]) of harmless partners for each harmful row."""
    if strategy == "nearest":
        return nearest_neighbours(harmful_emb, harmless_emb, k)
    if strategy == "random":
        k = min(k, len(harmless_emb))
        idx = np.stack([rng.choice(len(harmless_emb), size=k, replace=False) for _ in range(len(harmful_emb))])
        sims = np.einsum("nd,nkd->nk", harmful_emb, harmless_emb[idx])
        return idx, sims.astype(np.float32)
    raise ValueError(f"unknown pairing strategy {strategy!r}; use 'nearest' or 'random'")


def cover_unpaired(harmful_emb: np.ndarray, harmless_emb: np.ndarray,
                   idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(harmful indices, harmless indices, cosines) of extra pairs giving each harmless row that `idx` leaves
    out its most similar harmful row, so that no harmless prompt of a split goes unused."""
    unpaired = np.setdiff1d(np.arange(len(harmless_emb)), idx)
    if not unpaired.size:
        return np.zeros(0, dtype=int), unpaired, np.zeros(0, dtype=np.float32)
    nearest, sims = max_cross_similarity(harmless_emb[unpaired], harmful_emb)
    return nearest, unpaired, sims


def max_cross_similarity(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `a`: (index of the most similar row of `b`, its cosine)."""
    idx, sim = nearest_neighbours(a, b, 1)
    return idx[:, 0], sim[:, 0]
