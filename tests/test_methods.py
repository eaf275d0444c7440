"""The training-method table: the names params accept are its keys, and each entry keeps the loss terms and
data its method had when the names were compared across the code."""

from typing import get_args

import pytest

from es2.config import TrainParams, load_params
from es2.features import refusal_for
from es2.methods import METHODS, ReroutingMethod
from tests.conftest import REPO


def test_params_accept_exactly_the_methods_of_the_table():
    assert sorted(get_args(TrainParams.model_fields["method"].annotation)) == sorted(METHODS)


ROW = {"harmful_id": "h7", "target": "Sure, here is how to"}
# method: (separation weight, cross-entropy weight, what follows the harmful prompt, trains on trajectories)
EXPECTED = {
    "es2": (1.0, 0.0, None, False),
    "es2_refusal": (1.0, 0.25, refusal_for("h7"), False),
    "refusal_sft": (0.0, 0.25, refusal_for("h7"), False),
    "es2_trajectory": (1.0, 0.75, None, True),
    "trajectory": (0.0, 0.75, None, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_separation_methods_loss_terms_and_data(name):
    cfg = load_params(REPO / "params.yaml", ("train.refusal_weight=0.25", "train.recovery_weight=0.75")).train
    method = METHODS[name]
    loss = method.loss(cfg, calibration={})
    target = method.harmful_target(ROW) if method.harmful_target else None
    assert (loss.separation_weight, loss.refusal_weight, target, method.trajectories) == EXPECTED[name]
    assert (loss.kl_weight, loss.distance, loss.form) == (cfg.kl_weight, cfg.distance, cfg.form)


def test_circuit_breakers_reroute_the_affirmative_target():
    method = METHODS["circuit_breakers"]
    assert isinstance(method, ReroutingMethod) and not method.trajectories
    assert method.harmful_target(ROW) == "Sure, here is how to"
    assert method.harmful_target({"harmful_id": "h7"}) == "Sure, here is how to do that."
