"""What the evaluation saves by sharing work between attacks, measured side by side on the embedded model.

Two shares, each timed against the path it replaced on the same prompts, with the outputs checked identical:
  - generations: the direct answers and the model's own first s tokens before each injection (every s, every
    injected length k, held-out and trained grids) are cuts of ONE greedy generation of the longest
    length (`prompting.own_prefixes`), against one generation per length and per k (`prompting.own_tokens`);
  - reference logits: the KL to the shipped model of the evaluated model and of its baseline on the shipped
    model's answers, with the shipped model's logits computed once (`capability.answer_kls`) against twice.

  .venv/bin/python benchmarks/eval_sharing.py [--harmful 24] [--benign 48]

The grid, lengths and batch size are params.yaml's `evaluate` section (the standard profile's).
"""

from __future__ import annotations

import argparse
import time


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harmful", type=int, default=24, help="harmful prompts (make run: 24)")
    parser.add_argument("--benign", type=int, default=48, help="benign evaluation prompts (make run: 140)")
    args = parser.parse_args()

    from es2.attacks import prompting
    from es2.capability import answer_kl, answer_kls
    from es2.config import load_params
    from es2.generation import generate
    from es2.data.schema import read_jsonl
    from es2.modeling import load_causal_lm
    from es2.runtime import set_threads
    from es2.stages.suite import perturbation_grid

    threads = set_threads()
    params = load_params("params.yaml")
    cfg = params.evaluate
    harmful = [r["prompt"] for r in read_jsonl(params.data.eval_harmful)][:args.harmful]
    benign = [r["prompt"] for r in read_jsonl(params.data.eval_harmless)][:args.benign]
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    generate(model, tokenizer, harmful[:2], 4, progress=False)  # warm-up, not timed
    grid = perturbation_grid(cfg, params.train)
    # the injections as the evaluation ran them: per grid, per injected length k, the steps s it pairs with
    calls = [[s for s, kk in inj if kk == k and s] for inj in (grid.injection, grid.trained_injection)
             for k in dict.fromkeys(k for _, k in inj)]
    lengths = sorted({s for call in calls for s in call} | {cfg.max_new_tokens})
    print(f"SmolLM2-135M, {threads} threads, batch {cfg.batch_size}; {len(harmful)} harmful prompts: direct "
          f"answers of {cfg.max_new_tokens} tokens, own tokens before injection {calls}")

    def per_length():
        out = {cfg.max_new_tokens: generate(model, tokenizer, harmful, cfg.max_new_tokens, cfg.batch_size,
                                            progress=False)}
        for call in calls:
            for s in call:
                out[s] = prompting.own_tokens(model, tokenizer, harmful, [s] * len(harmful), cfg.batch_size)
        return out

    separate, t_separate = _timed(per_length)
    shared, t_shared = _timed(lambda: prompting.own_prefixes(model, tokenizer, harmful, lengths,
                                                             cfg.batch_size))
    same = all(shared[s] == texts for s, texts in separate.items())
    print(f"  generations: {1 + sum(map(len, calls))} separate {t_separate:6.1f} s | one cut "
          f"{t_shared:6.1f} s | saved {t_separate - t_shared:5.1f} s ({t_separate / t_shared:.2f}x) | "
          f"identical: {same}")

    evaluated, _ = load_causal_lm("smollm2-135m-instruct")
    baseline, _ = load_causal_lm("smollm2-135m-instruct")
    answers = generate(model, tokenizer, benign, cfg.max_new_tokens, cfg.batch_size, progress=False)
    twice, t_twice = _timed(lambda: [answer_kl(m, model, tokenizer, benign, answers, cfg.batch_size)
                                     for m in (evaluated, baseline)])
    once, t_once = _timed(lambda: answer_kls({"model": evaluated, "baseline": baseline}, model, tokenizer,
                                             benign, answers, cfg.batch_size))
    same = [repr(r) for r in twice] == [repr(r) for r in once.values()]
    print(f"  KL to the shipped model, {len(benign)} benign answers, 2 models: reference twice "
          f"{t_twice:6.1f} s | once {t_once:6.1f} s | saved {t_twice - t_once:5.1f} s "
          f"({t_twice / t_once:.2f}x) | identical: {same}")


if __name__ == "__main__":
    main()
