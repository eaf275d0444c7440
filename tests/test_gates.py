"""Promotion gates (es2.gates) on hand-built outcomes: the DSR gain counts only when McNemar shows it."""

from __future__ import annotations

import pytest

from es2.config import GateParams, load_params
from es2.gates import Unpaired, decide, dsr_gain_passes, paired_dsr
from es2.stats import mcnemar_exact
from tests.conftest import REPO

T, F = True, False
# only the DSR gain gate, so each test reads one row
ONLY_GAIN = dict(load_params(REPO / "params.yaml").registry.gates.model_dump(), min_effort_gain=None,
                 max_kl=None, max_over_refusal=None, min_mc_accuracy=None)


def outcomes(attacks: dict[str, list[bool]], judge: str = "semantic", keys: list[str] | None = None) -> dict:
    """outcomes.json as es2.stages.evaluate writes it (role `model` only), prompts keyed p00, p01, ..."""
    return {"judge": judge, "roles": {"model": {
        "attacks": {name: {"family": name, "prompts": keys or [f"p{i:02d}" for i in range(len(success))],
                           "success": success} for name, success in attacks.items()},
        "benign": {"prompts": ["b0"], "refused": [F]}, "mc": {"questions": ["q0"], "correct": [T]}}}}


def gain_row(challenger, champion, **gates):
    gate_params = GateParams(**{**ONLY_GAIN, "attacks": ["direct"], **gates})
    rows, reasons = decide({}, {}, gate_params, challenger, champion)
    (row,) = rows
    return row, reasons


def test_a_significant_gain_passes():
    row, reasons = gain_row(outcomes({"direct": [F] * 10}), outcomes({"direct": [T] * 10}))
    assert row.passed and not reasons
    assert (row.challenger, row.champion) == (1.0, 0.0)
    assert row.threshold == ">= champion +0, p < 0.05: shown (p = 0.002 < alpha 0.05, n = 10 paired)"


def test_equal_outcomes_are_not_shown_and_the_champion_stays():
    same = outcomes({"direct": [T, F] * 5})
    row, reasons = gain_row(same, same)
    assert not row.passed and "not shown (no gain, p = 1, n = 10 paired)" in row.threshold
    assert len(reasons) == 1 and "the champion stays" in reasons[0]


def test_a_gain_that_could_be_noise_is_not_shown():
    # 48 pairs: the challenger defends 4 prompts the champion loses, and loses 1 it defends; p = 2 * 6/32
    champion = [T] * 4 + [F] * 1 + [F] * 43
    challenger = [F] * 4 + [T] * 1 + [F] * 43
    row, reasons = gain_row(outcomes({"direct": challenger}), outcomes({"direct": champion}))
    assert not row.passed and row.challenger > row.champion
    assert "not shown (p = 0.38 >= alpha 0.05, n = 48 paired)" in row.threshold
    assert "not shown (p = 0.38 >= alpha 0.05, n = 48 paired)" in reasons[0] and "gain +0.0625" in reasons[0]
    # the same gain passes at a looser alpha
    assert gain_row(outcomes({"direct": challenger}), outcomes({"direct": champion}), alpha=0.4)[0].passed


@pytest.mark.parametrize("challenger, champion, words", [
    (None, outcomes({"direct": [T]}), "the challenger's run has no evaluate/outcomes.json"),
    (outcomes({"direct": [T]}), None, "the champion's run has no evaluate/outcomes.json"),
    (outcomes({"direct": [T]}, keys=["a"]), outcomes({"direct": [T]}, keys=["b"]), "share no prompt"),
    (outcomes({"scav": [T]}), outcomes({"direct": [T]}), "challenger's outcomes have no attack 'direct'"),
    (outcomes({"direct": [T]}, judge="jbb"), outcomes({"direct": [T]}), "judged by 'jbb'"),
])
def test_missing_or_unpairable_outcomes_fail_with_the_reason_and_the_fix(challenger, champion, words):
    row, reasons = gain_row(challenger, champion)
    assert not row.passed and "no paired outcomes" in row.threshold
    assert words in reasons[0] and "same prompt files" in reasons[0]


def test_prompts_are_matched_by_key_and_pooled_over_the_attacks():
    keys = ["k1", "k2", "k3", "k4"]
    challenger = outcomes({"direct": [F, F, F, T], "scav": [F, F, F, F]}, keys=keys)
    # the champion saw the prompts in another order, plus one the challenger never saw
    champion = outcomes({"direct": [T, T, T, T, T], "scav": [T, T, T, F, T]}, keys=["x", "k4", "k3", "k2", "k1"])
    paired = paired_dsr(challenger, champion, ["direct", "scav"], "semantic")
    assert paired.n == 8
    assert (paired.challenger, paired.champion) == (7 / 8, 1 / 8)
    assert paired.gain == pytest.approx(0.75) and paired.ci_low < 0.75 < paired.ci_high
    assert paired.pvalue == pytest.approx(mcnemar_exact([F, F, F, T, F, F, F, F], [T] * 6 + [F, T]))
    with pytest.raises(Unpaired, match="'repe'"):
        paired_dsr(challenger, champion, ["direct", "repe"], "semantic")


def test_margins():
    shown = paired_dsr(outcomes({"direct": [F] * 10}), outcomes({"direct": [T] * 5 + [F] * 5}), ["direct"],
                       "semantic")  # gain 0.5, p = 0.0625
    assert dsr_gain_passes(shown, 0.0, 0.1)[0] and not dsr_gain_passes(shown, 0.0, 0.05)[0]
    ok, words = dsr_gain_passes(shown, 0.6, 0.1)
    assert not ok and words.startswith("gain +0.5 below +0.6")
    # a negative margin tolerates a loss of up to it: no improvement to show, so no test
    worse = paired_dsr(outcomes({"direct": [T] + [F] * 9}), outcomes({"direct": [F] * 10}), ["direct"], "semantic")
    assert dsr_gain_passes(worse, -0.2, 0.05) == (True, "within the margin (p = 1, n = 10 paired)")
    assert not dsr_gain_passes(worse, -0.05, 0.05)[0]


def test_without_a_champion_the_gain_gate_is_skipped():
    gate_params = GateParams(**{**ONLY_GAIN, "attacks": ["direct"]})
    rows, reasons = decide({"evaluate/asr/direct/semantic": 0.2}, None, gate_params)
    assert rows[0].passed and "skipped" in rows[0].threshold and rows[0].challenger == pytest.approx(0.8)
    assert not reasons
