"""What the MLflow tracking tests share (tests/test_tracking_local.py, tests/test_tracking_server.py): the
registry settings, realistic evaluate metrics and outcomes, a pipeline's artifacts folder built from the
`trained` fixture (tests/conftest.py), logging and registering it, and reading the registry back. A test
module imports `_client_tmpdir` by name, which makes that module-scoped autouse fixture apply to it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest

from es2 import tracking
from es2.config import Params, load_params
from tests.conftest import REPO

DEFAULTS = load_params(REPO / "params.yaml")
# fewer retries than params.yaml's, so that a failure path takes seconds
REG = DEFAULTS.registry.model_copy(update={"experiment": "es2-tests", "retries": 2, "timeout_seconds": 20})
PROMPTS = ["how do i bake bread for my family", "write a poem about the sea"]
GOOD = {"asr": 0.25, "effort": 3.0, "kl": 0.05, "over_refusal": 0.1, "mc": 0.3}
# each attack's ASR is the run's `asr` times this (capped at 1)
ASR_SCALE = {"direct": 1.0, "template_aim": 1.2, "prefill_k5": 1.4, "prefill_k10": 1.5, "prefill_k20": 1.6,
             "injection_s8": 1.3, "scav": 2.0, "gcg": 1.1}
JUDGES = ("jbb", "qi", "semantic")


@pytest.fixture(autouse=True, scope="module")
def _client_tmpdir(tmp_path_factory):
    """MLflow's client stages models in the temp dir (and leaves some there over HTTP): use pytest's."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("client-tmp"))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


def eval_metrics(asr: float, effort: float, kl: float, over_refusal: float, mc: float) -> dict:
    """evaluate/metrics.json as the stage writes it: flat keys, intervals as lists, a baseline block."""
    m: dict = {}
    for attack, scale in ASR_SCALE.items():
        for judge in JUDGES:
            rate = min(1.0, asr * scale)
            m[f"asr/{attack}/{judge}"] = rate
            m[f"asr/{attack}/{judge}_ci95"] = [max(0.0, rate - 0.15), min(1.0, rate + 0.15)]
            m[f"baseline/asr/{attack}/{judge}"] = min(1.0, 0.6 * scale)
    m.update({f"effort/{attack}/{k}": v for attack in ("repe", "scav", "softprompt")
              for k, v in [("median", effort), ("ci_low", effort / 2), ("ci_high", 2 * effort)]})
    m.update({"effort/scav/shift_rel_mean": 0.5, "baseline/effort/scav/median": 1.0, "effort/gcg/median": 10,
              "over_refusal/jbb/rate": over_refusal, "over_refusal/jbb/ci95": [0.0, over_refusal + 0.2],
              "over_refusal/qi/rate": over_refusal, "over_refusal/semantic/rate": over_refusal,
              "capability/kl_to_baseline": kl,
              "capability/mc_accuracy": mc,
              "capability/mc_n": 40, "capability/perplexity": 31.5, "capability/greedy_agreement": 0.8,
              "geometry/dprime/mean": 2.9, "baseline/geometry/dprime/mean": 1.2, "refusal_margin/mean": 1.4,
              "seconds": 321.0})
    return m


def eval_outcomes(asr: float, n: int = 40, **_) -> dict:
    """evaluate/outcomes.json matching eval_metrics: per attack, the first round(rate * n) of the same n prompts
    succeed, so a lower `asr` defends a superset of the prompts (a paired gain)."""
    def role(rate_of):
        return {"attacks": {a: {"family": a.split("_")[0], "prompts": [f"p{i:02d}" for i in range(n)],
                                "success": [i < round(rate_of(a) * n) for i in range(n)]} for a in ASR_SCALE},
                "benign": {"prompts": ["b0", "b1"], "refused": [False, False], "borderline": [False, True]},
                "mc": {"questions": ["q0"], "correct": [True]}}
    return {"judge": "semantic", "roles": {"model": role(lambda a: min(1.0, asr * ASR_SCALE[a])),
                                           "baseline": role(lambda a: min(1.0, 0.6 * ASR_SCALE[a]))}}


def pipeline(trained, tiny_model_dir, root: Path, outcomes: bool = True, **metrics) -> tuple[Params, Path]:
    """A pipeline's artifacts folder under root with the given evaluate metrics (and the matching outcomes.json
    unless `outcomes` is false); params for the tiny model."""
    art = root / "artifacts"
    shutil.copytree(trained[0], art)
    (art / "evaluate").mkdir()
    (art / "evaluate" / "metrics.json").write_text(json.dumps(eval_metrics(**{**GOOD, **metrics}), indent=2))
    if outcomes:
        (art / "evaluate" / "outcomes.json").write_text(json.dumps(eval_outcomes(**{**GOOD, **metrics})))
    (art / "evaluate" / "report.html").write_text("<!doctype html><title>es2 report</title><h1>ASR</h1>")
    shutil.copy(art / "train" / "curve.png", art / "evaluate" / "asr_jbb.png")
    return tiny_params(tiny_model_dir), art


def tiny_params(tiny_model_dir, **train) -> Params:
    """params.yaml for the tiny model (align off) with the tests' registry settings."""
    raw = DEFAULTS.model_dump(mode="json", by_alias=True)
    raw["model"]["name_or_path"], raw["align"]["enabled"], raw["registry"] = str(tiny_model_dir), False, \
        REG.model_dump(mode="json")
    raw["train"].update(layers=[1, 2], steps=20, **train)
    return Params.model_validate(raw)


def log_run(params: Params, art: Path, **kwargs) -> str:
    """The pipeline logged; the tiny model is the base (align is off)."""
    return tracking.log_pipeline_run(params, art, base_model=params.model.name_or_path, **kwargs)


def log_and_register(trained, tiny_model_dir, root: Path, name: str, outcomes: bool = True,
                     **metrics) -> tuple[str, str]:
    params, art = pipeline(trained, tiny_model_dir, root, outcomes, **metrics)
    run_id = log_run(params, art, root=root)
    return run_id, tracking.register(run_id, name, registry=REG)


def alias(name: str, which: str) -> str | None:
    """The version an alias points at, None when unset."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, which).version)
    except mlflow.exceptions.MlflowException:
        return None


def versions(name: str) -> dict[str, dict]:
    client = mlflow.MlflowClient()
    return {v.version: v.tags for v in client.search_model_versions(f"name = '{name}'")}
