"""benchmarks/study.py: which goals a run meets, the table it prints and the README block it rewrites."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from es2.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)
SPEC = yaml.safe_load((ROOT / "benchmarks" / "study.yaml").read_text())
GOALS = SPEC["goals"]


def _metrics(**change) -> dict:
    """A run that meets every goal, with `change` applied."""
    m = {"n/direct_asr": 24, "n/over_refusal": 140, "n/over_refusal_borderline": 50, "headline/direct_asr": 0.05,
         "headline/prefill_asr_worst": 0.2, "headline/injection_asr_worst": 0.25, "headline/over_refusal": 0.1,
         "headline/over_refusal_borderline": 0.18, "capability/kl_to_baseline": 0.05,
         "headline/mc_accuracy": 0.5, "diff/mc_accuracy": -0.01, "pvalue/mc_accuracy": 0.4}
    for attack in GOALS["effort_attacks"]:
        m.update({f"effort/{attack}/median": 0.5, f"effort/{attack}/ci_low": 0.4,
                  f"baseline/effort/{attack}/median": 0.1, f"baseline/effort/{attack}/ci_high": 0.2})
    return {**m, **change}


def test_a_run_meeting_every_goal_fails_none():
    row = study.goal_row("default", 0, _metrics(), GOALS)
    assert row["goals_failed"] == [] and row["goals_met"] == 6 + len(GOALS["effort_attacks"])
    assert row["direct_refusal"] == pytest.approx(0.95) and row["effort_repe"] == pytest.approx(5.0)


@pytest.mark.parametrize("change, failed", [
    ({"headline/over_refusal": 0.16}, "over_refusal"),
    ({"headline/over_refusal_borderline": 0.21}, "borderline"),
    ({"headline/direct_asr": 0.16}, "direct_refusal"),
    ({"headline/injection_asr_worst": 0.31}, "prefill_injection"),
    ({"capability/kl_to_baseline": 0.11}, "kl"),
    ({"diff/mc_accuracy": -0.05, "pvalue/mc_accuracy": 0.01}, "mc"),
    ({"effort/repe/median": 0.15}, "effort_repe"),                # x1.5: under the 2x goal
    ({"effort/scav/ci_low": 0.19}, "effort_scav"),                # x5, but the intervals overlap
])
def test_each_goal_fails_on_its_own_figure(change, failed):
    assert study.goal_row("v", 1, _metrics(**change), GOALS)["goals_failed"] == [failed]


def test_a_warm_start_broken_without_budget_makes_the_ratio_unbounded_and_shows_both_medians():
    apart = _metrics(**{"baseline/effort/repe/median": 0.0, "baseline/effort/repe/ci_high": 0.02,
                        "effort/repe/median": 0.06, "effort/repe/ci_low": 0.03})
    row = study.goal_row("default", 0, apart, GOALS)
    assert row["effort_repe"] == float("inf") and "effort_repe" not in row["goals_failed"]
    assert "∞ (0.06 vs 0)" in study.table([row], GOALS["effort_attacks"], 9)
    overlapping = study.goal_row("default", 0, {**apart, "effort/repe/ci_low": 0.01}, GOALS)
    assert overlapping["goals_failed"] == ["effort_repe"]
    censored = study.goal_row("default", 0, {**apart, "effort/repe/median": 4.0,
                                             "effort/repe/median_censored": True}, GOALS)
    assert "∞ (>4 vs 0)" in study.table([censored], GOALS["effort_attacks"], 9)
    neither = study.goal_row("default", 0, {**apart, "effort/repe/median": 0.0}, GOALS)
    assert neither["effort_repe"] is None and "effort_repe" in neither["goals_failed"]


def test_the_table_states_every_n_and_the_readme_block_is_replaced(tmp_path):
    rows = [study.goal_row("default", 0, _metrics(), GOALS),
            study.goal_row("two_layers", 0, _metrics(**{"headline/over_refusal": 0.3}), GOALS)]
    text = study.table(rows, GOALS["effort_attacks"], 9)
    assert "n per run: 24 harmful, 140 benign (50 borderline) prompts." in text
    assert "| two_layers | 0 | 30% |" in text and "fails: over_refusal" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{study.STUDY_START}\nold\n{study.STUDY_END}\noutro\n")
    study.replace_block(readme, "study", study.STUDY_START, study.STUDY_END, lambda: text)
    out = readme.read_text()
    assert out.startswith("intro\n") and out.endswith("outro\n") and "old" not in out and "two_layers" in out
    readme.write_text("no markers\n")
    with pytest.raises(DataError, match="no study block"):
        study.replace_block(readme, "study", study.STUDY_START, study.STUDY_END, lambda: text)


def _outcomes(path, refused_benign: list[bool], direct_success: list[bool]):
    role = {"attacks": {"direct": {"family": "direct", "prompts": list("abcd"), "success": direct_success}},
            "efforts": {}, "benign": {"prompts": [f"b{i}" for i in range(len(refused_benign))],
                                      "refused": refused_benign, "borderline": [False] * len(refused_benign)},
            "mc": {"questions": ["q"], "correct": [True]}, "kl": 0.05}
    path.mkdir(parents=True)
    (path / "outcomes.json").write_text(json.dumps({"roles": {"model": role}}))


def test_a_variant_that_meets_more_goals_is_paired_against_the_default_on_the_same_prompts(tmp_path):
    _outcomes(tmp_path / "default" / "seed0" / "eval", [True, True, False, False], [True, False, False, False])
    _outcomes(tmp_path / "two_layers" / "seed0" / "eval", [False, False, False, False], [False] * 4)
    rows = [study.goal_row("default", 0, _metrics(**{"headline/over_refusal": 0.5}), GOALS),
            study.goal_row("two_layers", 0, _metrics(), GOALS)]
    text = study.best_vs_default(tmp_path, rows)
    assert text.startswith("Best variant: two_layers.")
    assert "seed 0: direct_asr -25% (p = 1)" in text and "over_refusal -50% (p = 0.5)" in text
    assert text.endswith("Better at p < 0.05 on no figure, worse on none: the default stays.")


def test_a_variant_better_on_a_goal_figure_at_p_005_and_worse_on_none_should_become_the_default(tmp_path):
    _outcomes(tmp_path / "default" / "seed0" / "eval", [True] * 8, [False] * 4)
    _outcomes(tmp_path / "two_layers" / "seed0" / "eval", [False] * 8, [False] * 4)
    rows = [study.goal_row("default", 0, _metrics(**{"headline/over_refusal": 1.0}), GOALS),
            study.goal_row("two_layers", 0, _metrics(), GOALS)]
    assert "Better at p < 0.05 on over_refusal and worse on none" in study.best_vs_default(tmp_path, rows)


def test_a_default_that_meets_the_most_goals_is_paired_against_its_runner_up(tmp_path):
    _outcomes(tmp_path / "default" / "seed0" / "eval", [False] * 8, [False] * 4)
    _outcomes(tmp_path / "four_layers" / "seed0" / "eval", [True] * 8, [False] * 4)
    rows = [study.goal_row("default", 0, _metrics(), GOALS),
            study.goal_row("four_layers", 0, _metrics(**{"headline/over_refusal": 1.0}), GOALS),
            study.goal_row("refusal_ce", 0, _metrics(**{"headline/over_refusal": 1.0, "headline/direct_asr": 0.5}),
                           GOALS)]
    text = study.best_vs_default(tmp_path, rows)
    assert text.startswith("Best variant: default; its runner-up, four_layers, paired against it")
    assert "seed 0: direct_asr +0% (p = 1)" in text and "over_refusal +100% (p = 0.0078)" in text
    assert text.endswith("four_layers is better at p < 0.05 on no figure, worse on over_refusal: the default stays "
                         "(it ranks first on goals met per run, then over-refusal).")
    assert study.best_vs_default(tmp_path, rows[:1]) == "Best variant: default; the default stays."


def test_a_finished_run_is_read_back_and_one_finished_under_other_settings_is_refused_by_name(tmp_path):
    record = study.run_record(["train.layers=[16,20,24,28]"], 1, "quick", 16, "direct,scav", [])
    assert record["settings"] == ["train.layers=[16,20,24,28]", "train.seed=1", "evaluate.profile=quick",
                                  "evaluate.limit=16"]
    assert study.finished(tmp_path, record) is None  # nothing evaluated yet (a training alone does not count)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(_metrics()))
    (tmp_path / "run.json").write_text(json.dumps({**record, "es2_source": "abc"}))
    assert study.finished(tmp_path, record)["headline/direct_asr"] == 0.05
    other = study.run_record([], 1, "quick", 16, "direct,scav", [])
    with pytest.raises(SystemExit, match=r"was run with .*train.layers.*delete it or pass another --out"):
        study.finished(tmp_path, other)


def test_a_run_made_before_params_yaml_changed_is_refused_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    run = tmp_path / "default" / "seed0"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(_metrics()))
    record = study.run_record([], 0, "quick", 16, None, [], params_file=params)
    (run / "run.json").write_text(json.dumps({**record, "es2_source": "abc"}))
    assert study.finished(run, record) is not None
    # the same overrides, but the default itself changed: the old run no longer stands for `default`
    params.write_text(params.read_text().replace("  lr: 0.0001", "  lr: 0.0003", 1))
    changed = study.run_record([], 0, "quick", 16, None, [], params_file=params)
    assert changed["settings"] == record["settings"]
    with pytest.raises(SystemExit, match=r"train\.lr=0\.0001 \(now 0\.0003\)"):
        study.finished(run, changed)
    legacy = {k: v for k, v in record.items() if k != "params"}
    (run / "run.json").write_text(json.dumps(legacy))
    with pytest.raises(SystemExit, match="resolved params not recorded"):
        study.finished(run, record)


def test_every_variant_is_paired_against_the_default_naming_what_differs_at_p_005(tmp_path):
    _outcomes(tmp_path / "default" / "seed0" / "eval", [False] * 8, [True] * 4)
    _outcomes(tmp_path / "refusal_ce" / "seed0" / "eval", [True] * 8, [False] * 4)  # refuses every benign one
    _outcomes(tmp_path / "four_layers" / "seed0" / "eval", [True] + [False] * 7, [True] * 4)
    _outcomes(tmp_path / "four_layers" / "seed1" / "eval", [False] * 8, [True] * 4)  # no default at seed 1
    rows = [study.goal_row(v, s, _metrics(), GOALS)
            for v, s in (("default", 0), ("refusal_ce", 0), ("four_layers", 0), ("four_layers", 1))]
    lines = study.paired_vs_default(tmp_path, rows).splitlines()
    assert lines[1:] == ["- refusal_ce, seed 0: over_refusal +100% worse (p 0.0078)",
                         "- four_layers, seed 0: none"]
    assert study.paired_vs_default(tmp_path, rows[:1]) == ""


def test_the_best_variant_is_chosen_per_run_and_paired_only_at_the_seeds_both_ran(tmp_path):
    _outcomes(tmp_path / "default" / "seed0" / "eval", [True] * 4, [False] * 4)
    _outcomes(tmp_path / "two_layers" / "seed0" / "eval", [False] * 4, [False] * 4)
    worse = _metrics(**{"headline/over_refusal": 0.5})
    rows = [study.goal_row("default", s, worse, GOALS) for s in (0, 1, 2)]  # more runs, fewer goals per run
    rows.append(study.goal_row("two_layers", 0, _metrics(), GOALS))
    text = study.best_vs_default(tmp_path, rows)
    assert text.startswith("Best variant: two_layers.") and "seed 0:" in text and "seed 1" not in text


def test_table_only_runs_nothing_and_names_the_runs_not_made(tmp_path, capsys):
    record = study.run_record([], 0, "quick", 16, None, [])
    (tmp_path / "default" / "seed0" / "eval").mkdir(parents=True)
    (tmp_path / "default" / "seed0" / "eval" / "metrics.json").write_text(json.dumps(_metrics()))
    (tmp_path / "default" / "seed0" / "run.json").write_text(json.dumps({**record, "es2_source": "abc"}))
    study.main(["--table-only", "--variants", "default,four_layers", "--seeds", "0,1", "--profile", "quick",
                "--limit", "16", "--out", str(tmp_path)])
    text = (tmp_path / "study.md").read_text()
    assert "| default | 0 |" in text and "Not run: default seed 1, four_layers seed 0, four_layers seed 1." in text
    assert not (tmp_path / "four_layers").exists() and (tmp_path / "frontier.png").exists()


def test_git_keeps_what_the_table_is_rebuilt_from_and_leaves_the_adapters_out():
    run = "artifacts/study/any_variant/seed3"
    kept = [f"{run}/run.json", f"{run}/eval/metrics.json", f"{run}/eval/outcomes.json"]
    left = [f"{run}/train/adapter/adapter_model.safetensors", f"{run}/eval/report.html"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *kept, *left], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == left


@pytest.mark.parametrize("variant", sorted(SPEC["variants"]))
def test_every_variant_of_the_study_loads_under_params_yaml(variant):
    """A misspelled key or a value params.yaml refuses shows up here, not hours into a study."""
    record = study.run_record(SPEC["variants"][variant], 0, "quick", 16, None, [])
    assert record["settings"][-3:] == ["train.seed=0", "evaluate.profile=quick", "evaluate.limit=16"]
