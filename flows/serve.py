"""Local scheduling: serve the `es2-pipeline/nightly` deployment from this process (`es2 serve`).

Schedules need a real Prefect server (an ephemeral one refuses them):

    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    es2 serve                                   # registers es2-pipeline/nightly (03:00 UTC daily) and runs it
    prefect deployment run es2-pipeline/nightly -p model=my-org/my-model --watch   # a run now

Flow runs execute in subprocesses of this process, in the repository given here. For a team setup (a work pool and
workers instead of this process) use prefect.yaml: `prefect deploy --all`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron
from prefect.settings import get_current_settings

from flows.pipeline import DVC_STAGES, pipeline

NIGHTLY_NAME = "nightly"
NIGHTLY_CRON = "0 3 * * *"
TIMEZONE = "UTC"


def nightly_parameters(repo: str | Path = ".", params_overrides: dict | None = None, model: str | None = None,
                       data_rev: str | None = None, register: bool = True) -> dict:
    """The deployment's default parameters; every scheduled or triggered run can override any of them."""
    return {"repo": str(Path(repo).resolve()), "stages": list(DVC_STAGES), "register": register,
            "params_overrides": params_overrides or {}, "model": model, "data_rev": data_rev}


def deployments(repo: str | Path = ".", cron: str = NIGHTLY_CRON, timezone: str = TIMEZONE,
                **parameters) -> list[RunnerDeployment]:
    return [pipeline.to_deployment(
        name=NIGHTLY_NAME, schedules=[Cron(cron, timezone=timezone)],
        parameters=nightly_parameters(repo, **parameters), tags=["es2"],
        description="es2 retraining: DVC stages, then register the challenger and promote it if the gates pass")]


def main(repo: str | Path = ".", cron: str = NIGHTLY_CRON, **parameters) -> None:
    """Serves the deployment(s) until interrupted (Ctrl-C)."""
    if not get_current_settings().api.url:
        print("warning: PREFECT_API_URL is not set, so this serves against an ephemeral API that does not run "
              "schedules; start `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    serve(*deployments(repo, cron, **parameters))


if __name__ == "__main__":
    main()
