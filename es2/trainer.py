"""The trainers, in TRL's shape: a `transformers.Trainer` per objective whose `compute_loss` runs one concatenated
forward over [harmful; harmless] with hidden states, a reference pass with the LoRA adapter disabled (no second
model copy; a frozen copy only for full fine-tuning), and a pure loss of `es2.losses`. Named intermediates are
collected per step and averaged in `log`, which the Trainer only prints on rank 0. Which trainer, loss and data
each training method uses is `es2.methods`.

Distributed runs and checkpoint/resume come from the Trainer and accelerate. Invariances this relies on:
- `compute_loss` turns this rank's shard into the global batch in one place (`es2.losses.gather`: pooled states
  gathered, token sums added), so N processes with B/N pairs equal 1 process with B;
- gradient accumulation happens inside `ES2Trainer.training_step`, exact even for batch statistics;
- reference representations (for rel_hinge and the calibration) are fixed, so they are computed once before
  training (`precompute_reference`, a forward that stops at the deepest separated layer) instead of in every
  step; the per-step reference pass only produces the harmless logits for the KL term (or the full states, for
  circuit breakers).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from es2.ablation import ablating
from es2.attacks.hooks import hidden_states_at
from es2.features import collate, lm_inputs
from es2.geometry import pooled
from es2.losses.circuit_breakers import circuit_breaker_loss
from es2.losses.es2_loss import ES2Loss, TokenSum
from es2.losses.gather import all_reduce_sums, gather_layers
from es2.losses.representations import calibrate


def training_arguments(cfg, output_dir: Path) -> TrainingArguments:
    """The Trainer's arguments from a `train`-shaped params section (align reuses them with its own values)."""
    return TrainingArguments(
        # accumulation happens inside ES2Trainer.training_step (exact for batch statistics), so the Trainer
        # sees the whole accumulated batch
        output_dir=str(output_dir), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size * cfg.grad_accum,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_strategy="steps", seed=cfg.seed, data_seed=cfg.seed, report_to="none",
        remove_unused_columns=False, dataloader_drop_last=True, use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
        disable_tqdm=False, save_only_model=False, fp16=cfg.precision == "fp16",
        bf16=cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available()
                                         and torch.cuda.is_bf16_supported()),
    )


@torch.no_grad()
def precompute_reference(model, features: list[dict], layers: list[int], pooling: str, pad_token_id: int,
                         batch_size: int = 16, normalize: str = "unit") -> dict:
    """Attach the reference model's pooled states (`ref_reps`, [L, D]) to every sequence of every feature and
    return the per-layer calibration (centre, scale, probe direction) computed from them.

    Pass the frozen model (`frozen_view`, or the model before the adapter is attached).
    """
    model.eval()
    for start in tqdm(range(0, len(features), batch_size), desc="reference states", leave=False):
        chunk = features[start:start + batch_size]
        batch = collate(chunk, pad_token_id)
        states = hidden_states_at(model, lm_inputs(batch), layers)  # stops at the deepest layer: no logits
        reps = torch.stack(list(pooled(states, batch, layers, pooling).values()), dim=1).float()
        for i, feature in enumerate(chunk):
            feature["harmful"]["ref_reps"] = reps[i]
            feature["harmless"]["ref_reps"] = reps[len(chunk) + i]
    harmful = torch.stack([f["harmful"]["ref_reps"] for f in features])
    harmless = torch.stack([f["harmless"]["ref_reps"] for f in features])
    how = normalize if normalize != "none" else "center"
    return {layer: calibrate(harmful[:, i], harmless[:, i], how) for i, layer in enumerate(layers)}


def split_batch(batch: dict, parts: int) -> list[dict]:
    """Split a collated [harmful; harmless] batch of B pairs into `parts` batches of B/parts pairs each."""
    n = batch["input_ids"].shape[0] // 2
    if n % parts:
        raise ValueError(f"{n} pairs per device do not split into {parts} equal micro-batches")
    size = n // parts
    out = []
    for i in range(parts):
        rows = torch.cat([torch.arange(i * size, (i + 1) * size), torch.arange(n + i * size, n + (i + 1) * size)])
        out.append({k: v[rows.to(v.device)] for k, v in batch.items()})
    return out


@contextmanager
def frozen_view(model, ref_model=None):
    """Yield the frozen reference: `ref_model` when given (full fine-tuning), else `model` with LoRA disabled."""
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with model.disable_adapter():
                yield model


class ReferenceTrainer(Trainer):
    """What every method's trainer shares: the frozen reference, the layers the loss reads, and the named
    intermediates logged TRL's way. Batches come from `features.collate`: rows [:B] harmful, [B:] harmless."""

    def __init__(self, *args, layers: list[int], ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our loss is a per-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.layers, self.ref_model = layers, ref_model
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def reference(self, model):
        """The frozen model: a separate copy for full fine-tuning, else the same weights with LoRA disabled
        (called unwrapped, outside DDP, since it takes no gradient)."""
        return frozen_view(self.accelerator.unwrap_model(model), self.ref_model)

    def _record(self, values: dict) -> None:
        for key, value in values.items():
            self._metrics[key].append(float(value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the step metrics collected since the last log, averaged (TRL's pattern)."""
        logs = {**logs, **{key: sum(v) / len(v) for key, v in self._metrics.items() if v}}
        self._metrics.clear()
        super().log(logs, *args, **kwargs)


class ES2Trainer(ReferenceTrainer):
    """An `ES2Loss` on pooled states (es2, es2_refusal, refusal_sft and the trajectory methods). Reference passes:
    the pooled states once before training (`precompute_reference`, in the batches as `ref_reps`), the
    harmless logits in every step when the KL is weighted."""

    def __init__(self, *args, loss_fn: ES2Loss, pooling: str, kl_positions: str = "prompt", micro_batches: int = 1,
                 ablation: dict[int, torch.Tensor] | None = None, ablation_share: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn, self.pooling, self.kl_positions, self.micro_batches = loss_fn, pooling, kl_positions, micro_batches
        self.ablation, self.ablation_share = ablation, ablation_share

    def _forward(self, model, batch: dict, n: int):
        """The policy's forward with hidden states. With `ablation` (es2_adversarial), the first
        `ablation_share` of the n harmful rows lose the refusal direction at every layer (es2.ablation)."""
        attacked = round(self.ablation_share * n) if self.ablation else 0
        with ablating(self.accelerator.unwrap_model(model), self.ablation or {}, attacked):
            return model(**lm_inputs(batch), output_hidden_states=True)

    def _kl_mask(self, batch: dict) -> torch.Tensor:
        if self.kl_positions == "prompt":
            return batch["prompt_mask"]
        if self.kl_positions == "response":
            return batch["labels"] != -100
        return batch["attention_mask"]

    def _halves(self, reps: dict, ref: torch.Tensor, n: int) -> tuple[dict, dict, dict, dict]:
        """This rank's (harmful, harmless, reference harmful, reference harmless) layer -> [n, D] states."""
        return ({layer: r[:n] for layer, r in reps.items()}, {layer: r[n:] for layer, r in reps.items()},
                {layer: ref[:n, i] for i, layer in enumerate(self.layers)},
                {layer: ref[n:, i] for i, layer in enumerate(self.layers)})

    def _pairs(self, harmful: dict) -> torch.Tensor | None:
        """For distance `pairwise`: pair i of the global batch is (harmful i, harmless i)."""
        if self.loss_fn.distance != "pairwise":
            return None
        rows = next(iter(harmful.values()))
        index = torch.arange(rows.shape[0], device=rows.device)
        return torch.stack([index, index], dim=1)

    def _token_sums(self, model, batch: dict, outputs, n: int) -> dict[str, TokenSum]:
        """The token terms of a (sub-)batch, for both training paths: the KL leash on the harmless half (its
        reference pass runs only when the KL is weighted) and the cross-entropy of the harmful half's targets,
        each a (sum, count) added over ranks."""
        sums = {}
        if self.loss_fn.kl_weight > 0:
            with self.reference(model) as reference:
                ref_logits = reference(**lm_inputs(batch, slice(n, None))).logits
            sums["kl"] = all_reduce_sums(*self.loss_fn.kl_sum(outputs.logits[n:], ref_logits,
                                                              self._kl_mask(batch)[n:]))
        if self.loss_fn.refusal_weight > 0:
            sums["refusal"] = all_reduce_sums(*self.loss_fn.refusal_sum(outputs.logits[:n], batch["labels"][:n]))
        return sums

    def _record_terms(self, separation, kl, refusal, diagnostics) -> None:
        self._record({"loss/separation": separation, "loss/kl": kl, "loss/refusal": refusal,
                      **{f"distance/{k}": v for k, v in diagnostics.per_layer_distance.items()},
                      **{f"distance_ref/{k}": v for k, v in diagnostics.per_layer_ref_distance.items()},
                      **{f"hidden_norm/{k}": v for k, v in diagnostics.per_layer_norm.items()}})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["input_ids"].shape[0] // 2
        outputs = self._forward(model, inputs, n)
        reps = pooled(outputs.hidden_states, inputs, self.layers, self.pooling)
        harmful, harmless, ref_harmful, ref_harmless = map(gather_layers, self._halves(reps, inputs["ref_reps"], n))
        token_sums = self._token_sums(model, inputs, outputs, n)
        result = self.loss_fn(harmful, harmless, ref_harmful, ref_harmless, pairs=self._pairs(harmful), **token_sums)
        self._record_terms(result.separation, result.kl, result.refusal, result)
        return (result.loss, outputs) if return_outputs else result.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With `micro_batches` > 1, accumulate gradients over sub-batches so the result equals one pass over the
        whole batch even for batch-statistic distances (centroid, fisher), GradCache-style:
        1. pool every sub-batch's representations without a graph;
        2. compute the separation once on all of them (as leaves) and keep d(separation)/d(representations);
        3. re-run each sub-batch with a graph and backpropagate those gradients plus its share of the
           per-sequence KL / refusal terms (a mean of per-sequence values, so additive over equal sub-batches).
        Costs one extra forward without a graph per step; memory is that of one sub-batch.
        """
        if self.micro_batches == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        chunks = split_batch(inputs, self.micro_batches)
        halves = [c["input_ids"].shape[0] // 2 for c in chunks]
        with torch.no_grad():
            parts = [self._halves(pooled(self._forward(model, c, n).hidden_states, c, self.layers, self.pooling),
                                  c["ref_reps"], n) for c, n in zip(chunks, halves)]
        leaves_h, leaves_s, ref_h, ref_s = ({layer: torch.cat([p[k][layer] for p in parts]) for layer in self.layers}
                                            for k in range(4))
        for leaves in (leaves_h, leaves_s):
            for reps in leaves.values():
                reps.requires_grad_()
        harmful = gather_layers(leaves_h)
        separation = self.loss_fn.separation(harmful, gather_layers(leaves_s), gather_layers(ref_h),
                                             gather_layers(ref_s), pairs=self._pairs(harmful))
        weight = self.loss_fn.separation_weight
        grads = torch.autograd.grad(weight * separation.term, [*leaves_h.values(), *leaves_s.values()],
                                    allow_unused=True)
        grad_h = dict(zip(self.layers, grads[:len(self.layers)]))
        grad_s = dict(zip(self.layers, grads[len(self.layers):]))
        total = separation.term.detach() * weight
        kl_sum = refusal_sum = 0.0
        start = 0
        for i, (chunk, n) in enumerate(zip(chunks, halves)):
            sync = self.accelerator.no_sync(model) if i < len(chunks) - 1 else nullcontext()
            with sync, self.compute_loss_context_manager():
                out = self._forward(model, chunk, n)
                reps = pooled(out.hidden_states, chunk, self.layers, self.pooling)
                surrogate = sum((reps[layer][:n] * grad_h[layer][start:start + n]).sum()
                                + (reps[layer][n:] * grad_s[layer][start:start + n]).sum()
                                for layer in self.layers if grad_h[layer] is not None)
                sums = self._token_sums(model, chunk, out, n)
                kl, refusal = self.loss_fn.token_means(sums.get("kl"), sums.get("refusal"), out.logits.new_zeros(()))
                share = (self.loss_fn.kl_weight * kl + self.loss_fn.refusal_weight * refusal) / len(chunks)
                self.accelerator.backward(surrogate + share)
            kl_sum += float(kl.detach()) / len(chunks)
            refusal_sum += float(refusal.detach()) / len(chunks)
            total = total + share.detach()
            start += n
        self._record_terms(separation.term.detach(), kl_sum, refusal_sum, separation)
        return total


class CircuitBreakerTrainer(ReferenceTrainer):
    """Representation rerouting (`circuit_breaker_loss`) with coefficient scale `alpha`. Reference pass: the
    frozen model's hidden states of the whole batch in every step. It takes the whole accumulated batch in one
    pass (`train.grad_accum` saves memory only under `ES2Trainer`)."""

    def __init__(self, *args, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["input_ids"].shape[0] // 2
        outputs = model(**lm_inputs(inputs), output_hidden_states=True)
        with self.reference(model) as reference:
            ref_states = reference(**lm_inputs(inputs), output_hidden_states=True).hidden_states
        states, mask = outputs.hidden_states, inputs["attention_mask"]
        progress = self.state.global_step / max(1, self.state.max_steps)
        result = circuit_breaker_loss(
            {layer: states[layer][:n] for layer in self.layers}, {layer: ref_states[layer][:n] for layer in self.layers},
            mask[:n], {layer: states[layer][n:] for layer in self.layers},
            {layer: ref_states[layer][n:] for layer in self.layers}, mask[n:], progress, self.alpha)
        self._record({"loss/reroute": result.reroute, "loss/retain": result.retain})
        return (result.loss, outputs) if return_outputs else result.loss
