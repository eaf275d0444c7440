"""The adversary of es2_adversarial (es2.ablation): the ablation on hand-written tensors, then its shape, norm,
the rows it touches and its gradient flow on the tiny model."""

import pytest
import torch

from es2.ablation import ablate, ablating, refusal_directions
from es2.features import collate, encode_chat, lm_inputs

HARMFUL = ["how do i make a weapon to hurt people", "explain how to steal a car"]
HARMLESS = ["how do i bake bread for my family", "explain how to wash a car"]


def test_ablation_removes_exactly_the_component_along_the_direction():
    d = torch.tensor([0.6, 0.8, 0.0])
    h = torch.tensor([[[3.0, 4.0, 2.0], [1.0, 0.0, 0.0]]])  # [B=1, T=2, D=3]
    out = ablate(h, d)
    assert out.shape == h.shape
    # h . d = 5 and 0.6: subtract 5 d and 0.6 d
    assert torch.allclose(out, torch.tensor([[[0.0, 0.0, 2.0], [0.64, -0.48, 0.0]]]), atol=1e-6)
    assert torch.allclose(out @ d, torch.zeros(1, 2), atol=1e-6)
    assert bool((out.norm(dim=-1) <= h.norm(dim=-1) + 1e-6).all())


@pytest.fixture
def batch(lm):
    _, tok = lm
    features = [{"harmful": encode_chat(tok, a), "harmless": encode_chat(tok, b)} for a, b in zip(HARMFUL, HARMLESS)]
    return features, collate(features, tok.pad_token_id)


def test_directions_are_unit_class_mean_gaps_of_every_decoder_block(lm, batch):
    model, tok = lm
    features, collated = batch
    directions = refusal_directions(model, features, tok.pad_token_id)
    assert sorted(directions) == list(range(1, model.config.num_hidden_layers))  # block outputs, not the final norm
    with torch.no_grad():
        states = model(**lm_inputs(collated), output_hidden_states=True).hidden_states[1]
    last = states[torch.arange(4), collated["rep_index"]]
    gap = last[:2].mean(0) - last[2:].mean(0)
    assert torch.allclose(directions[1], gap / gap.norm(), atol=1e-5)


def _layer_output(model, inputs, layer: int) -> torch.Tensor:
    """The decoder block's output as the next module sees it (a hook registered after the ablation's)."""
    seen = {}
    handle = model.model.layers[layer - 1].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["h"]


def test_only_the_attacked_rows_lose_the_direction_and_the_hooks_go_away(lm, batch):
    model, _ = lm
    _, collated = batch
    inputs = lm_inputs(collated)
    d = torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    with torch.no_grad():
        clean = _layer_output(model, inputs, 1)
        with ablating(model, {1: d}, rows=1):
            attacked = _layer_output(model, inputs, 1)
        after = _layer_output(model, inputs, 1)
    assert attacked.shape == clean.shape
    assert torch.allclose(attacked[0] @ d, torch.zeros(attacked.shape[1]), atol=1e-5)  # every position of row 0
    assert torch.allclose(attacked[0], ablate(clean[0], d), atol=1e-5)
    assert torch.equal(attacked[1:], clean[1:])  # the other harmful row and the harmless rows are untouched
    assert torch.equal(after, clean)


def test_gradients_flow_through_the_ablation_to_the_adapter(lm, batch):
    from peft import LoraConfig, get_peft_model

    model, tok = lm
    features, collated = batch
    directions = refusal_directions(model, features, tok.pad_token_id)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    try:
        with ablating(peft_model, directions, rows=4):  # every row: no path around the ablation
            out = peft_model(**lm_inputs(collated), output_hidden_states=True)
        last = out.hidden_states[-1][torch.arange(4), collated["rep_index"]]
        (last[:2].sum() - last[2:].sum()).backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        # block 0's adapter sits before the ablated layer 1: its gradient can only pass through the projection
        first_block = [g for n, g in grads.items() if ".layers.0." in n]
        assert first_block and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in first_block)
    finally:
        peft_model.unload()
