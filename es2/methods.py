"""The training methods, each defined once: its trainer and loss terms, the data it trains on and the reference
passes it needs. `train.method` names an entry of `METHODS` (tests/test_methods.py keeps the names params accept
equal to its keys); the rest of es2 reads the entry's fields and never compares method names.

| method | loss (trainer) | separation | cross-entropy on the harmful rows' targets | harmful rows |
|---|---|---|---|---|
| es2 | ES2Loss (ES2Trainer) | trained | none | prompt only |
| es2_refusal | ES2Loss (ES2Trainer) | trained | refusal, train.refusal_weight | prompt + refusal |
| refusal_sft | ES2Loss (ES2Trainer) | logged | refusal, train.refusal_weight | prompt + refusal |
| es2_adversarial | ES2Loss (ES2Trainer), a share of the harmful rows refusal-direction ablated | trained | refusal, train.refusal_weight | prompt + refusal |
| circuit_breakers | circuit_breaker_loss (CircuitBreakerTrainer) | - | - | prompt + affirmative target |
| es2_trajectory | ES2Loss (ES2Trainer) | trained | recovery, train.recovery_weight | trajectory with an injected span |
| trajectory | ES2Loss (ES2Trainer) | logged | recovery, train.recovery_weight | trajectory with an injected span |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from es2.ablation import refusal_directions
from es2.features import refusal_for
from es2.losses.es2_loss import ES2Loss
from es2.trainer import CircuitBreakerTrainer, ES2Trainer, frozen_view, precompute_reference


def refusal_target(row: dict) -> str:
    """A refusal, chosen from the harmful record's id."""
    return refusal_for(row["harmful_id"])


def affirmative_target(row: dict) -> str:
    """The record's affirmative prefix (the states circuit breakers reroute), or a generic one."""
    return row.get("target") or "Sure, here is how to do that."


@dataclass(frozen=True)
class SeparationMethod:
    """An `ES2Loss` under `ES2Trainer`. Reference passes: the frozen model's pooled states of the training pairs,
    once before training (the calibration and rel_hinge's reference distance), and its logits on the harmless
    half in every step (the KL leash)."""

    separation_weight: float  # 1 trains the separation; 0 only logs it
    target_weight: str | None = None  # the train.* weight of the cross-entropy on the harmful rows' targets
    harmful_target: Callable[[dict], str] | None = None  # what follows a harmful prompt in the pairs
    trajectories: bool = False  # trains on generated trajectories with injected spans (es2.trajectories)
    adversarial: bool = False  # attacks the harmful rows in every step (refusal-direction ablation, es2.ablation)

    def loss(self, cfg, calibration: dict) -> ES2Loss:
        return ES2Loss(distance=cfg.distance, form=cfg.form, margin=cfg.margin, margin_ratio=cfg.margin_ratio,
                       normalize=cfg.normalize, calibration=calibration, kl_weight=cfg.kl_weight,
                       kl_direction=cfg.kl_direction, kl_temperature=cfg.kl_temperature,
                       refusal_weight=getattr(cfg, self.target_weight) if self.target_weight else 0.0,
                       reduction=cfg.reduction, separation_weight=self.separation_weight)

    def trainer(self, cfg, model, ref_model, features: list[dict], pad_token_id: int, **trainer_args) -> ES2Trainer:
        """The trainer of `model` (LoRA-wrapped, or beside its frozen copy `ref_model`) on `features`."""
        with frozen_view(model, ref_model) as frozen:
            calibration = precompute_reference(frozen, features, cfg.layers, cfg.pooling, pad_token_id,
                                               normalize=cfg.normalize)
            ablation = refusal_directions(frozen, features, pad_token_id) if self.adversarial else None
        return ES2Trainer(model=model, train_dataset=features, loss_fn=self.loss(cfg, calibration),
                          layers=cfg.layers, pooling=cfg.pooling, kl_positions=cfg.kl_positions, ref_model=ref_model,
                          micro_batches=cfg.grad_accum, ablation=ablation, ablation_share=cfg.adversarial_share,
                          **trainer_args)


@dataclass(frozen=True)
class ReroutingMethod:
    """`circuit_breaker_loss` under `CircuitBreakerTrainer`, on harmful prompts followed by an affirmative target.
    Reference pass: the frozen model's hidden states of the whole batch in every step (nothing precomputed)."""

    harmful_target: Callable[[dict], str] = affirmative_target
    trajectories: bool = False

    def trainer(self, cfg, model, ref_model, features: list[dict], pad_token_id: int,
                **trainer_args) -> CircuitBreakerTrainer:
        """The trainer of `model` (LoRA-wrapped, or beside its frozen copy `ref_model`) on `features`."""
        return CircuitBreakerTrainer(model=model, train_dataset=features, alpha=cfg.cb_alpha, layers=cfg.layers,
                                     ref_model=ref_model, **trainer_args)


METHODS: dict[str, SeparationMethod | ReroutingMethod] = {
    "es2": SeparationMethod(separation_weight=1.0),
    "es2_refusal": SeparationMethod(1.0, "refusal_weight", refusal_target),
    "refusal_sft": SeparationMethod(0.0, "refusal_weight", refusal_target),
    "es2_adversarial": SeparationMethod(1.0, "refusal_weight", refusal_target, adversarial=True),
    "circuit_breakers": ReroutingMethod(),
    "es2_trajectory": SeparationMethod(1.0, "recovery_weight", trajectories=True),
    "trajectory": SeparationMethod(0.0, "recovery_weight", trajectories=True),
}
