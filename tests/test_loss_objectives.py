"""The losses a training step minimises, on hand-worked tensors (the maths in the docstring, then
assert_close): ES2Loss (its weighted terms, the rel_hinge form, robustness to inflated norms, the calibrated
probe direction, its errors), its per-example formulation that makes gradient accumulation exact, and the
circuit-breaker loss. Uses the running example of tests/loss_support.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from es2.losses.circuit_breakers import circuit_breaker_loss
from es2.losses.es2_loss import ES2Loss
from es2.losses.representations import calibrate
from es2.losses.tokens import causal_lm_loss
from tests.loss_support import _seed, sets_fixture  # noqa: F401 - fixtures: importing them applies them here


# ------------------------------------------------------------------------------------------------------------
# The full loss


class TestES2Loss:
    def test_total_is_weighted_sum_of_terms(self, sets):
        """Layer 1 holds (H, S): D_1 = sqrt(5). Layer 3 holds (2H, S): mu = (4, 0), tr Sigma = 4, so
        D_3 = ||(4, -1)|| / sqrt((4 + 1) / 2) = sqrt(17 / 2.5) = sqrt(6.8). Weights 1 and 3, form neg:
        separation = -(sqrt(5) + 3 sqrt(6.8)) / 4. KL (position 0 of test_loss_terms.py's TestKL)
        = 1/2 ln(9/8), refusal CE = ln 3. loss = separation + 0.5 KL + 2 CE."""
        harmful, harmless = sets
        loss_fn = ES2Loss(form="neg", normalize="none", layer_weights={1: 1.0, 3: 3.0}, kl_weight=0.5,
                          refusal_weight=2.0)
        ref = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)]]])
        out = loss_fn({1: harmful, 3: 2 * harmful}, {1: harmless, 3: harmless},
                      kl=loss_fn.kl_sum(torch.zeros(1, 1, 3), ref, torch.ones(1, 1)),
                      refusal=loss_fn.refusal_sum(torch.zeros(1, 2, 3), torch.tensor([[-100, 1]])))
        separation = -(math.sqrt(5) + 3 * math.sqrt(6.8)) / 4
        assert_close(out.per_layer_distance, {1: torch.tensor(math.sqrt(5)), 3: torch.tensor(math.sqrt(6.8))})
        assert_close(out.separation, torch.tensor(separation))
        assert_close(out.kl, torch.tensor(0.5 * math.log(9 / 8)))
        assert_close(out.refusal, torch.tensor(math.log(3)))
        assert_close(out.loss, torch.tensor(separation + 0.25 * math.log(9 / 8) + 2 * math.log(3)))
        assert out.per_layer_ref_distance == {}
        # mean raw norm of layer 1: (1 + 3 + 0 + 2) / 4
        assert_close(out.per_layer_norm[1], torch.tensor(1.5))

    def test_rel_hinge_zero_once_distance_reaches_ratio_times_reference(self):
        """Current: H = (1, 3), S = (-1, 1) on the first axis: gap 2, spreads 1 -> D = 2. Reference:
        H = (0, 2): gap 1 -> D_ref = 1. Ratio 2: relu(2 - 2) = 0, no gradient. Ratio 3: relu(3 - 2) = 1."""
        harmful = torch.tensor([[1.0, 0.0], [3.0, 0.0]], requires_grad=True)
        harmless = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
        ref_harmful = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
        for ratio, expected in ((2.0, 0.0), (3.0, 1.0)):
            out = ES2Loss(margin_ratio=ratio, normalize="none", kl_weight=0.0)(
                {4: harmful}, {4: harmless}, {4: ref_harmful}, {4: harmless})
            assert_close(out.per_layer_ref_distance[4], torch.tensor(1.0))
            assert_close(out.loss, torch.tensor(expected))
            harmful.grad = None
            out.loss.backward()
            assert (harmful.grad.abs().sum() > 0) == (expected > 0)

    def test_default_is_not_fooled_by_inflated_norms(self):
        """The default loss (centroid, rel_hinge, centred) does not move when the current representations
        are scaled 10x (the per-layer norm, logged, does); a raw pairwise loss would call that a 10x
        separation."""
        harmful, harmless = torch.randn(6, 8) + 0.5, torch.randn(6, 8)
        cal = {2: calibrate(harmful, harmless)}
        loss_fn = ES2Loss(calibration=cal, kl_weight=0.0)
        base = loss_fn({2: harmful}, {2: harmless}, {2: harmful}, {2: harmless})
        inflated = loss_fn({2: 10 * harmful}, {2: 10 * harmless}, {2: harmful}, {2: harmless})
        assert_close(inflated.per_layer_distance, base.per_layer_distance)
        assert_close(inflated.loss, base.loss)
        assert_close(inflated.per_layer_norm[2], 10 * base.per_layer_norm[2])

    def test_probe_margin_uses_the_calibrated_direction(self, sets):
        """Calibration with normalize none: direction = unit(mu_H - mu_S) = (2, -1) / sqrt(5);
        margin = (2, -1).(2, -1) / sqrt(5) = sqrt(5)."""
        harmful, harmless = sets
        cal = {0: calibrate(harmful, harmless, "none")}
        out = ES2Loss("probe_margin", "neg", normalize="none", calibration=cal, kl_weight=0.0)(
            {0: harmful}, {0: harmless})
        assert_close(out.per_layer_distance[0], torch.tensor(math.sqrt(5)))

    def test_missing_inputs_raise(self, sets):
        harmful, harmless = sets
        with pytest.raises(ValueError, match="calibration"):
            ES2Loss(kl_weight=0.0)({1: harmful}, {1: harmless}, {1: harmful}, {1: harmless})
        with pytest.raises(ValueError, match="rel_hinge"):
            ES2Loss(normalize="none", kl_weight=0.0)({1: harmful}, {1: harmless})
        with pytest.raises(ValueError, match="kl_weight"):
            ES2Loss(form="neg", normalize="none")({1: harmful}, {1: harmless})
        with pytest.raises(ValueError, match="refusal_weight"):
            ES2Loss(form="neg", normalize="none", kl_weight=0.0, refusal_weight=1.0)({1: harmful}, {1: harmless})
        with pytest.raises(ValueError, match="same, non-empty layers"):
            ES2Loss(form="neg", normalize="none", kl_weight=0.0)({1: harmful}, {2: harmless})
        with pytest.raises(ValueError, match="not one of"):
            ES2Loss(form="log")


# ------------------------------------------------------------------------------------------------------------
# Per-example formulation: exact gradient accumulation


def test_pairwise_form_applies_per_pair():
    """Pairs (h0,s0) at distance 3 and (h1,s1) at distance 1, reference distances 1 and 1, rho 2:
    per pair relu(2 - 3) = 0 and relu(2 - 1) = 1, mean 0.5 (a batch-mean hinge would give relu(2 - 2) = 0)."""
    h = {1: torch.tensor([[3.0, 0.0], [1.0, 0.0]])}
    s = {1: torch.zeros(2, 2)}
    ref_h = {1: torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    loss = ES2Loss(distance="pairwise", form="rel_hinge", margin_ratio=2.0, normalize="none", kl_weight=0.0)
    out = loss(h, s, ref_h, {1: torch.zeros(2, 2)}, pairs=torch.tensor([[0, 0], [1, 1]]))
    assert out.separation.item() == pytest.approx(0.5)
    assert out.per_layer_distance[1].item() == pytest.approx(2.0)


def test_sequence_reduction_is_the_mean_of_per_sequence_token_means():
    """Row 0: one token with CE ln 2 (uniform over 2 classes); row 1: two tokens, CE 0-ish and ln 2 -> mean ln2/2.
    Token mean = (ln2 + ln2) / 3; sequence mean = (ln2 + ln2/2) / 2."""
    big = 30.0
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                           [[big, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, -100, 1], [-100, 0, 1]])
    total, count = causal_lm_loss(logits, labels, reduction="sequence")
    assert count.item() == 2
    assert (total / count).item() == pytest.approx((math.log(2) + math.log(2) / 2) / 2, abs=1e-6)
    assert causal_lm_loss(logits, labels).item() == pytest.approx(2 * math.log(2) / 3, abs=1e-6)


def test_per_example_loss_is_additive_over_micro_batches():
    """With pairwise pairs and sequence reduction, the loss of 4 pairs equals the mean of two halves' losses,
    so gradient accumulation (4 x 1 == 2 x 2) is exact."""
    torch.manual_seed(0)
    h, s = torch.randn(4, 3), torch.randn(4, 3)
    rh, rs = torch.randn(4, 3), torch.randn(4, 3)
    logits, ref_logits = torch.randn(4, 5, 7), torch.randn(4, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    loss = ES2Loss(distance="pairwise", form="rel_hinge", margin_ratio=3.0, normalize="none", kl_weight=0.5,
                   reduction="sequence")

    def run(rows):
        idx = torch.arange(len(rows))
        return loss({1: h[rows]}, {1: s[rows]}, {1: rh[rows]}, {1: rs[rows]},
                    kl=loss.kl_sum(logits[rows], ref_logits[rows], mask[rows]), pairs=torch.stack([idx, idx], 1)).loss

    whole = run(torch.arange(4))
    halves = (run(torch.arange(2)) + run(torch.arange(2, 4))) / 2
    assert whole.item() == pytest.approx(halves.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Circuit breakers


def test_circuit_breaker_loss_by_hand():
    """Layer 1, harmful (one sequence, two tokens): states (3, 4) and (0, 1) against reference (1, 0) twice:
    cosines 0.6 and 0, reroute 0.3. Harmless (two sequences) against a zero reference: row 0 keeps one token of
    norm 5, row 1 two tokens of norms 1 and 3 (mean 2): retain is the mean of sequence means, (5 + 2) / 2 = 3.5
    (a token mean would give 3). Layer 2 doubles every state: cosines unchanged, norms doubled, so over layers
    reroute = 0.3 and retain = (3.5 + 7) / 2 = 5.25. alpha 2 at progress 1/2: c_rr = 2 (1 - 1/4) = 1.5,
    c_retain = 2 / 4 = 0.5, loss = 0.45 + 2.625."""
    harmful = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]], requires_grad=True)
    ref_harmful = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    harmless = torch.tensor([[[3.0, 4.0], [9.0, 9.0]], [[1.0, 0.0], [0.0, 3.0]]])
    out = circuit_breaker_loss({1: harmful, 2: 2 * harmful}, {1: ref_harmful, 2: 2 * ref_harmful}, torch.ones(1, 2),
                               {1: harmless, 2: 2 * harmless}, {1: torch.zeros(2, 2, 2), 2: torch.zeros(2, 2, 2)},
                               torch.tensor([[1, 0], [1, 1]]), progress=0.5, alpha=2.0)
    assert_close((out.reroute, out.retain), (torch.tensor(0.3), torch.tensor(5.25)))
    assert_close(out.loss, torch.tensor(3.075))
    out.loss.backward()
    assert harmful.grad.abs().sum() > 0 and ref_harmful.grad is None
