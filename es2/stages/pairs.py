"""The `pairs` stage: harmful/harmless pairs for train, val and eval, plus stats and a similarity plot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from es2.config import Params
from es2.data.pairs import (choose_partners, cover_unpaired, max_cross_similarity, near_duplicate_groups,
                            split_by_group)
from es2.data.schema import read_records
from es2.embeddings import encode
from es2.errors import DataError
from es2.io import atomic_path, write_json, write_jsonl
from es2.pipeline import stage

SPLITS = ("train", "val", "eval")


def _leak_error(a_rows, b_rows, idx, sim, threshold, what) -> DataError:
    leaks = [(a_rows[i]["id"], b_rows[idx[i]]["id"], float(sim[i])) for i in np.nonzero(sim >= threshold)[0]]
    shown = "; ".join(f"{a} ~ {b} (cos {s:.3f})" for a, b, s in leaks[:5])
    return DataError(f"{len(leaks)} {what} prompt(s) nearly duplicate a training prompt: {shown}",
                     "remove or rewrite those prompts, or raise pairs.leakage_cosine if they are distinct")


def _pair_rows(harmful, harmless, triples) -> list[dict]:
    """Pair records from (harmful index, harmless index, cosine, rank) tuples."""
    rows = []
    for i, j, sim, rank in triples:
        h, s = harmful[i], harmless[j]
        rows.append({"id": f"{h['id']}__{s['id']}", "harmful_id": h["id"], "harmful": h["prompt"],
                     "harmless_id": s["id"], "harmless": s["prompt"], "similarity": round(float(sim), 6),
                     "rank": int(rank), "category": h.get("category"), "target": h.get("target"),
                     "harmful_response": h.get("response"), "harmless_response": s.get("response")})
    return rows


def _similarity_summary(sims: np.ndarray) -> dict:
    q = np.quantile(sims, [0.0, 0.1, 0.5, 0.9, 1.0]) if sims.size else [float("nan")] * 5
    return {"mean": float(sims.mean()) if sims.size else float("nan"),
            **{f"q{int(p * 100)}": float(v) for p, v in zip([0, 0.1, 0.5, 0.9, 1.0], q)}}


def _plot(similarities: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for split, sims in similarities.items():
        ax.hist(sims, bins=30, range=(-0.2, 1.0), alpha=0.5, label=f"{split} (n={sims.size})")
    ax.set_xlabel("cosine similarity of harmful prompt and its harmless partner")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def run_pairs(params: Params, out_dir: str | Path = stage("pairs").out_dir, progress: bool = True) -> dict:
    """Build the pairs; every check runs before the first file is written, so a failure leaves old outputs."""
    cfg, out_dir = params.pairs, Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    sets = {"train_harmful": read_records(params.data.train_harmful),
            "train_harmless": read_records(params.data.train_harmless),
            "eval_harmful": read_records(params.data.eval_harmful),
            "eval_harmless": read_records(params.data.eval_harmless)}
    prompts = [r["prompt"] for rows in sets.values() for r in rows]
    vectors = encode(prompts, cfg.embedding_model, cfg.batch_size, progress)
    emb, start = {}, 0
    for name, rows in sets.items():
        emb[name], start = vectors[start:start + len(rows)], start + len(rows)

    train_rows = sets["train_harmful"] + sets["train_harmless"]
    train_emb = np.concatenate([emb["train_harmful"], emb["train_harmless"]])
    eval_rows = sets["eval_harmful"] + sets["eval_harmless"]
    leak_idx, leak_sim = max_cross_similarity(np.concatenate([emb["eval_harmful"], emb["eval_harmless"]]), train_emb)
    if (leak_sim >= cfg.leakage_cosine).any():
        raise _leak_error(eval_rows, train_rows, leak_idx, leak_sim, cfg.leakage_cosine, "evaluation")

    # Near-duplicates across both classes share a group, so val never holds a near-copy of a train prompt.
    n_h = len(sets["train_harmful"])
    is_harmful = np.arange(len(train_rows)) < n_h
    held_out = split_by_group(near_duplicate_groups(train_emb, cfg.leakage_cosine), cfg.val_fraction, rng,
                              strata=is_harmful)
    pools = {
        "train": (~held_out[:n_h], ~held_out[n_h:]),
        "val": (held_out[:n_h], held_out[n_h:]),
    }
    outputs, similarities, stats = {}, {}, {"strategy": cfg.strategy, "neighbours": cfg.neighbours,
                                             "seed": cfg.seed, "embedding_model": cfg.embedding_model, "splits": {}}
    for split in SPLITS:
        if split == "eval":
            harmful, harmless = sets["eval_harmful"], sets["eval_harmless"]
            h_emb, s_emb = emb["eval_harmful"], emb["eval_harmless"]
        else:
            h_mask, s_mask = pools[split]
            harmful = [r for r, keep in zip(sets["train_harmful"], h_mask) if keep]
            harmless = [r for r, keep in zip(sets["train_harmless"], s_mask) if keep]
            h_emb, s_emb = emb["train_harmful"][h_mask], emb["train_harmless"][s_mask]
        if not harmful or not harmless:
            raise DataError(f"split '{split}' has {len(harmful)} harmful and {len(harmless)} harmless prompts",
                            "add data or change pairs.val_fraction so every split holds both classes")
        idx, sims = choose_partners(h_emb, s_emb, cfg.neighbours, cfg.strategy, rng)
        triples = [(i, j, sim, rank) for i in range(len(harmful))
                   for rank, (j, sim) in enumerate(zip(idx[i], sims[i]))]
        if cfg.cover_harmless:  # ranked after the neighbours: rank == neighbours marks a covering pair
            extra_h, extra_s, extra_sims = cover_unpaired(h_emb, s_emb, idx)
            triples += [(i, j, sim, idx.shape[1]) for i, j, sim in zip(extra_h, extra_s, extra_sims)]
        outputs[split] = _pair_rows(harmful, harmless, triples)
        similarities[split] = sims.ravel()
        stats["splits"][split] = {
            "harmful": len(harmful), "harmless": len(harmless), "pairs": len(outputs[split]),
            "distinct_harmless_partners": len({t[1] for t in triples}),
            "covering_pairs": len(triples) - idx.size,
            "similarity": _similarity_summary(sims.ravel()),
            "categories": dict(sorted(Counter(r.get("category") or "none" for r in harmful).items())),
        }
    train_cats = set(stats["splits"]["train"]["categories"])
    stats["categories_missing_from_train"] = sorted(
        set(stats["splits"]["eval"]["categories"]) - train_cats)
    stats["max_similarity_eval_to_train"] = float(leak_sim.max())

    for split, rows in outputs.items():
        write_jsonl(out_dir / f"{split}.jsonl", rows)
    write_json(out_dir / "stats.json", stats)
    _plot(similarities, out_dir / "similarity.png")
    return stats
