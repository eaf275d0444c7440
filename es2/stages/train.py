"""The `train` stage: ES2 (or a baseline) on the pairs, starting from the refusal warm-started base.

Writes `artifacts/train/`: `adapter/` (peft LoRA, or the full model), `metrics.json` (held-out d' before/after,
hidden norms, KL; a DVC metric), `curve.csv` (DVC plot) and `curve.png`. Checkpoints go to `checkpoints/`
every `train.save_steps`; `es2 train --resume` continues from the last one.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch

from es2.config import Params
from es2.errors import ConfigError, DataError
from es2.features import collate, encode_chat
from es2.io import atomic_path, replace_dir, write_json
from es2.pipeline import stage
from es2.stages.align import aligned_model_dir

CURVE_KEYS = ("loss", "loss/separation", "loss/kl", "loss/refusal", "loss/reroute", "loss/retain", "grad_norm")


def read_pairs(path: str | Path) -> list[dict]:
    from es2.data.schema import read_jsonl

    return read_jsonl(path)


SPAN_FIELDS = {"target": ("target", "target"), "response": ("harmful_response", "response")}  # pair, record field


def check_span_source(spans: str, rows: list[dict]) -> None:
    """Refuse, before any model loads, pairs whose harmful record lacks what train.trajectory_spans injects
    (base_model spans are generated, so they need nothing)."""
    if spans not in SPAN_FIELDS:
        return
    pair_field, record_field = SPAN_FIELDS[spans]
    missing = [r["harmful_id"] for r in rows if not r.get(pair_field)]
    if missing:
        raise DataError(f"train.trajectory_spans={spans}: {len(missing)} of {len(rows)} training pairs have a "
                        f"harmful record without a `{record_field}` (e.g. {', '.join(missing[:3])})",
                        f"add a `{record_field}` to every harmful training record, or set "
                        "train.trajectory_spans: base_model (answers of the not-yet-aligned model)")


def with_own_answers(rows: list[dict], model, tokenizer, max_new_tokens: int) -> list[dict]:
    """The pairs with every harmless prompt followed by `model`'s own greedy answer (train.kl_answers: self, the
    model before training): the KL leash then also holds the tokens a user reads, not only the prompt's."""
    from es2.generation import generate

    prompts = list(dict.fromkeys(r["harmless"] for r in rows))
    answers = dict(zip(prompts, generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)))
    return [{**r, "harmless_response": answers[r["harmless"]]} for r in rows]


def build_features(rows: list[dict], tokenizer, cfg) -> list[dict]:
    """Tokenised pairs; the harmful prompt is followed by what train.method trains on (es2.methods)."""
    from es2.methods import METHODS

    if cfg.kl_positions == "response" and not all(r.get("harmless_response") for r in rows):
        raise ConfigError("train.kl_positions=response needs harmless responses in the pairs",
                          "set train.kl_answers: self (the model's own answers), or add a `response` to the "
                          "harmless records")
    target = METHODS[cfg.method].harmful_target
    return [{"harmful": encode_chat(tokenizer, r["harmful"], target(r) if target else None, cfg.max_length),
             "harmless": encode_chat(tokenizer, r["harmless"], r.get("harmless_response"), cfg.max_length)}
            for r in rows]


def trajectory_features(params: Params, model, tokenizer, rows: list[dict]) -> list[dict]:
    """Pairs as generation trajectories with a simulated mid-sequence injection (es2.trajectories): harmful rows
    learn to recover to a refusal after the injected span, harmless rows continue as the frozen model would.
    Built with the model about to be trained (its own first tokens), cached by content."""
    import hashlib
    import json

    from es2 import trajectories
    from es2.judges import get_judge
    from es2.modeling import load_causal_lm

    cfg = params.train
    spans = None
    if cfg.trajectory_spans == "base_model":  # the not-yet-aligned model complies: its answers are harmful spans
        base, base_tokenizer = model, tokenizer  # without align, the model about to be trained is that model
        if base_model_path(params) != params.model.name_or_path:
            base, base_tokenizer = load_causal_lm(params.model.name_or_path, params.model.revision,
                                                  params.model.trust_remote_code, params.model.dtype)
        spans = trajectories.harmful_spans_from_base(base, base_tokenizer, [r["harmful"] for r in rows],
                                                     cfg.trajectory_span_tokens)
        del base
    elif cfg.trajectory_spans == "response":
        spans = [r["harmful_response"] for r in rows]
    # keyed by the model's files (align rebuilds its folder in place) and dtype (greedy tokens differ), the rows
    # with their targets, every option
    model_id = {**trajectories.model_identity(base_model_path(params), params.model.revision),
                "dtype": params.model.dtype}
    # where the model already refuses a direct harmful prompt its own words are the recovery target (judged by
    # meaning, not keywords, so the targets are not chosen by the evaluation's keyword lists); keyed by the
    # judge's head, since a retrained head picks other rows
    judge = get_judge("semantic")
    head = hashlib.sha256(json.dumps(judge.head, sort_keys=True).encode()).hexdigest()[:16]
    built = trajectories.trajectories_for(
        model, tokenizer, rows, model_id,
        cfg.trajectory_steps, cfg.trajectory_span_tokens, spans, cfg.seed,
        max_new_tokens=cfg.trajectory_continuation_tokens, progress=True,
        refusal_check=judge.refused, refusal_check_name=f"semantic:{head}")
    return trajectories.trajectory_features(built, tokenizer, cfg.max_length)


def base_model_path(params: Params) -> str:
    """The warm-started base when align is enabled (built by the align stage), else the configured model."""
    if params.align.enabled:
        return str(aligned_model_dir(params))
    return params.model.name_or_path


def _save_curve(log_history: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in log_history if "loss" in h]
    keys = [k for k in CURVE_KEYS if any(r.get(k) for r in rows)]  # terms the method does not use stay 0
    lines = ["step," + ",".join(k.replace("/", "_") for k in keys)]
    lines += [f"{r['step']}," + ",".join(f"{r.get(k, float('nan')):.6g}" for k in keys) for r in rows]
    from es2.io import write_text

    write_text(out_dir / "curve.csv", "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(keys) - 1 or 1, figsize=(4 * max(1, len(keys) - 1), 3), squeeze=False)
    for ax, key in zip(axes[0], [k for k in keys if k != "grad_norm"]):
        ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(out_dir / "curve.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint whose save finished. The Trainer writes trainer_state.json last, so a run killed
    while saving leaves a folder without a readable one; resuming from it would fail, so it is skipped."""
    import json

    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if checkpoints.is_dir() else []
    for folder in reversed(found):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            print(f"skipping incomplete checkpoint {folder} (interrupted while saving)", flush=True)
    return None


def _reload(params: Params, saved: Path, full_finetune: bool):
    """(trained model, reference context factory) loaded from the saved output."""
    from es2.modeling import load_causal_lm
    from es2.trainer import frozen_view

    base, _ = load_causal_lm(base_model_path(params), params.model.revision, params.model.trust_remote_code,
                             params.model.dtype)
    if full_finetune:
        trained, _ = load_causal_lm(str(saved), trust_remote_code=params.model.trust_remote_code,
                                    dtype=params.model.dtype)
        return trained, partial(frozen_view, trained, base)
    from peft import PeftModel

    trained = PeftModel.from_pretrained(base, str(saved))
    return trained, partial(frozen_view, trained)


def build_trainer(params: Params, model, tokenizer, train_rows: list[dict], checkpoints: Path):
    """train.method's trainer (es2.methods) on the training pairs, or on trajectories built from them, with a
    fresh LoRA adapter on `model` (for full fine-tuning: all of `model`, beside a frozen copy)."""
    from peft import LoraConfig, get_peft_model

    from es2.methods import METHODS
    from es2.trainer import training_arguments

    cfg = params.train
    method = METHODS[cfg.method]
    features = (trajectory_features(params, model, tokenizer, train_rows) if method.trajectories
                else build_features(train_rows, tokenizer, cfg))
    ref_model = None
    if cfg.full_finetune:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        lora = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return method.trainer(cfg, model, ref_model, features, tokenizer.pad_token_id,
                          args=training_arguments(cfg, checkpoints),
                          data_collator=partial(collate, pad_token_id=tokenizer.pad_token_id))


def run_train(params: Params, out_dir: str | Path = stage("train").out_dir,
              pairs_dir: str | Path = stage("pairs").out_dir, resume: bool = False) -> dict:
    from es2.geometry import separation_summary, states_and_kl
    from es2.methods import METHODS
    from es2.modeling import load_causal_lm, make_portable, resolve_layers

    cfg, out_dir = params.train, Path(out_dir)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.pooling == "response" and not METHODS[cfg.method].trajectories:
        raise ConfigError(f"train.pooling=response pools over trajectories' answer prefixes, and train.method "
                          f"{cfg.method} trains on none (every row would pool to its last prompt token)",
                          "use train.method=es2_trajectory with it, or train.pooling=last")
    train_rows = read_pairs(Path(pairs_dir) / "train.jsonl")
    if METHODS[cfg.method].trajectories:
        check_span_source(cfg.trajectory_spans, train_rows)
    model, tokenizer = load_causal_lm(base_model_path(params), params.model.revision,
                                      params.model.trust_remote_code, params.model.dtype)
    cfg = cfg.model_copy(update={"layers": resolve_layers(cfg.layers, model)})  # fractions -> this depth
    params = params.model_copy(update={"train": cfg})  # build_trainer and the methods read the resolved layers
    val_rows = read_pairs(Path(pairs_dir) / "val.jsonl")
    if cfg.kl_answers == "self":
        train_rows, val_rows = (with_own_answers(rows, model, tokenizer, cfg.kl_answer_tokens)
                                for rows in (train_rows, val_rows))
    val_features = build_features(val_rows, tokenizer, cfg)
    checkpoints = out_dir / "checkpoints"
    last = last_complete_checkpoint(checkpoints) if resume else None
    if resume and last is None:
        raise ConfigError(f"--resume: no checkpoint under {checkpoints}", "run `es2 train` without --resume")
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)  # a fresh run must not mix with an older run's checkpoints
    trainer = build_trainer(params, model, tokenizer, train_rows, checkpoints)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.accelerator.num_processes != world:  # e.g. torchrun without ACCELERATE_USE_CPU: silent 1-process runs
        raise RuntimeError(f"launched {world} processes but accelerate sees {trainer.accelerator.num_processes}; "
                           "on CPU set ACCELERATE_USE_CPU=1 (es2 train --set train.num_processes=N does)")
    if trainer.accelerator.distributed_type == "DEEPSPEED" and cfg.grad_accum > 1:
        raise ConfigError("train.grad_accum > 1 under DeepSpeed would step the optimizer once per micro-batch",
                          "use train.grad_accum: 1 with DeepSpeed and raise train.batch_size instead")
    trainer.train(resume_from_checkpoint=last)
    staging = out_dir / ".adapter.tmp"  # a fixed name, not atomic_dir's unique one: all ranks write into it
    trainer.save_model(str(staging))  # every rank takes part: FSDP and ZeRO-3 gather the weights here
    if not trainer.is_world_process_zero():
        return {}
    if cfg.full_finetune:  # the folder is the whole model: whoever loads it (metrics below, evaluate) needs this
        tokenizer.save_pretrained(str(staging))
    make_portable(staging)  # names the warm start so that the adapter loads after `dvc pull` elsewhere
    replace_dir(staging, out_dir / "adapter")

    # Held-out geometry from the saved files on this process alone: works whatever the training sharding was,
    # and checks that the adapter reloads.
    trained, reference = _reload(params, out_dir / "adapter", cfg.full_finetune)
    after = states_and_kl(trained, val_features, cfg.layers, cfg.pooling, tokenizer.pad_token_id, reference)
    with reference() as frozen:
        before = states_and_kl(frozen, val_features, cfg.layers, cfg.pooling, tokenizer.pad_token_id)
    s_before, s_after = separation_summary(before["states"]), separation_summary(after["states"])
    metrics = {
        "method": cfg.method, "steps": trainer.state.global_step, "world_size": world,
        # CPU float sums depend on the thread count (es2.runtime picks the free cores): equal seeds and data give
        # bit-equal adapters only at equal threads; ES2_THREADS pins it
        "torch_threads": torch.get_num_threads(),
        "heldout_dprime_base": s_before["dprime/mean"], "heldout_dprime_trained": s_after["dprime/mean"],
        "heldout_dprime_ratio": s_after["dprime/mean"] / max(s_before["dprime/mean"], 1e-12),
        "heldout_norm_change": s_after["hidden_norm/mean"] / s_before["hidden_norm/mean"] - 1,
        "heldout_kl_harmless": after["kl"],
        "final_train_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "per_layer": {"base": s_before, "trained": s_after},
    }
    write_json(out_dir / "metrics.json", metrics)
    _save_curve(trainer.state.log_history, out_dir)
    return metrics

