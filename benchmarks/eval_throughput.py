"""Batched (16, left padding, KV cache) vs one-by-one greedy generation on the same prompts, side by side.

Prints tokens/s of each and the ratio (goal: >= 4x) on the embedded default model, with the same prompts and the
same number of new tokens; outputs are checked to be identical (greedy decoding does not depend on batching).

  .venv/bin/python benchmarks/eval_throughput.py [--prompts 32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

PROMPTS = ["Explain how vaccines train the immune system", "Write a haiku about autumn rain",
           "How do I kill a stuck Python process?", "Give three tips for a job interview",
           "What causes the seasons on Earth?", "Summarise the plot of Romeo and Juliet",
           "How do I shoot better photos at night?", "Suggest a weekly budget plan for a student"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from es2.generation import generate
    from es2.modeling import load_causal_lm
    from es2.runtime import set_threads

    threads = set_threads()
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (variant {i})" for i in range(args.prompts)]
    generate(model, tokenizer, prompts[:2], 4, progress=False)  # warm-up, not timed

    timings, outputs = {}, {}
    for name, batch_size in (("one-by-one", 1), (f"batched {args.batch_size}", args.batch_size)):
        start = time.perf_counter()
        outputs[name] = generate(model, tokenizer, prompts, args.new_tokens, batch_size, progress=False)
        timings[name] = time.perf_counter() - start
    new_tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs["one-by-one"])
    print(f"SmolLM2-135M, {args.prompts} prompts x up to {args.new_tokens} new tokens, {threads} threads")
    for name, seconds in timings.items():
        print(f"  {name:12s} {seconds:7.1f} s  {new_tokens / seconds:7.1f} tokens/s")
    names = list(timings)
    ratio = timings[names[0]] / timings[names[1]]
    same = sum(a == b for a, b in zip(outputs[names[0]], outputs[names[1]]))
    print(f"batched / one-by-one throughput ratio {ratio:.2f} (goal >= 4: {'PASS' if ratio >= 4 else 'MISS'}); "
          f"identical outputs {same}/{args.prompts}")


if __name__ == "__main__":
    main()
