"""The terms es2.losses builds its losses from, on hand-worked tensors (torchtune style: the maths in the
docstring, then assert_close): pooling, normalisation and calibration, the distances between the harmful and
harmless sets and the separation forms, the KL and causal-LM cross-entropy terms. The distance tests use the
running example of tests/loss_support.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from es2.losses.distances import distance, separation_form
from es2.losses.options import DISTANCES
from es2.losses.representations import calibrate, normalize, pool
from es2.losses.tokens import causal_lm_loss, kl_divergence
from tests.loss_support import _seed, sets_fixture  # noqa: F401 - fixtures: importing them applies them here


# ------------------------------------------------------------------------------------------------------------
# Pooling and normalisation


class TestPool:
    @pytest.fixture
    def hidden(self) -> torch.Tensor:
        """hidden[b, t, 0] = 10 * b + t, so a pooled value names the row and position it came from."""
        return (10 * torch.arange(2.0)[:, None] + torch.arange(4.0)[None, :]).unsqueeze(-1)

    def test_last_right_padding(self, hidden):
        """Right padding: the last real tokens are at t = 2 (row 0) and t = 1 (row 1) -> 2 and 11."""
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        assert_close(pool(hidden, mask, "last"), torch.tensor([[2.0], [11.0]]))

    def test_last_left_padding(self, hidden):
        """Left padding: the last real token is t = 3 in every row -> 3 and 13."""
        mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
        assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0], [13.0]]))

    def test_mean_over_attention_mask(self, hidden):
        """Row 0 averages t = 0..2 -> 1; row 1 (left padded) averages t = 2, 3 -> 12.5."""
        mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
        assert_close(pool(hidden, mask, "mean"), torch.tensor([[1.0], [12.5]]))

    def test_mean_over_span(self, hidden):
        """The span (e.g. user message) is intersected with the mask: row 0 t = 1, 2 -> 1.5; row 1 t = 3
        -> 13."""
        mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
        span = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]])
        assert_close(pool(hidden, mask, "mean", span), torch.tensor([[1.5], [13.0]]))

    def test_empty_rows_raise(self, hidden):
        with pytest.raises(ValueError, match="no real token"):
            pool(hidden, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), "last")
        with pytest.raises(ValueError, match="no token to average"):
            pool(hidden, torch.ones(2, 4), "mean", torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


class TestNormalize:
    def test_modes(self):
        """reps (4, 5), centre (1, 1) -> centred (3, 4); unit (0.6, 0.8); scale (3, 2) -> standardised
        (1, 2)."""
        reps, center, scale = torch.tensor([[4.0, 5.0]]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 2.0])
        assert_close(normalize(reps, "none"), reps)
        assert_close(normalize(reps, "center", center), torch.tensor([[3.0, 4.0]]))
        assert_close(normalize(reps, "unit", center), torch.tensor([[0.6, 0.8]]))
        assert_close(normalize(reps, "standardize", center, scale), torch.tensor([[1.0, 2.0]]))

    def test_needs_the_reference_statistics(self):
        with pytest.raises(ValueError, match="centre"):
            normalize(torch.ones(1, 2), "center")
        with pytest.raises(ValueError, match="scale"):
            normalize(torch.ones(1, 2), "standardize", torch.zeros(2))

    def test_calibrate(self):
        """H = [(2, 0)], S = [(0, 0)]: centre (1, 0); std (1, 0) floored to (1, eps); centred means (1, 0) and
        (-1, 0), so the probe direction is (1, 0)."""
        cal = calibrate(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        assert_close(cal.center, torch.tensor([1.0, 0.0]))
        assert_close(cal.scale, torch.tensor([1.0, 1e-6]))
        assert_close(cal.direction, torch.tensor([1.0, 0.0]))


# ------------------------------------------------------------------------------------------------------------
# Distances and forms


class TestDistances:
    def test_centroid(self, sets):
        """sqrt(5) / sqrt((1 + 1) / 2) = sqrt(5)."""
        assert_close(distance(*sets, "centroid"), torch.tensor(math.sqrt(5)))

    def test_fisher(self, sets):
        """||mu_H - mu_S||^2 / (tr Sigma_H + tr Sigma_S) = 5 / 2."""
        assert_close(distance(*sets, "fisher"), torch.tensor(2.5))

    def test_pairwise_all_pairs(self, sets):
        """(1 + sqrt(5) + 3 + sqrt(13)) / 4."""
        assert_close(distance(*sets, "pairwise"), torch.tensor((4 + math.sqrt(5) + math.sqrt(13)) / 4))

    def test_pairwise_given_pairs(self, sets):
        """Pairs (h1, s2), (h2, s1): (sqrt(5) + 3) / 2."""
        pairs = torch.tensor([[0, 1], [1, 0]])
        assert_close(distance(*sets, "pairwise", pairs=pairs), torch.tensor((math.sqrt(5) + 3) / 2))

    def test_nearest(self, sets):
        """h1's closest harmless point is at 1, h2's at 3 (< sqrt(13)): (1 + 3) / 2 = 2."""
        assert_close(distance(*sets, "nearest"), torch.tensor(2.0))

    def test_probe_margin(self, sets):
        """u = (0.6, 0.8): u.H = (0.6, 1.8), mean 1.2; u.S = (0, 1.6), mean 0.8; margin 0.4."""
        u = torch.tensor([0.6, 0.8])
        assert_close(distance(*sets, "probe_margin", direction=u), torch.tensor(0.4))

    def test_scale_free_default_guards_against_norm_inflation(self):
        """Scaling every representation by 10 leaves centroid (the default) and fisher unchanged, and so does
        shifting them; the unnormalised distances grow 10x, which is the trivial solution they invite."""
        harmful, harmless = torch.randn(6, 5), torch.randn(7, 5) + 1
        for how in ("centroid", "fisher"):
            base = distance(harmful, harmless, how)
            assert_close(distance(10 * harmful, 10 * harmless, how), base)
            assert_close(distance(harmful + 3, harmless + 3, how), base)
        for how in ("pairwise", "nearest"):
            assert_close(distance(10 * harmful, 10 * harmless, how), 10 * distance(harmful, harmless, how))

    @pytest.mark.parametrize("how", DISTANCES)
    def test_gradient_step_on_harmful_increases_distance(self, how):
        """One descent step on the `neg` loss -D, moving only the harmful representations, raises D."""
        harmful, harmless = torch.randn(4, 3).requires_grad_(), torch.randn(5, 3)
        direction = torch.nn.functional.normalize(torch.randn(3), dim=0)
        kwargs = {"direction": direction} if how == "probe_margin" else {}
        before = distance(harmful, harmless, how, **kwargs)
        separation_form(before, "neg").backward()
        with torch.no_grad():
            after = distance(harmful - 0.01 * harmful.grad, harmless, how, **kwargs)
        assert after > before

    def test_bad_options_raise(self, sets):
        with pytest.raises(ValueError, match="not one of"):
            distance(*sets, "cosine")
        with pytest.raises(ValueError, match="direction"):
            distance(*sets, "probe_margin")
        with pytest.raises(ValueError, match="pairs"):
            distance(*sets, "centroid", pairs=torch.tensor([[0, 0]]))


class TestForms:
    def test_neg_and_hinge(self):
        """neg(2) = -2; hinge with margin 3: relu(3 - 2) = 1, relu(3 - 4) = 0."""
        assert_close(separation_form(torch.tensor(2.0), "neg"), torch.tensor(-2.0))
        assert_close(separation_form(torch.tensor(2.0), "hinge", margin=3.0), torch.tensor(1.0))
        assert_close(separation_form(torch.tensor(4.0), "hinge", margin=3.0), torch.tensor(0.0))

    def test_rel_hinge(self):
        """ratio 2, D_ref 1.5: relu(3 - 2) = 1; zero at D = 3 and D = 3.5, with zero gradient; D_ref gets
        none."""
        d_ref = torch.tensor(1.5, requires_grad=True)
        term = separation_form(torch.tensor(2.0), "rel_hinge", d_ref=d_ref, ratio=2.0)
        assert_close(term, torch.tensor(1.0))
        for value in (3.0, 3.5):
            d = torch.tensor(value, requires_grad=True)
            term = separation_form(d, "rel_hinge", d_ref=d_ref, ratio=2.0)
            term.backward()
            assert term.item() == 0.0 and d.grad.item() == 0.0
        assert d_ref.grad is None
        with pytest.raises(ValueError, match="d_ref"):
            separation_form(torch.tensor(1.0), "rel_hinge")


# ------------------------------------------------------------------------------------------------------------
# KL and refusal cross-entropy


class TestKL:
    """Vocabulary of 3, two positions. Position 0: reference p = (1/2, 1/4, 1/4) (logits log p), current
    q uniform (logits 0). Position 1: a pad with wildly different logits, masked out unless said otherwise.
        forward KL(p || q) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8)
        reverse KL(q || p) = 1/3 (ln(2/3) + 2 ln(4/3)) = 1/3 ln(32/27)
    """

    @pytest.fixture
    def logits(self):
        current = torch.tensor([[[0.0, 0.0, 0.0], [100.0, -100.0, 0.0]]], requires_grad=True)
        ref = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 5.0, -5.0]]],
                           requires_grad=True)
        return current, ref

    MASK = torch.tensor([[1, 0]])

    def test_forward_and_reverse(self, logits):
        assert_close(kl_divergence(*logits, self.MASK, "forward"), torch.tensor(0.5 * math.log(9 / 8)))
        assert_close(kl_divergence(*logits, self.MASK, "reverse"), torch.tensor(math.log(32 / 27) / 3))

    def test_pad_positions_contribute_nothing(self, logits):
        """Changing the masked position's logits changes nothing; with the mask off it dominates."""
        current, ref = logits
        other = current.detach().clone()
        other[0, 1] = torch.tensor([-3.0, 7.0, 1.0])
        assert_close(kl_divergence(other, ref, self.MASK), kl_divergence(current, ref, self.MASK))
        assert kl_divergence(current, ref) > 10

    def test_token_mean(self):
        """Two real positions, the second identical in both models (KL 0): mean = 1/2 * 1/2 ln(9/8)."""
        current = torch.zeros(1, 2, 3)
        ref = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)], [0.0, 0.0, 0.0]]])
        assert_close(kl_divergence(current, ref, torch.ones(1, 2)), torch.tensor(0.25 * math.log(9 / 8)))
        total, count = kl_divergence(current, ref, torch.ones(1, 2), reduction="sum")
        assert_close((total, count), (torch.tensor(0.5 * math.log(9 / 8)), torch.tensor(2.0)))

    def test_temperature(self, logits):
        """tau = 2 turns p into p^(1/2) / Z: (sqrt(2) - 1, (2 - sqrt(2)) / 2, (2 - sqrt(2)) / 2); q stays
        uniform. Expected tau^2 * sum_k p_k ln(3 p_k)."""
        p = [math.sqrt(2) - 1, (2 - math.sqrt(2)) / 2, (2 - math.sqrt(2)) / 2]
        expected = 4 * sum(pk * math.log(3 * pk) for pk in p)
        assert_close(kl_divergence(*logits, self.MASK, "forward", temperature=2.0), torch.tensor(expected))

    def test_gradient_reaches_current_only(self, logits):
        current, ref = logits
        kl_divergence(current, ref, self.MASK).backward()
        assert ref.grad is None
        assert current.grad[0, 0].abs().sum() > 0 and current.grad[0, 1].abs().sum() == 0

    def test_causal_lm_loss(self):
        """HF labels: position 0 predicts labels[1] = 2 from uniform logits -> ln 3; position 1 predicts
        labels[2] = 0 from softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4) -> ln 2; position 2's logits are unused.
        Mean (ln 3 + ln 2) / 2."""
        logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [9.0, -9.0, 3.0]]])
        labels = torch.tensor([[-100, 2, 0]])
        assert_close(causal_lm_loss(logits, labels), torch.tensor(math.log(6) / 2))
