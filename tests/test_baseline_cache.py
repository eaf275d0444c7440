"""evaluate.reuse_baseline: the baseline's evaluation is stored once per (model files, protocol, prompts, es2 source)
and read back, never stale and never half-written."""

import json
import shutil

import pytest

from es2.config import load_params
from es2.stages.baseline_cache import cached_run, run_key
from es2.stages.evaluate import run_evaluate
from tests.conftest import REPO
from tests.test_evaluate import BUDGET, _prompts


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ES2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "evaluations"


def test_a_run_is_built_once_per_key_and_a_failed_build_stores_nothing(cache):
    calls = []

    def build(value):
        def run():
            calls.append(value)
            return {"metrics": {"x": value}}
        return run

    key = run_key({"name_or_path": "m"}, cfg={"limit": 4})
    assert cached_run(key, build(1)) == {"metrics": {"x": 1}}
    assert cached_run(key, build(2)) == {"metrics": {"x": 1}} and calls == [1]  # read back, not rebuilt
    other = run_key({"name_or_path": "m"}, cfg={"limit": 5})
    assert other != key and cached_run(other, build(3)) == {"metrics": {"x": 3}}

    def broken():
        raise RuntimeError("killed")

    failed = run_key({"name_or_path": "m"}, cfg={"limit": 6})
    with pytest.raises(RuntimeError):
        cached_run(failed, broken)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{k}.pt" for k in (key, other))


def test_the_key_changes_with_the_model_files_and_the_es2_source(monkeypatch):
    import es2.stages.baseline_cache as baseline_cache

    identity = {"name_or_path": "m", "files": {"adapter.safetensors": [10, 1]}}
    key = run_key(identity, cfg={})
    assert run_key({**identity, "files": {"adapter.safetensors": [10, 2]}}, cfg={}) != key
    monkeypatch.setattr(baseline_cache, "source_digest", lambda: "other code")
    assert run_key(identity, cfg={}) != key


def test_a_second_evaluation_reuses_the_unchanged_baseline_and_a_changed_one_is_evaluated(
        tiny_model_dir, tmp_path, monkeypatch, capsys, cache):
    monkeypatch.chdir(tmp_path)
    paths = _prompts(tmp_path)
    baseline = tmp_path / "baseline"
    shutil.copytree(tiny_model_dir, baseline)
    params = load_params(REPO / "params.yaml", (*BUDGET, f"model.name_or_path={tiny_model_dir}",
                                                "evaluate.attacks=[direct,repe]"))

    def evaluate(out):
        metrics = run_evaluate(params, tmp_path / out, str(tiny_model_dir), str(baseline), str(paths["harmful"]),
                               str(paths["harmless"]))
        return metrics, capsys.readouterr().out

    first, printed = evaluate("a")
    assert "reusing" not in printed and len(list(cache.iterdir())) == 1
    second, printed = evaluate("b")
    assert "reusing its evaluation" in printed
    baseline_figures = {k: v for k, v in first.items() if k.startswith("baseline/") and "seconds" not in k}
    assert baseline_figures and all(second[k] == v for k, v in baseline_figures.items())
    assert json.loads((tmp_path / "b" / "outcomes.json").read_text())["roles"]["baseline"] == \
        json.loads((tmp_path / "a" / "outcomes.json").read_text())["roles"]["baseline"]
    (baseline / "config.json").write_text((baseline / "config.json").read_text() + "\n")  # the folder changed
    _, printed = evaluate("c")
    assert "reusing" not in printed and len(list(cache.iterdir())) == 2
