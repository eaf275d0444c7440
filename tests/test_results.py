"""`es2 results`: the README's results block is rendered from an evaluation folder, never typed by hand."""

import json

import pytest

from es2.errors import DataError
from es2.headline import effort_rows
from es2.results import RESULTS_END, RESULTS_START, render, update_readme

KEYS = ["a", "b", "c"]
EFFORTS = effort_rows({"scav": {"budgets": [0.5, None, 1.0], "high": 4.0, "unit": "shift / norm", "prompts": KEYS}},
                      {"scav": {"budgets": [0.1, 0.2, 0.0], "high": 4.0, "unit": "shift / norm", "prompts": KEYS}})


def _eval_dir(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    row = {"figure": "direct_asr", "label": "harmful requests answered (direct ASR)", "lower_is_better": True,
           "model": 0.0, "baseline": 0.25, "n": 24, "diff": -0.25, "ci_low": -0.45, "ci_high": -0.05,
           "pvalue": 0.031, "attack": None}
    context = {"judge": "semantic", "judges": ["jbb", "semantic"], "span_source": "base_model",
               "heldout_grid": "prefill k in [5]", "n_harmful": 24, "n_benign": 24, "n_borderline": 8,
               "trained_grid": None, "profile": "standard", "efforts": EFFORTS}
    (tmp_path / "headline.json").write_text(json.dumps({"verdict": "Safer.", "rows": [row], "context": context}))
    (tmp_path / "metrics.json").write_text(json.dumps({"seconds": 600.0, "baseline/seconds": 540.0}))
    (tmp_path / "outcomes.json").write_text("{}")
    return tmp_path


def test_the_block_holds_the_headline_the_effort_certificate_profile_and_time(tmp_path):
    block = render(_eval_dir(tmp_path))
    assert block.startswith(RESULTS_START) and block.endswith(RESULTS_END)
    assert "| harmful requests answered (direct ASR) | 0% | 25% | -25 pts [-45, -5] | 0.031 | 24 |" in block
    assert "| SCAV | 1 [0.5, >4] | 0.1 [0, 0.2] | x10 |" in block  # one of three never broken: censored at 4
    assert "attack profile `standard`" in block
    assert "Wall time as recorded: evaluation of the model 10.0 min, evaluation of the baseline 9.0 min." in block


def test_the_pipelines_align_and_train_time_comes_first_and_only_for_its_own_evaluation(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"wall_seconds": 480.0}))
    block = render(_eval_dir(tmp_path / "evaluate"))  # no align folder: not named
    assert "Wall time as recorded: train 8.0 min, evaluation of the model 10.0 min," in block
    other = render(_eval_dir(tmp_path / "registered_model_eval"))  # another model's evaluation beside them
    assert "Wall time as recorded: evaluation of the model 10.0 min," in other and "train 8.0" not in other


def test_the_judge_decided_figures_are_shown_under_every_judge(tmp_path):
    eval_dir = _eval_dir(tmp_path)
    metrics = {"asr/direct/jbb": 0.25, "asr/direct/semantic": 0.125, "baseline/asr/direct/jbb": 0.5,
               "baseline/asr/direct/semantic": 0.375, "over_refusal/jbb/rate": 0.1,
               "over_refusal/semantic/rate": 0.2, "baseline/over_refusal/jbb/rate": 0.05,
               "baseline/over_refusal/semantic/rate": 0.15}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    block = render(eval_dir)
    assert ("under every judge (model / baseline): direct ASR jbb 25% / 50%, semantic 12% / 38%; "
            "over-refusal jbb 10% / 5%, semantic 20% / 15%.") in block  # no borderline figures: not shown


def test_update_replaces_only_the_block_and_refuses_a_readme_without_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{RESULTS_START}\nold\n{RESULTS_END}\noutro\n")
    update_readme(readme, _eval_dir(tmp_path))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text and "SCAV" in text
    readme.write_text("no block here\n")
    with pytest.raises(DataError, match="no results block"):
        update_readme(readme, tmp_path)
