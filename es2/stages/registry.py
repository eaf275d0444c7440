"""The `register` and `promote` steps (run by the flow and the CLI, not by `dvc repro`, which stays free of
registry side effects).

register: log the pipeline run to MLflow (params, metrics, curve, plots, report, versions, the pyfunc model)
and register it as a new version of `registry.model_name` with alias `challenger`. Both are idempotent.
promote: compare the challenger's metrics with the champion's under `registry.gates`; move `champion` only if
every gate passes. MLflow itself is imported only by es2.tracking.
"""

from __future__ import annotations

from pathlib import Path

from es2.config import Params
from es2.pipeline import ARTIFACTS


def run_register(params: Params, artifacts_dir: str | Path = ARTIFACTS, root: str | Path = ".") -> dict:
    """Log the pipeline run and register its model as the challenger; return ids for printing."""
    from es2 import tracking
    from es2.stages.train import base_model_path

    reg = params.registry
    run_id = tracking.log_pipeline_run(params, artifacts_dir, base_model=base_model_path(params), root=root)
    version = tracking.register(run_id, reg.model_name, registry=reg)
    return {"tracking_uri": tracking.tracking_uri(), "experiment": reg.experiment, "run_id": run_id,
            "model_name": reg.model_name, "version": version,
            "model_uri": f"models:/{reg.model_name}@{tracking.CHALLENGER}"}


def run_promote(params: Params):
    """Gate the challenger against the champion; returns the `es2.gates.Decision` (print `table_text()`)."""
    from es2 import tracking

    reg = params.registry
    return tracking.promote(reg.model_name, reg.gates, registry=reg)
