"""The `align` stage: a refusal warm-start for base models that do not refuse (the embedded SmolLM2 does not).

LoRA SFT on the harmful training prompts with varied refusal targets, plus the harmless training prompts
(borderline and topic-matched ones included) with the base model's own greedy answers: self-distillation keeps
its behaviour on ordinary requests and teaches it to keep answering requests that only sound sensitive. Writes
`artifacts/align/adapter/` and `metrics.json` (keyword refusal on held-out harmful prompts and over-refusal on
held-out harmless ones, before and after, with Wilson 95% intervals). The merged model, the base that `train`
starts from, is built once into the cache, keyed by the adapter's content hash.
`align.enabled: false` skips all of this for models that already refuse.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from es2.config import Params
from es2.errors import ConfigError
from es2.io import atomic_dir, write_json, write_text
from es2.pipeline import stage

ALIGN_DIR = Path(stage("align").out_dir)


def _unique(rows: list[dict], key: str, limit: int | None = None) -> list[tuple[str, str]]:
    seen = dict((r[f"{key}_id"], r[key]) for r in rows)
    return list(seen.items())[:limit]


def refusal_rates(model, tokenizer, harmful: list[str], harmless: list[str], max_new_tokens: int) -> dict:
    """Keyword refusal rate on harmful prompts and over-refusal on harmless ones, both judges, with intervals."""
    from es2.generation import generate
    from es2.judges import JUDGES, refusal_flags, wilson_interval

    answers = generate(model, tokenizer, harmful + harmless, max_new_tokens=max_new_tokens)
    out = {"examples": {"harmful": answers[:3], "harmless": answers[len(harmful):len(harmful) + 3]}}
    for judge in JUDGES:
        for name, texts in (("refusal", answers[:len(harmful)]), ("over_refusal", answers[len(harmful):])):
            hits = sum(refusal_flags(texts, judge))
            low, high = wilson_interval(hits, len(texts))
            out[f"{name}_{judge}"] = {"rate": hits / len(texts), "ci95": [low, high], "n": len(texts)}
    return out


def aligned_model_dir(params: Params, align_dir: Path = ALIGN_DIR) -> Path:
    """The warm-started base: the configured model with the align adapter merged in, built once in the cache."""
    from es2.modeling import merged_model_dir

    adapter = align_dir / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"the refusal warm-start adapter {adapter} is missing",
                          "run `es2 align` (or `dvc repro align`) first, or set align.enabled: false")
    return merged_model_dir(adapter, params.model.name_or_path, params.model.revision,
                            params.model.trust_remote_code, params.model.dtype)


def run_align(params: Params, out_dir: str | Path = ALIGN_DIR,
              pairs_dir: str | Path = stage("pairs").out_dir) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from es2.data.schema import read_jsonl
    from es2.features import collate_rows, encode_chat, lm_inputs, refusal_for
    from es2.generation import generate
    from es2.modeling import load_causal_lm, make_portable
    from es2.trainer import training_arguments

    cfg, out_dir = params.align, Path(out_dir)
    if not cfg.enabled:  # keep the stage's outputs present (DVC checks them) and say why they are empty
        shutil.rmtree(out_dir / "adapter", ignore_errors=True)
        write_text(out_dir / "adapter" / "DISABLED.txt", "align.enabled is false: train starts from model.name_or_path\n")
        write_json(out_dir / "metrics.json", {"enabled": False})
        return {"enabled": False}
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(params.model.name_or_path, params.model.revision,
                                      params.model.trust_remote_code, params.model.dtype)
    train_rows = read_jsonl(Path(pairs_dir) / "train.jsonl")
    val_rows = read_jsonl(Path(pairs_dir) / "val.jsonl")
    harmful = _unique(train_rows, "harmful")
    harmless = _unique(train_rows, "harmless", cfg.harmless_prompts)
    held_harmful = [p for _, p in _unique(val_rows, "harmful", cfg.eval_prompts)]
    held_harmless = [p for _, p in _unique(val_rows, "harmless", cfg.eval_prompts)]

    model.eval()
    before = refusal_rates(model, tokenizer, held_harmful, held_harmless, cfg.eval_max_new_tokens)
    own_answers = generate(model, tokenizer, [p for _, p in harmless], max_new_tokens=cfg.max_new_tokens)
    # One flat SFT set, shuffled by the Trainer: the class mix follows the data (every harmless prompt the
    # pairs hold, borderline and topic-matched ones included), so refusing is learnt against many more
    # answered look-alikes than refused prompts; a 1:1 mix taught the model to refuse anything sensitive.
    examples = ([encode_chat(tokenizer, prompt, refusal_for(h_id)) for h_id, prompt in harmful]
                + [encode_chat(tokenizer, prompt, answer) for (_, prompt), answer in zip(harmless, own_answers)])

    lora = cfg.lora
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    args = training_arguments(params.train.model_copy(update={
        "steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": 1, "lr": cfg.lr, "seed": cfg.seed,
        "save_steps": cfg.steps, "logging_steps": max(1, cfg.steps // 8)}), out_dir / "checkpoints")

    def sft_batch(rows):  # refusals and the base's own answers alike are SFT targets
        batch = collate_rows(rows, tokenizer.pad_token_id)
        return {**lm_inputs(batch), "labels": batch["labels"]}

    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=sft_batch)
    trainer.train()
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    model.eval()
    after = refusal_rates(model, tokenizer, held_harmful, held_harmless, cfg.eval_max_new_tokens)

    with atomic_dir(out_dir / "adapter") as staging:
        model.save_pretrained(str(staging))
        make_portable(staging)  # names the base model by its alias, not this machine's cache path
    metrics = {"enabled": True, "steps": cfg.steps, "train_harmful": len(harmful), "train_harmless": len(harmless),
               "before": before, "after": after, "wall_seconds": round(time.perf_counter() - started, 1)}
    write_json(out_dir / "metrics.json", metrics)
    return metrics
