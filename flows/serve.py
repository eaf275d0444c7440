"""On-demand runs: serve the `es2-pipeline/retrain` deployment from this process (`es2 serve`).

It has no schedule and does not register by default: scheduled retraining, and promotion into the team's
registry, belong to the CI workflow (.github/workflows/retrain.yml) alone. Serve it to start runs from the
Prefect UI or CLI, e.g. on another model or with other parameters, in this repository:

    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    es2 serve
    prefect deployment run es2-pipeline/retrain -p model=my-org/my-model --watch

Flow runs execute in subprocesses of this process. For a team setup (a work pool and workers instead of this
process) use prefect.yaml: `prefect deploy --all`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import get_current_settings

from flows.pipeline import DVC_STAGES, pipeline

DEPLOYMENT_NAME = "retrain"


def deployment_parameters(repo: str | Path = ".", params_overrides: dict | None = None, model: str | None = None,
                          data_rev: str | None = None, register: bool = False) -> dict:
    """The deployment's default parameters; every triggered run can override any of them."""
    return {"repo": str(Path(repo).resolve()), "stages": list(DVC_STAGES), "register": register,
            "params_overrides": params_overrides or {}, "model": model, "data_rev": data_rev}


def deployments(repo: str | Path = ".", **parameters) -> list[RunnerDeployment]:
    return [pipeline.to_deployment(
        name=DEPLOYMENT_NAME, parameters=deployment_parameters(repo, **parameters), tags=["es2"],
        description="es2 on demand: the DVC stages (register=true also registers; CI alone promotes)")]


def main(repo: str | Path = ".", **parameters) -> None:
    """Serves the deployment(s) until interrupted (Ctrl-C)."""
    if not get_current_settings().api.url:
        print("warning: PREFECT_API_URL is not set, so this serves against an ephemeral API that stops with this "
              "process; start `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    serve(*deployments(repo, **parameters))


if __name__ == "__main__":
    main()
