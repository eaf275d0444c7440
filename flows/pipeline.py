"""The `es2-pipeline` flow: validate -> pairs -> align -> train -> evaluate -> register.

Orchestration only. Each data/model stage runs through DVC (`dvc repro --single-item STAGE`), so a Prefect run
updates dvc.lock exactly like `dvc repro` and DVC skips the stages whose deps and params did not change. Register
calls the `es2` CLI. No stage logic lives here. The flow never promotes: the CI workflow
(.github/workflows/retrain.yml) is the one promoter, so two retrainers never race to move `champion`.

Parameters:
- `repo`: the project root (DVC needs it as the working directory).
- `stages`: the DVC stages to run, in order (default: every stage of the table in es2/pipeline.py).
- `register`: after the stages, `es2 register` (a new version with alias challenger; no promotion).
- `params_overrides`: {"train.steps": 200, ...}. When given, each stage runs as `dvc exp run --single-item STAGE
  -S key=value ...` instead of `dvc repro`: DVC writes the values into params.yaml (they stay there, as after any
  workspace `dvc exp run`) and records each stage as an experiment (`dvc exp show`). Needs a git repo with a commit.
- `model`: shorthand for the override `model.name_or_path=MODEL`.
- `data_rev`: a git revision; `data.dvc` is checked out at it (`git checkout REV -- data.dvc`) and the data pulled
  (`dvc pull data.dvc`) before the stages. None: use the data in the workspace.

Concurrency: a run holds `.es2/run.lock` (es2.locking) for its whole duration; a second run on the same repo fails
at once with "locked by run X". DVC stages run one after another (concurrent `dvc repro` in one workspace fails).

Failures: only transient steps retry, with exponential backoff (dvc pull, register). A failing stage is not
retried: its run ends Failed with the stage's own output (for validate: the validation summary) in the state
message, and nothing after it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from es2.locking import RunLock, RunLocked
from es2.pipeline import STAGES, stage

# Prefect validates parameters with a pydantic model whose base class has a `register` attribute; the parameter
# works (checked in tests), only the warning is noise.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

DVC_STAGES = [s.name for s in STAGES]
REPORTS = {  # links in the run summary, when the file exists
    "validation Data Docs": stage("validate").path("data_docs/index.html"),
    "pair similarity": stage("pairs").path("similarity.png"),
    "training curve": stage("train").path("curve.png"),
    "evaluation report": stage("evaluate").path("report.html"),
}
EVAL_METRICS = stage("evaluate").path("metrics.json")
FAILURE_TAIL_CHARS = 4000


class StepFailed(RuntimeError):
    """A command of the pipeline exited non-zero; `output` is its combined stdout/stderr."""

    def __init__(self, step: str, returncode: int, output: str):
        self.step, self.returncode, self.output = step, returncode, output
        super().__init__(f"{step} failed (exit {returncode}):\n{tail(output)}")


def tail(text: str, limit: int = FAILURE_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _env() -> dict[str, str]:
    """The environment of this interpreter with its bin dir first on PATH, so `dvc` and the stages' `es2` resolve
    to the same installation even when the venv is not activated (e.g. under `prefect worker`)."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}


def _exe(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def es2_command() -> list[str]:
    return [_exe("es2")]


def run_command(cmd: list[str], repo: str, step: str) -> str:
    """Runs `cmd` in `repo`, echoing its output live into the task log; raises StepFailed on a non-zero exit."""
    proc = subprocess.Popen(cmd, cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n").split("\r")[-1]  # keep the final state of progress bars
        lines.append(line)
        print(line)
    output = "\n".join(lines)
    if proc.wait() != 0:
        raise StepFailed(step, proc.returncode, output)
    return output


def override_args(overrides: dict | None, model: str | None = None) -> list[str]:
    """{"train.steps": 5, "pairs": {"seed": 1}} -> ["train.steps=5", "pairs.seed=1"] (values as YAML/JSON)."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", overrides or {})
    if model:
        flat["model.name_or_path"] = model
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in flat.items()]


# ----------------------------------------------------------------------------------------------------- tasks


@task(name="checkout-data", task_run_name="checkout-data-{rev}", cache_policy=NO_CACHE, log_prints=True)
def checkout_data(repo: str, rev: str) -> str:
    """Deterministic (a bad revision stays bad): no retries."""
    return run_command(["git", "checkout", rev, "--", "data.dvc"], repo, f"git checkout {rev} -- data.dvc")


@task(name="dvc-pull", task_run_name="dvc-pull", cache_policy=NO_CACHE, log_prints=True, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_jitter_factor=0.2)
def pull_data(repo: str) -> str:
    """Transient (remote storage): retried with backoff 5, 10, 20 s."""
    return run_command([_exe("dvc"), "pull", "data.dvc"], repo, "dvc pull data.dvc")


@task(name="dvc-stage", task_run_name="dvc-{stage}", cache_policy=NO_CACHE, log_prints=True)
def run_stage(stage: str, repo: str, overrides: list[str] | None = None) -> dict:
    """One DVC stage; DVC decides whether it is stale. Deterministic work (validation, training): no retries.

    NO_CACHE: Prefect's cache key would hash only the arguments, not the files DVC tracks."""
    if overrides:
        cmd = [_exe("dvc"), "exp", "run", "--single-item", stage, *(a for o in overrides for a in ("-S", o))]
    else:
        cmd = [_exe("dvc"), "repro", "--single-item", stage]
    output = run_command(cmd, repo, f"stage '{stage}'")
    skipped = "didn't change, skipping" in output and "Running stage" not in output
    return {"stage": stage, "status": "skipped (unchanged)" if skipped else "ran"}


@task(name="register", task_run_name="register", cache_policy=NO_CACHE, log_prints=True, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.2)
def register_model(repo: str) -> str:
    """`es2 register`: the challenger version. Transient (registry over the network; idempotent per run)."""
    return run_command([*es2_command(), "register"], repo, "es2 register")


# ------------------------------------------------------------------------------------------ markdown reports


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(metrics: dict) -> str:
    """Markdown table of a flat metrics dict; `baseline/KEY` values go beside KEY."""
    keys = [k for k in metrics if not k.startswith("baseline/")]
    has_base = any(f"baseline/{k}" in metrics for k in keys)
    head = "| metric | model | baseline |\n|---|---:|---:|" if has_base else "| metric | value |\n|---|---:|"
    rows = []
    for k in sorted(keys):
        row = f"| `{k}` | {_fmt(metrics[k])} |"
        if has_base:
            base = f"baseline/{k}"
            row += f" {_fmt(metrics[base]) if base in metrics else ''} |"
        rows.append(row)
    return "\n".join([head, *rows])


def run_summary(repo: Path, results: list[dict]) -> str:
    lines = ["# es2 pipeline run", "", "| stage | status |", "|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} |" for r in results]
    links = [f"- [{name}]({(repo / rel).resolve().as_uri()})" for name, rel in REPORTS.items() if (repo / rel).exists()]
    if links:
        lines += ["", "## Reports", *links]
    return "\n".join(lines)


@task(name="publish-reports", task_run_name="publish-reports", cache_policy=NO_CACHE)
def publish_reports(repo: str, results: list[dict]) -> None:
    root = Path(repo)
    create_markdown_artifact(key="es2-run-summary", markdown=run_summary(root, results),
                             description="stages run or skipped, and links to their reports")
    metrics_path = root / EVAL_METRICS
    if any(r["stage"] == "evaluate" for r in results) and metrics_path.exists():
        report = root / REPORTS["evaluation report"]
        link = f"[report.html]({report.resolve().as_uri()})" if report.exists() else "(no report.html)"
        verdict = ""
        if (metrics_path.parent / "headline.json").exists():  # the answer first: safer or not, and the cost
            from es2.results import render

            verdict = render(metrics_path.parent) + "\n\n"
        md = (f"# Evaluation\n\n{verdict}Full report: {link}\n\n"
              f"{metrics_table(json.loads(metrics_path.read_text()))}")
        create_markdown_artifact(key="es2-evaluation-metrics", markdown=md, description=str(metrics_path))


# ------------------------------------------------------------------------------------------------------ flow


def _run_id() -> str:
    name, run_id = flow_run.get_name(), flow_run.get_id()
    return f"{name}/{run_id[:8]}" if name and run_id else (name or run_id or f"pid-{os.getpid()}")


@flow(name="es2-pipeline", log_prints=True)
def pipeline(repo: str = ".", stages: list[str] = DVC_STAGES, register: bool = True,
             params_overrides: dict | None = None, model: str | None = None, data_rev: str | None = None):
    """validate -> pairs -> align -> train -> evaluate through DVC, then register (see module doc)."""
    root = str(Path(repo).resolve())
    unknown = [s for s in stages if s not in DVC_STAGES]
    if unknown:
        return Failed(message=f"unknown stage(s) {unknown}; the DVC stages are {DVC_STAGES}")
    overrides = override_args(params_overrides, model)
    try:
        lock = RunLock(root, _run_id()).acquire()
    except RunLocked as exc:
        return Failed(message=str(exc))
    with lock:
        if data_rev:
            checkout_data(root, data_rev)
            pull_data(root)
        results: list[dict] = []
        for i, stage in enumerate(stages):
            try:
                results.append(run_stage(stage, root, overrides))
            except StepFailed as exc:
                skipped = stages[i + 1:] + (["register"] if register else [])
                what = "data validation failed" if stage == "validate" else f"stage '{stage}' failed"
                not_run = f"not run: {', '.join(skipped)}" if skipped else "it was the last stage"
                return Failed(message=f"{what} ({not_run}):\n{tail(exc.output)}")
        publish_reports(root, results)
        summary = {"stages": {r["stage"]: r["status"] for r in results}}
        if register:
            # register only: promotion belongs to the CI workflow alone (one retraining path, README), so a
            # flow run and a CI run never both move `champion`
            summary["register"] = register_model(root)
            create_markdown_artifact(key="es2-registration",
                                     markdown=f"# Registration\n\n```\n{summary['register'].strip()}\n```")
    return summary


if __name__ == "__main__":
    pipeline()
