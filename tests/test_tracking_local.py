"""MLflow tracking without a server, with a tiny Llama + a perturbed LoRA adapter and realistic stage
metrics: logging, registering and promoting on the embedded sqlite store, loading registered models for
`es2 evaluate` (and its errors), the promotion gates on plain metrics, the errors when the configured server
is unreachable, and the rule that only es2.tracking imports mlflow. The tests against a real `mlflow server`
are in tests/test_tracking_server.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import pytest

from es2 import tracking
from es2.errors import ES2Error
from es2.gates import decide
from tests.conftest import free_port
from tests.tracking_support import (GOOD, PROMPTS, REG, alias, eval_metrics, log_and_register, log_run,
                                    pipeline, tiny_params)
from tests.tracking_support import _client_tmpdir  # noqa: F401 - autouse fixture: importing it applies it


def test_embedded_sqlite_store_logs_everything_once(trained, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 98b7.dir\n  path: data\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: es2 train\n    outs:\n"
                                       "    - path: artifacts/train/adapter\n      md5: abc1.dir\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    params, art = pipeline(trained, tiny_model_dir, tmp_path)

    run_id = log_run(params, art)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["train.method"] == "es2" and run.data.params["align.enabled"] == "false"
    assert json.loads(run.data.params["train.layers"]) == [1, 2]
    m = run.data.metrics
    assert m["evaluate/asr/direct/jbb"] == 0.25 and m["evaluate/asr/direct/jbb_ci95/1"] == pytest.approx(0.4)
    assert m["train/heldout_dprime_trained"] == 2.9 and m["train/per_layer/base/dprime/mean"] == 1.2
    assert m["align/after/refusal_jbb/rate"] == 0.92
    curve = mlflow.MlflowClient().get_metric_history(run_id, "train/curve/loss")
    assert [(h.step, round(h.value, 4)) for h in curve] == [(5, 0.2), (10, 0.1), (15, 0.0667), (20, 0.05)]
    tags = run.data.tags
    assert tags["dvc.data.data.md5"] == "98b7.dir"
    assert tags["dvc.train.artifacts/train/adapter.md5"] == "abc1.dir"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags[tracking.KEY_TAG]
    logged = {a.path for folder in ("train", "evaluate", "pipeline")
              for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}
    assert {"train/curve.png", "train/curve.csv", "evaluate/report.html", "evaluate/asr_jbb.png",
            "evaluate/outcomes.json", "pipeline/dvc.lock"} <= logged

    assert log_run(params, art) == run_id  # same pipeline: the same run
    assert tracking.register(run_id, "tiny-local", registry=REG) == "1"
    assert tracking.register(run_id, "tiny-local", registry=REG) == "1"
    assert alias("tiny-local", "challenger") == "1"

    # A full fine-tune (no adapter): the saved folder itself is the model.
    import torch
    from transformers import AutoModelForCausalLM

    shutil.rmtree(art / "train" / "adapter")
    shutil.copytree(tiny_model_dir, art / "train" / "adapter")
    full = tiny_params(tiny_model_dir, full_finetune=True)
    full_run = log_run(full, art)
    assert full_run != run_id
    uri = mlflow.MlflowClient().get_run(full_run).data.tags[tracking.MODEL_TAG]
    loaded = mlflow.pyfunc.load_model(uri)
    assert set(loaded.metadata.flavors["python_function"]["artifacts"]) == {"base", "tokenizer"}
    inner = loaded.unwrap_python_model()
    batch = trained[2](PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(**batch).logits
        assert (inner.model(**batch).logits - expected).abs().max() < 1e-6

def _embedded_store(tmp_path, monkeypatch) -> Path:
    """An sqlite registry and an es2 cache of this test's own; returns the registry download cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("ES2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "registry"


def test_evaluate_loads_registered_models_once_per_version(trained, tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel

    from es2.generation import generate
    from es2.stages.evaluate import load_model

    cache = _embedded_store(tmp_path, monkeypatch)
    params, art = pipeline(trained, tiny_model_dir, tmp_path / "a")
    run_id = log_run(params, art, root=tmp_path / "a")
    tracking.register(run_id, "tiny-eval", registry=REG)
    assert tracking.promote("tiny-eval", registry=REG).promoted
    downloads = []
    download = mlflow.artifacts.download_artifacts

    def counted(**kwargs):
        downloads.append(kwargs["artifact_uri"])
        return download(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    local, local_tokenizer = load_model(str(art / "train" / "adapter"), params)
    batch = local_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = local(**batch).logits
        with local.disable_adapter():
            assert (local(**batch).logits - expected).abs().max() > 1e-3  # so a missing adapter would show
    greedy = generate(local, local_tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    for spec in ("models:/tiny-eval@champion", "models:/tiny-eval/1", "models:/tiny-eval@challenger"):
        model, tokenizer = load_model(spec, params)
        assert isinstance(model, PeftModel)
        with torch.no_grad():
            assert (model(**batch).logits - expected).abs().max() < 1e-6
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False) == greedy
    assert downloads == ["models:/tiny-eval/1"]  # all three name version 1: downloaded once

    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-eval", asr=0.1)
    load_model("models:/tiny-eval@challenger", params)  # the alias moved to version 2
    assert downloads == ["models:/tiny-eval/1", "models:/tiny-eval/2"]
    cached = sorted(p.name for p in cache.iterdir())
    assert [name.rsplit("-", 1)[0] for name in cached] == ["tiny-eval-v1", "tiny-eval-v2"]


def test_registered_model_errors_name_the_uri_and_the_fix(trained, tiny_model_dir, tmp_path, monkeypatch):
    from es2.errors import ConfigError

    cache = _embedded_store(tmp_path, monkeypatch)
    log_and_register(trained, tiny_model_dir, tmp_path, "tiny-errors")
    for uri, words in (
            ("models:/tiny-errors@champion", ["alias 'champion'", "es2 promote"]),
            ("models:/tiny-errors@nightly", ["alias 'nightly'", "models:/tiny-errors@champion"]),
            ("models:/tiny-errors/9", ["no version 9"]),
            ("models:/tiny-nowhere@challenger", ["registered model 'tiny-nowhere'", "es2 register"])):
        with pytest.raises(ES2Error) as err:
            tracking.load_registered_model(uri, REG)
        assert all(w in str(err.value) for w in [uri, *words]), str(err.value)
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        tracking.load_registered_model("models:/tiny-errors", REG)

    download = mlflow.artifacts.download_artifacts

    def interrupted(artifact_uri, dst_path, **kwargs):
        (Path(dst_path) / "MLmodel").write_text("flavors: {}\n")  # a partial download
        raise OSError("connection reset mid-download")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", interrupted)
    with pytest.raises(ES2Error, match="models:/tiny-errors@challenger: .*connection reset"):
        tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert list(cache.iterdir()) == []  # nothing left that a later call could trust
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    model, _ = tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert type(model).__name__ == "PeftModelForCausalLM" and len(list(cache.iterdir())) == 1

    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    with pytest.raises(ES2Error) as err:
        tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert all(w in str(err.value) for w in ("models:/tiny-errors@challenger", down, "unreachable"))


def test_promote_decides_the_dsr_gain_on_the_logged_outcomes(trained, tiny_model_dir, tmp_path, monkeypatch):
    _embedded_store(tmp_path, monkeypatch)
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-paired")
    assert tracking.promote("tiny-paired", registry=REG).promoted

    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-paired", effort=3.5)  # same outcomes
    same = tracking.promote("tiny-paired", registry=REG)
    gain = next(r for r in same.table if r.gate == "dsr_gain")
    assert not same.promoted and not gain.passed and "not shown (no gain, p = 1, n = 120 paired)" in gain.threshold
    assert alias("tiny-paired", "champion") == "1"

    log_and_register(trained, tiny_model_dir, tmp_path / "c", "tiny-paired", outcomes=False, asr=0.1)
    missing = tracking.promote("tiny-paired", registry=REG)
    assert not missing.promoted
    assert any("challenger's run has no evaluate/outcomes.json" in r and "same prompt files" in r
               for r in missing.reasons), missing.reasons

    log_and_register(trained, tiny_model_dir, tmp_path / "d", "tiny-paired", asr=0.1)
    better = tracking.promote("tiny-paired", registry=REG)
    print(better.table_text())
    gain = next(r for r in better.table if r.gate == "dsr_gain")
    assert better.promoted and gain.challenger > gain.champion and "shown (p = " in gain.threshold
    assert alias("tiny-paired", "champion") == "4"


def test_decide_gates_without_a_server():
    gates = REG.gates.model_copy(update={"attacks": ["direct", "scav"], "min_dsr": 0.5, "min_effort_gain": 1.1,
                                         "effort_attacks": ["scav"]})
    good = {f"evaluate/{k}": v for k, v in eval_metrics(**GOOD).items() if not isinstance(v, list)}
    rows, reasons = decide(good, None, gates)
    assert all(r.passed for r in rows) and not reasons  # DSR = 1 - (0.25 + 0.5) / 2 = 0.625
    assert next(r for r in rows if r.gate == "dsr").challenger == pytest.approx(0.625)
    lacking = {k: v for k, v in good.items() if "scav" not in k}
    rows, reasons = decide(lacking, good, gates)
    failed = {r.gate for r in rows if not r.passed}
    assert failed == {"dsr", "dsr_gain", "effort_gain_scav"} and len(reasons) == 3


def test_server_down_gives_a_clear_error_after_retries(trained, tiny_model_dir, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params, art = pipeline(trained, tiny_model_dir, tmp_path)
    started = time.monotonic()
    with pytest.raises(ES2Error) as err:
        log_run(params, art, root=tmp_path)
    assert time.monotonic() - started >= 2.0  # MLflow's retries: at once, then after 2 x the backoff factor
    message = str(err.value)
    assert uri in message and "after 3 attempts" in message and "mlflow server" in message
    with pytest.raises(ES2Error, match="unreachable"):
        tracking.register("0" * 32, "tiny-down", registry=REG)
    with pytest.raises(ES2Error, match="unreachable"):
        tracking.promote("tiny-down", registry=REG)


def test_only_tracking_imports_mlflow():
    import re

    root = Path(tracking.__file__).resolve().parents[1]  # es2/
    pattern = re.compile(r"^\s*(import mlflow|from mlflow)", re.MULTILINE)
    importers = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))}
    assert importers and {name.split("/")[0] for name in importers} == {"tracking"}
