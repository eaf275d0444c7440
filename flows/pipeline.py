"""The `es2-pipeline` flow: runs the DVC stages in order, so a Prefect run updates dvc.lock exactly like
`dvc repro` and skips unchanged stages. Registration, promotion and schedules arrive with the orchestration issue."""

from __future__ import annotations

import subprocess

from prefect import flow, task

STAGES = ("validate", "pairs")


@task(name="dvc-stage")
def run_stage(stage: str, repo: str = ".") -> str:
    """`dvc repro --single-item STAGE`: DVC decides whether the stage is stale; its output is the task log."""
    done = subprocess.run(["dvc", "repro", "--single-item", stage], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@flow(name="es2-pipeline", log_prints=True)
def pipeline(repo: str = ".") -> list[str]:
    logs = []
    for stage in STAGES:
        logs.append(run_stage(stage, repo))
        print(logs[-1])
    return logs
