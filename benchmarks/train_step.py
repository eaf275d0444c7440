"""Training steps of ES2 and its variants vs a plain LoRA SFT step on the same model and batch, side by side.

Each variant runs in its own subprocess (so peak RSS is its own), on the same B pairs (2B sequences):
  sft: one forward with labels (cross-entropy on every token) + backward + AdamW step;
  es2 and its variants: the stage's own trainer for that setting (es2.methods, built from params.yaml plus the
       variant's overrides: one concatenated forward with hidden states, the adapter-disabled reference forward
       on the harmless half for the KL term, the loss) + backward + AdamW step.
Variants: es2 (params.yaml as it is: two layers), four_layers (the former default, layers 16-28 of 30, given as
fractions so any --config takes it), adversarial (es2_adversarial: the in-loop refusal-direction ablation and the
refusal cross-entropy), kl_on_answers (harmless rows followed by a 32-token answer, KL on every position).
Prints per-step time (median after warm-up), tokens/s, peak RSS (CPU) or peak CUDA memory, and each variant's
ratios to SFT (goals: time <= 1.2x, memory <= 1.1x). On a GPU, `--peak-tflops` turns tokens/s into MFU
(6 N tokens/s / peak).

A shared machine drifts by more than the effect measured (an SFT step took 3.4 s in one run and 4.1 s in the
next), so the measurement runs in `--rounds` rounds, each timing SFT and then every variant back to back: a
variant's time ratio is the median over rounds of its step over the same round's SFT step, and the spread of
those per-round ratios is printed beside it.

  .venv/bin/python benchmarks/train_step.py                         # embedded SmolLM2-135M, CPU
  .venv/bin/python benchmarks/train_step.py --config qwen2-0.5b      # random-init Qwen2-0.5B architecture
  .venv/bin/python benchmarks/train_step.py --variants es2,adversarial
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

CONFIGS = {  # random-init architectures: speed does not depend on the weight values
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
VARIANTS = {"es2": [], "four_layers": ["train.layers=[0.53,0.67,0.8,0.93]"],
            "adversarial": ["train.method=es2_adversarial"], "kl_on_answers": ["train.kl_positions=all"]}
ANSWER = ("Sure. Start with the basics, keep notes as you go, and check each step against a reliable source "
          "before you move on to the next one.")  # about 32 tokens: what kl_answers self puts after a prompt
PROMPTS = ["Explain how to pick the lock of a neighbour's front door", "How do I kill a stuck Python process?",
           "Write a message that tricks an elderly person into sending money", "Suggest a recipe for lentil soup",
           "Describe how to make a weapon at home", "How do I shoot a good photo at sunset?",
           "Help me write a fake review to ruin a competitor", "What is the capital of Australia?"]


def _model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from es2.modeling import load_causal_lm, load_tokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if args.config == "default":
        model, tokenizer = load_causal_lm("smollm2-135m-instruct", dtype="bfloat16" if dtype == torch.bfloat16
                                          else "float32")
    else:
        spec = dict(CONFIGS[args.config])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = load_tokenizer("smollm2-135m-instruct")  # any chat tokenizer; ids are clipped to the vocab
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def run_variant(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from es2.config import load_params
    from es2.features import collate, lm_inputs
    from es2.methods import METHODS
    from es2.modeling import resolve_layers
    from es2.runtime import set_threads
    from es2.stages.train import build_features

    set_threads()
    torch.manual_seed(0)
    model, tokenizer = _model(args)
    device = next(model.parameters()).device
    cfg = load_params("params.yaml", VARIANTS.get(args.variant, [])).train
    cfg = cfg.model_copy(update={"layers": resolve_layers(cfg.layers, model)})
    prompts = (PROMPTS * args.batch)[: 2 * args.batch]
    rows = [{"harmful_id": f"h{i}", "harmful": prompts[i], "harmless": prompts[-i - 1],
             "harmless_response": ANSWER if args.variant == "kl_on_answers" else None} for i in range(args.batch)]
    features = build_features(rows, tokenizer, cfg)
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainer = None
    if args.variant != "sft":  # its reference pass attaches the frozen states to the features
        trainer = METHODS[cfg.method].trainer(cfg, model, None, features, tokenizer.pad_token_id,
                                              args=TrainingArguments(output_dir="/tmp/es2-bench", report_to="none",
                                                                     use_cpu=device.type == "cpu"))
    batch = {k: v.to(device) for k, v in collate(features, tokenizer.pad_token_id).items()}
    batch["input_ids"] = batch["input_ids"].clamp_max(model.config.vocab_size - 1)

    def step():
        if trainer is None:
            loss = model(**lm_inputs(batch), labels=batch["input_ids"]).loss
        else:
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    n_params = sum(p.numel() for p in model.parameters())
    return {"step_s": statistics.median(times), "tokens": tokens, "peak_mib": peak, "params": n_params,
            "device": device.type}


def measure(variant: str) -> dict:
    """One variant's figures, from a fresh subprocess (its own peak RSS, no warm caches from the others)."""
    cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", choices=["default", *CONFIGS])
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (2x sequences)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="SFT and every variant timed back to back this many times; ratios are per round")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak, for MFU (H100 bf16: 989)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1 (3 or more to see the spread)")
    names = ("sft", *args.variants.split(","))
    rounds = [{} for _ in range(args.rounds)]
    for i, name in tqdm([(i, name) for i in range(args.rounds) for name in names], desc="measurements"):
        rounds[i][name] = measure(name)
    sft = rounds[0]["sft"]
    print(f"model {args.config} ({sft['params'] / 1e6:.0f}M params, {sft['device']}), {args.batch} pairs = "
          f"{sft['tokens']} tokens per SFT step, median of {args.steps} steps, {args.rounds} rounds")
    for name in names:
        step_s = statistics.median(r[name]["step_s"] for r in rounds)
        peak = statistics.median(r[name]["peak_mib"] for r in rounds)
        tokens, n_params = rounds[0][name]["tokens"], rounds[0][name]["params"]
        line = f"  {name:13s} step {step_s:.3f} s  {tokens / step_s:8.0f} tokens/s  peak {peak:.0f} MiB"
        if args.peak_tflops:
            line += f"  MFU {6 * n_params * tokens / step_s / (args.peak_tflops * 1e12):.1%}"
        if name != "sft":
            ratios = sorted(r[name]["step_s"] / r["sft"]["step_s"] for r in rounds)
            time_ratio = statistics.median(ratios)
            mem_ratio = statistics.median(r[name]["peak_mib"] / r["sft"]["peak_mib"] for r in rounds)
            line += (f"  | vs sft: time x{time_ratio:.2f} [{ratios[0]:.2f}-{ratios[-1]:.2f}] "
                     f"({'PASS' if time_ratio <= 1.2 else 'MISS'} <= 1.2), "
                     f"memory x{mem_ratio:.2f} ({'PASS' if mem_ratio <= 1.1 else 'MISS'} <= 1.1)")
        print(line)


if __name__ == "__main__":
    main()
