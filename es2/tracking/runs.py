"""Logging a pipeline run (what it records: es2.run_record) with its model, once per pipeline key."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from es2.errors import ES2Error
from es2.pipeline import ARTIFACTS
from es2.run_record import flatten_params, logged_files, pipeline_key, run_metrics, version_tags
from es2.tracking.connection import safe_name, session, sqlite_file
from es2.tracking.model import ES2Model, model_artifacts, pip_requirements, signature

KEY_TAG = "es2.pipeline_key"
MODEL_TAG = "es2.model_uri"  # set last: a run without it was interrupted while logging


def log_pipeline_run(params, artifacts_dir: str | Path = ARTIFACTS, *, base_model: str,
                     root: str | Path = ".") -> str:
    """Log one pipeline run (params, metrics, curve, plots, report, versions, pyfunc model); return its id.

    `base_model` is what training started from (the aligned base when align ran). Reuses the finished run
    whose `es2.pipeline_key` matches (same params, dvc.lock, base and artifact bytes).
    """
    root, artifacts_dir = Path(root), Path(artifacts_dir)
    trained = artifacts_dir / "train" / "adapter"
    for needed, stage in ((trained, "train"), (artifacts_dir / "evaluate" / "metrics.json", "evaluate")):
        if not needed.exists():
            raise ES2Error(f"{needed} is missing, so there is nothing to log", f"run `es2 {stage}` (or `dvc repro`)")
    params_dict = params.model_dump(mode="json", by_alias=True)
    params_json = json.dumps(params_dict, sort_keys=True)
    stage_files = logged_files(artifacts_dir)
    model_files = [f for f in sorted(trained.rglob("*")) if f.is_file()]
    key = pipeline_key(params_json, root, artifacts_dir, [f for _, f in stage_files] + model_files, base_model)
    tags = {KEY_TAG: key, "es2.params_sha256": hashlib.sha256(params_json.encode()).hexdigest(),
            "es2.method": params.train.method, "es2.base_model": base_model, **version_tags(root)}

    with session(params.registry, "logging the pipeline run") as (client, uri):
        experiment_id = _experiment_id(client, params.registry.experiment, uri)
        query = f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
        for found in client.search_runs([experiment_id], query, max_results=5):
            if found.data.tags.get(MODEL_TAG):
                return found.info.run_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{key[:8]}", tags=tags) as run:
            run_id, now = run.info.run_id, int(time.time() * 1000)
            client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(flatten_params(params_dict).items())],
                             metrics=[Metric(k, v, now, step) for k, v, step in run_metrics(artifacts_dir)])
            files = stage_files + [("pipeline", root / name) for name in ("params.yaml", "dvc.lock", "dvc.yaml")
                                   if (root / name).exists()]
            for folder, path in files:
                client.log_artifact(run_id, str(path), artifact_path=folder)
            client.log_dict(run_id, params_dict, "pipeline/params.resolved.json")
            with tempfile.TemporaryDirectory(prefix="es2-pyfunc-") as staging, warnings.catch_warnings():
                # an input example would load and run the model at log time
                warnings.filterwarnings("ignore", message=".*input example.*")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=ES2Model(), signature=signature(),
                    artifacts=model_artifacts(params, trained, base_model, Path(staging)),
                    pip_requirements=pip_requirements(), code_paths=[str(Path(staging) / "code" / "es2")],
                    model_config={"dtype": params.model.dtype, "trust_remote_code": params.model.trust_remote_code,
                                  "base_model": base_model})
            client.set_tag(run_id, MODEL_TAG, info.model_uri)
        return run_id


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_file(uri)  # the embedded store keeps artifacts in mlruns/ beside it; servers choose their own
        location = (db.resolve().parent / "mlruns" / safe_name(name)).as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created concurrently
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
