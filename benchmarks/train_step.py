"""ES2 training step vs a plain LoRA SFT step on the same model and batch, measured side by side.

Each variant runs in its own subprocess (so peak RSS is its own), on the same B pairs (2B sequences):
  sft: one forward with labels (cross-entropy on every token) + backward + AdamW step;
  es2: ES2Trainer.compute_loss (one concatenated forward with hidden states, the adapter-disabled reference
       forward on the harmless half for the KL term, the ES2 loss) + backward + AdamW step.
Prints per-step time (median after warm-up), tokens/s, peak RSS (CPU) or peak CUDA memory, and the ratios
(goals: time <= 1.2x, memory <= 1.1x). On a GPU, `--peak-tflops` turns tokens/s into MFU (6 N tokens/s / peak).

  .venv/bin/python benchmarks/train_step.py                         # embedded SmolLM2-135M, CPU
  .venv/bin/python benchmarks/train_step.py --config qwen2-0.5b      # random-init Qwen2-0.5B architecture
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {  # random-init architectures: speed does not depend on the weight values
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
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

    from es2.features import collate, encode_chat, lm_inputs
    from es2.losses.es2_loss import ES2Loss
    from es2.runtime import set_threads
    from es2.trainer import ES2Trainer, precompute_reference

    set_threads()
    torch.manual_seed(0)
    model, tokenizer = _model(args)
    device = next(model.parameters()).device
    layers = [model.config.num_hidden_layers // 2, model.config.num_hidden_layers - 2]
    prompts = (PROMPTS * args.batch)[: 2 * args.batch]
    features = [{"harmful": encode_chat(tokenizer, prompts[i]), "harmless": encode_chat(tokenizer, prompts[-i - 1])}
                for i in range(args.batch)]
    calibration = precompute_reference(model, features, layers, "last", tokenizer.pad_token_id)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                           "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    batch = {k: v.to(device) for k, v in collate(features, tokenizer.pad_token_id).items()}
    batch["input_ids"] = batch["input_ids"].clamp_max(model.config.vocab_size - 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    trainer = ES2Trainer(model=model, args=TrainingArguments(output_dir="/tmp/es2-bench", report_to="none",
                                                             use_cpu=device.type == "cpu"),
                         loss_fn=ES2Loss(calibration=calibration), layers=layers, pooling="last")

    def step():
        if args.variant == "sft":
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", choices=["default", *CONFIGS])
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (2x sequences)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak, for MFU (H100 bf16: 989)")
    parser.add_argument("--variant", choices=["sft", "es2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("sft", "es2"):
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                                      .stdout.strip().splitlines()[-1])
    sft, es2 = results["sft"], results["es2"]
    print(f"model {args.config} ({sft['params'] / 1e6:.0f}M params, {sft['device']}), {args.batch} pairs = "
          f"{sft['tokens']} tokens per step, median of {args.steps} steps")
    for name, r in results.items():
        line = f"  {name:4s} step {r['step_s']:.3f} s  {r['tokens'] / r['step_s']:8.0f} tokens/s  peak {r['peak_mib']:.0f} MiB"
        if args.peak_tflops:
            line += f"  MFU {6 * r['params'] * r['tokens'] / r['step_s'] / (args.peak_tflops * 1e12):.1%}"
        print(line)
    time_ratio, mem_ratio = es2["step_s"] / sft["step_s"], es2["peak_mib"] / sft["peak_mib"]
    print(f"es2/sft time ratio {time_ratio:.2f} (goal <= 1.2: {'PASS' if time_ratio <= 1.2 else 'MISS'}); "
          f"peak memory ratio {mem_ratio:.2f} (goal <= 1.1: {'PASS' if mem_ratio <= 1.1 else 'MISS'})")


if __name__ == "__main__":
    main()
