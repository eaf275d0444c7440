"""MLflow tracking and model registry: the only package in es2 that imports mlflow.

`log_pipeline_run` (`runs`) logs one pipeline run (what `es2.run_record` reads: params, stage metrics, the
training curve, plots, the report, data and code versions) with the model as an `ES2Model` pyfunc (`model`),
once per pipeline key. `register` (`registry`) makes it a new version with the `challenger` alias (idempotent
per run, rolled back when it fails midway); `promote` moves `champion` to it only when every gate of
`es2.gates` passes; `load_registered_model` (`loading`) loads `models:/NAME@ALIAS` or `models:/NAME/VERSION`
for `es2 evaluate`, downloaded once per version.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working directory with
artifacts under `mlruns/`. MLflow's own HTTP client retries requests to a server (`registry.retries`,
`backoff_seconds`, `timeout_seconds`); what still fails becomes an `ES2Error` naming the URI and the fix
(`connection`).
"""

import os

# Set before any module here imports mlflow, else it writes ~/.config/mlflow/telemetry.json.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from es2.tracking.connection import tracking_uri
from es2.tracking.loading import load_registered_model
from es2.tracking.model import ES2Model, load_packaged
from es2.tracking.registry import CHALLENGER, CHAMPION, PROMOTION_TAG, STATUS_TAG, promote, register
from es2.tracking.runs import KEY_TAG, MODEL_TAG, log_pipeline_run

__all__ = ["CHALLENGER", "CHAMPION", "ES2Model", "KEY_TAG", "MODEL_TAG", "PROMOTION_TAG", "STATUS_TAG",
           "load_packaged", "load_registered_model", "log_pipeline_run", "promote", "register", "tracking_uri"]
