"""The ES2 trainer, in TRL's shape: a `transformers.Trainer` whose `compute_loss` runs one concatenated forward
over [harmful; harmless] with hidden states, a reference pass with the LoRA adapter disabled (no second model
copy; a frozen copy only for full fine-tuning), and the pure loss of `es2.loss`. Named intermediates are
collected per step and averaged in `log`, which the Trainer only prints on rank 0.

Distributed runs and checkpoint/resume come from the Trainer and accelerate. Invariances this relies on:
- the default loss is a mean of per-pair terms (pairwise distance, per-sequence KL), and the ES2 loss gathers
  batch statistics across ranks, so N processes with B/N pairs equal 1 process with B, and gradient
  accumulation equals one larger batch;
- reference representations (for rel_hinge and the calibration) are fixed, so they are computed once before
  training (`precompute_reference`) instead of in every step; the per-step reference pass only produces the
  harmless logits for the KL term (or the full states, for circuit breakers).
"""

from __future__ import annotations

from collections import defaultdict
import copy
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from es2.features import collate, lm_inputs
from es2.loss import ES2Loss, calibrate, circuit_breaker_loss, pool


def pooled(hidden_states, batch: dict, layers: list[int], how: str) -> dict[int, torch.Tensor]:
    """layer -> [rows, D]: the last prompt token (`last`) or the mean over the user message (`mean`)."""
    if how == "last":
        rows = torch.arange(len(batch["rep_index"]), device=batch["rep_index"].device)
        return {layer: hidden_states[layer][rows, batch["rep_index"]] for layer in layers}
    return {layer: pool(hidden_states[layer], batch["attention_mask"], "mean", batch["span_mask"])
            for layer in layers}


@torch.no_grad()
def precompute_reference(model, features: list[dict], layers: list[int], pooling: str, pad_token_id: int,
                         batch_size: int = 16, normalize: str = "unit") -> dict:
    """Attach the reference model's pooled states (`ref_reps`, [L, D]) to every sequence of every feature and
    return the per-layer calibration (centre, scale, probe direction) computed from them.

    Call it before the adapter is attached (or with it disabled): these are the frozen model's representations.
    """
    model.eval()
    for start in tqdm(range(0, len(features), batch_size), desc="reference states", leave=False):
        chunk = features[start:start + batch_size]
        batch = collate(chunk, pad_token_id)
        out = model(**lm_inputs(batch), output_hidden_states=True)
        reps = torch.stack(list(pooled(out.hidden_states, batch, layers, pooling).values()), dim=1).float()
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


class ES2Trainer(Trainer):
    """Trainer for `es2`, `es2_refusal`, `refusal_sft` (an `ES2Loss` with separation weight 0) and
    `circuit_breakers`. Batches come from `features.collate`: rows [:B] harmful, [B:] harmless."""

    def __init__(self, *args, loss_fn: ES2Loss, method: str, layers: list[int], pooling: str,
                 kl_positions: str = "prompt", cb_alpha: float = 10.0, ref_model=None, micro_batches: int = 1,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches = micro_batches
        # the separation part of the loss alone, for the sub-batch path of training_step
        self.separation_only = copy.copy(loss_fn)
        self.separation_only.kl_weight = self.separation_only.refusal_weight = 0.0
        # Our loss is a per-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_fn, self.method, self.layers, self.pooling = loss_fn, method, layers, pooling
        self.kl_positions, self.cb_alpha, self.ref_model = kl_positions, cb_alpha, ref_model
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def reference(self, model):
        """The frozen model: a separate copy for full fine-tuning, else the same weights with LoRA disabled
        (called unwrapped, outside DDP, since it takes no gradient)."""
        return frozen_view(self.accelerator.unwrap_model(model), self.ref_model)

    def _kl_mask(self, batch: dict) -> torch.Tensor:
        if self.kl_positions == "prompt":
            return batch["prompt_mask"]
        if self.kl_positions == "response":
            return batch["labels"] != -100
        return batch["attention_mask"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = inputs["input_ids"].shape[0] // 2
        outputs = model(**lm_inputs(inputs), output_hidden_states=True)
        if self.method == "circuit_breakers":
            loss = self._circuit_breaker_loss(model, inputs, outputs, n)
        else:
            loss = self._es2_loss(model, inputs, outputs, n)
        return (loss, outputs) if return_outputs else loss

    def _es2_loss(self, model, inputs, outputs, n):
        reps = pooled(outputs.hidden_states, inputs, self.layers, self.pooling)
        ref = inputs["ref_reps"]
        kwargs = {}
        if self.loss_fn.kl_weight > 0:
            with self.reference(model) as reference:
                ref_logits = reference(**lm_inputs(inputs, slice(n, None))).logits
            kwargs.update(logits=outputs.logits[n:], ref_logits=ref_logits, kl_mask=self._kl_mask(inputs)[n:])
        if self.loss_fn.refusal_weight > 0:
            kwargs.update(refusal_logits=outputs.logits[:n], refusal_labels=inputs["labels"][:n])
        if self.loss_fn.distance == "pairwise":
            index = torch.arange(n, device=ref.device)
            kwargs["pairs"] = torch.stack([index, index], dim=1)
        result = self.loss_fn(
            {layer: r[:n] for layer, r in reps.items()}, {layer: r[n:] for layer, r in reps.items()},
            {layer: ref[:n, i] for i, layer in enumerate(self.layers)},
            {layer: ref[n:, i] for i, layer in enumerate(self.layers)}, **kwargs)
        self._record({"loss/separation": result.separation, "loss/kl": result.kl, "loss/refusal": result.refusal,
                      **{f"distance/{k}": v for k, v in result.per_layer_distance.items()},
                      **{f"distance_ref/{k}": v for k, v in result.per_layer_ref_distance.items()},
                      **{f"hidden_norm/{k}": v for k, v in result.per_layer_norm.items()}})
        return result.loss

    def _circuit_breaker_loss(self, model, inputs, outputs, n):
        with self.reference(model) as reference:
            ref_states = reference(**lm_inputs(inputs), output_hidden_states=True).hidden_states
        states, mask = outputs.hidden_states, inputs["attention_mask"]
        progress = self.state.global_step / max(1, self.state.max_steps)
        result = circuit_breaker_loss(
            {layer: states[layer][:n] for layer in self.layers}, {layer: ref_states[layer][:n] for layer in self.layers},
            mask[:n], {layer: states[layer][n:] for layer in self.layers},
            {layer: ref_states[layer][n:] for layer in self.layers}, mask[n:], progress, self.cb_alpha)
        self._record({"loss/reroute": result.reroute, "loss/retain": result.retain})
        return result.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With `micro_batches` > 1, accumulate gradients over sub-batches so the result equals one pass over the
        whole batch even for batch-statistic distances (centroid, fisher), GradCache-style:
        1. pool every sub-batch's representations without a graph;
        2. compute the separation once on all of them (as leaves) and keep d(separation)/d(representations);
        3. re-run each sub-batch with a graph and backpropagate those gradients plus its share of the
           per-sequence KL / refusal terms (a mean of per-sequence values, so additive over equal sub-batches).
        Costs one extra forward without a graph per step; memory is that of one sub-batch.
        """
        if self.micro_batches == 1 or self.method == "circuit_breakers":
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        chunks = split_batch(inputs, self.micro_batches)
        with torch.no_grad():
            pooled_chunks = [pooled(model(**lm_inputs(c), output_hidden_states=True).hidden_states, c,
                                    self.layers, self.pooling) for c in chunks]
        halves = [c["input_ids"].shape[0] // 2 for c in chunks]
        leaves_h = {layer: torch.cat([p[layer][:n] for p, n in zip(pooled_chunks, halves)]).requires_grad_()
                    for layer in self.layers}
        leaves_s = {layer: torch.cat([p[layer][n:] for p, n in zip(pooled_chunks, halves)]).requires_grad_()
                    for layer in self.layers}
        n_all = sum(halves)
        ref_order = torch.cat([torch.cat([c["ref_reps"][:n] for c, n in zip(chunks, halves)]),
                               torch.cat([c["ref_reps"][n:] for c, n in zip(chunks, halves)])])
        kwargs = {}
        if self.loss_fn.distance == "pairwise":
            index = torch.arange(n_all, device=ref_order.device)
            kwargs["pairs"] = torch.stack([index, index], dim=1)
        separation = self.separation_only(
            leaves_h, leaves_s, {layer: ref_order[:n_all, i] for i, layer in enumerate(self.layers)},
            {layer: ref_order[n_all:, i] for i, layer in enumerate(self.layers)}, **kwargs)
        grads = torch.autograd.grad(self.loss_fn.separation_weight * separation.loss,
                                    [*leaves_h.values(), *leaves_s.values()], allow_unused=True)
        grad_h = dict(zip(self.layers, grads[:len(self.layers)]))
        grad_s = dict(zip(self.layers, grads[len(self.layers):]))
        total = separation.loss.detach() * self.loss_fn.separation_weight
        kl_sum = refusal_sum = 0.0
        start = 0
        for i, (chunk, n) in enumerate(zip(chunks, halves)):
            sync = self.accelerator.no_sync(model) if i < len(chunks) - 1 else nullcontext()
            with sync, self.compute_loss_context_manager():
                out = model(**lm_inputs(chunk), output_hidden_states=True)
                reps = pooled(out.hidden_states, chunk, self.layers, self.pooling)
                surrogate = sum((reps[layer][:n] * grad_h[layer][start:start + n]).sum()
                                + (reps[layer][n:] * grad_s[layer][start:start + n]).sum()
                                for layer in self.layers if grad_h[layer] is not None)
                token_terms = self._token_terms(model, chunk, out, n)
                share = token_terms / len(chunks)
                self.accelerator.backward(surrogate + share)
            kl_sum += float(self._last_terms[0]) / len(chunks)
            refusal_sum += float(self._last_terms[1]) / len(chunks)
            total = total + share.detach()
            start += n
        self._record({"loss/separation": separation.separation, "loss/kl": kl_sum, "loss/refusal": refusal_sum,
                      **{f"distance/{k}": v for k, v in separation.per_layer_distance.items()},
                      **{f"distance_ref/{k}": v for k, v in separation.per_layer_ref_distance.items()},
                      **{f"hidden_norm/{k}": v for k, v in separation.per_layer_norm.items()}})
        return total

    def _token_terms(self, model, batch, outputs, n):
        """kl_weight * KL + refusal_weight * refusal CE for one (sub-)batch, per-sequence means."""
        from es2.loss import causal_lm_loss, global_token_mean, kl_divergence

        kl = refusal = outputs.logits.new_zeros(())
        if self.loss_fn.kl_weight > 0:
            with self.reference(model) as reference:
                ref_logits = reference(**lm_inputs(batch, slice(n, None))).logits
            kl = global_token_mean(*kl_divergence(outputs.logits[n:], ref_logits, self._kl_mask(batch)[n:],
                                                  self.loss_fn.kl_direction, self.loss_fn.kl_temperature,
                                                  reduction=self.loss_fn.reduction))
        if self.loss_fn.refusal_weight > 0:
            refusal = global_token_mean(*causal_lm_loss(outputs.logits[:n], batch["labels"][:n],
                                                        reduction=self.loss_fn.reduction))
        self._last_terms = (kl.detach(), refusal.detach())
        return self.loss_fn.kl_weight * kl + self.loss_fn.refusal_weight * refusal

    def _record(self, values: dict) -> None:
        for key, value in values.items():
            self._metrics[key].append(float(value))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the step metrics collected since the last log, averaged (TRL's pattern)."""
        logs = {**logs, **{key: sum(v) / len(v) for key, v in self._metrics.items() if v}}
        self._metrics.clear()
        super().log(logs, *args, **kwargs)
