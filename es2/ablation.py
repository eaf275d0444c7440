"""Refusal-direction ablation inside the training step: the adversary of the `es2_adversarial` method.

Embedding-space attacks (SCAV, RepE steering) break a model by moving a harmful prompt's states along the
direction that separates harmful from harmless prompts. ReFAT (Yu et al. 2024) trains against the strongest such
move, deleting that direction from every decoder layer's output, and asks the model to refuse anyway; CRL and LAT
add similar in-loop perturbations. Here the ablated harmful rows also take part in the separation loss, so ES2 must
keep them apart from the harmless rows without the direction the attacks exploit.

Directions are fixed before training from the frozen model (the difference of the class means of the last
prompt token's states, per decoder layer), as ReFAT recomputes them only now and then; the ablation is linear,
so gradients flow through it to the LoRA weights of every earlier layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from es2.attacks.hooks import hooked, num_layers
from es2.features import collate, lm_inputs
from es2.geometry import pooled


@torch.no_grad()
def refusal_directions(model, features: list[dict], pad_token_id: int, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """hidden_states index l (1..L-1, the decoder blocks' outputs) -> unit mean(harmful) - mean(harmless) of the
    last prompt token's state over the training pairs. Pass the frozen model (`es2.trainer.frozen_view`)."""
    model.eval()
    layers = list(range(1, num_layers(model)))
    sums = {layer: [0.0, 0.0] for layer in layers}
    count = 0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size], pad_token_id)
        n = batch["input_ids"].shape[0] // 2
        states = pooled(model(**lm_inputs(batch), output_hidden_states=True).hidden_states, batch, layers, "last")
        for layer, reps in states.items():
            sums[layer][0] = sums[layer][0] + reps[:n].double().sum(0)
            sums[layer][1] = sums[layer][1] + reps[n:].double().sum(0)
        count += n
    directions = {}
    for layer, (harmful, harmless) in sums.items():
        gap = (harmful - harmless) / count
        directions[layer] = (gap / gap.norm()).float()
    return directions


def ablate(states: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """`states` [..., D] without their component along the unit `direction` [D]: h - (h . d) d."""
    d = direction.to(states.device, states.dtype)
    return states - (states @ d).unsqueeze(-1) * d


@contextmanager
def ablating(model, directions: dict[int, torch.Tensor], rows: int):
    """Within the block, the first `rows` rows of every forward batch (the harmful rows of a collated batch
    that the step attacks) lose their component along `directions[l]` at every position of layer l's output;
    the other rows pass unchanged. `rows` 0 leaves the model untouched."""
    if rows == 0:
        yield
        return

    def edit(direction):
        return lambda h: torch.cat([ablate(h[:rows], direction), h[rows:]])

    with hooked(model, {layer: edit(d) for layer, d in directions.items()}):
        yield
