"""Representation geometry of collated [harmful; harmless] batches: the pooled states the trainer and the held-out
metrics share, scale-free separation (d'), hidden norms, and KL to a reference.

d' = ||mu_H - mu_S|| / sqrt((tr Sigma_H + tr Sigma_S) / 2) on raw (un-normalised) states: a model cannot raise it
by inflating norms, unlike a raw distance. It is the loss's ``centroid`` distance, here on one process's states
(evaluation runs on rank 0 alone).
"""

from __future__ import annotations

import torch

from es2.attacks.hooks import hidden_states_at
from es2.features import collate, lm_inputs
from es2.losses.distances import centroid_distance
from es2.losses.representations import pool
from es2.losses.tokens import kl_divergence


def pooled(hidden_states, batch: dict, layers: list[int], how: str) -> dict[int, torch.Tensor]:
    """layer -> [rows, D]: the last prompt token (`last`), the mean over the user message (`mean`), or the mean
    over the last prompt token and the answer positions before the labelled target (`response`): a trajectory's
    own tokens and injected span, the states an injection or a prefill leaves the model in. A row with no
    such prefix pools to its last prompt token."""
    if how == "last":
        rows = torch.arange(len(batch["rep_index"]), device=batch["rep_index"].device)
        return {layer: hidden_states[layer][rows, batch["rep_index"]] for layer in layers}
    mask = batch["span_mask"]
    if how == "response":
        columns = torch.arange(batch["labels"].shape[1], device=batch["labels"].device)
        mask = (columns >= batch["rep_index"][:, None]) & (batch["labels"] == -100)
    return {layer: pool(hidden_states[layer], batch["attention_mask"], "mean", mask) for layer in layers}


@torch.no_grad()
def states_and_kl(model, features: list[dict], layers: list[int], pooling: str, pad_token_id: int,
                  reference=None, batch_size: int = 16) -> dict:
    """Pooled states {layer: (harmful [n, D], harmless [n, D])}; with `reference` (a context manager yielding
    the frozen model) also the mean per-token KL(reference || model) over harmless prompt tokens."""
    model.eval()
    harmful, harmless = {layer: [] for layer in layers}, {layer: [] for layer in layers}
    kl_total, kl_tokens = 0.0, 0.0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size], pad_token_id)
        n = batch["input_ids"].shape[0] // 2
        if reference is None:  # states alone: the forward stops at the deepest layer
            out, hidden = None, hidden_states_at(model, lm_inputs(batch), layers)
        else:
            out = model(**lm_inputs(batch), output_hidden_states=True)
            hidden = out.hidden_states
        for layer, reps in pooled(hidden, batch, layers, pooling).items():
            harmful[layer].append(reps[:n].float())
            harmless[layer].append(reps[n:].float())
        if out is not None:
            with reference() as ref_model:
                ref_logits = ref_model(**lm_inputs(batch, slice(n, None))).logits
            total, count = kl_divergence(out.logits[n:], ref_logits, batch["prompt_mask"][n:], reduction="sum")
            kl_total, kl_tokens = kl_total + float(total), kl_tokens + float(count)
    states = {layer: (torch.cat(harmful[layer]), torch.cat(harmless[layer])) for layer in layers}
    return {"states": states, "kl": kl_total / max(kl_tokens, 1.0) if reference is not None else None}


def dprime(harmful: torch.Tensor, harmless: torch.Tensor) -> float:
    """d' of one layer."""
    return float(centroid_distance(harmful, harmless))


def separation_summary(states: dict) -> dict[str, float]:
    """Per layer: d' and the mean hidden norm; plus their means over layers."""
    out = {}
    for layer, (h, s) in states.items():
        out[f"dprime/{layer}"] = dprime(h, s)
        out[f"hidden_norm/{layer}"] = float(torch.cat([h, s]).norm(dim=-1).mean())
    layers = list(states)
    out["dprime/mean"] = sum(out[f"dprime/{layer}"] for layer in layers) / len(layers)
    out["hidden_norm/mean"] = sum(out[f"hidden_norm/{layer}"] for layer in layers) / len(layers)
    return out
