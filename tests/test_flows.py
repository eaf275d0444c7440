"""The Prefect flow against a real `prefect server` on 127.0.0.1, on a throwaway git+DVC project.

One server per module (about 15 s to start on 2 cores); the deployment is served from a subprocess exactly as
`es2 serve` does. The project runs only the cheap data stages (validate, pairs) with the repo's sample data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from es2.locking import RunLock
from tests.conftest import REPO, free_port, tiny_params

DEPLOYMENT = "es2-pipeline/retrain"
STAGES = ["validate", "pairs"]
BIN = Path(sys.executable).parent
# Prefect's parameter model warns that the flow parameter `register` shadows a pydantic attribute; it works.
pytestmark = pytest.mark.filterwarnings('ignore:Field name "register":UserWarning')


def _sh(*cmd, cwd, env=None):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def make_project(root: Path, stages: list[str] = STAGES, tiny_model: Path | None = None) -> Path:
    """git + DVC repo with `stages` of the real dvc.yaml and the sample data pulled; with `tiny_model`, params
    shrunk to run on it (`tests.conftest.tiny_params`)."""
    root.mkdir(parents=True)
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: dvc_yaml["stages"][s] for s in stages}}))
    for rel in ["params.yaml", "data.dvc", ".dvc/config", "dvc-store", "es2"]:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    if tiny_model is not None:
        params = tiny_params(yaml.safe_load((root / "params.yaml").read_text()), tiny_model)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n")
    (root / ".gitignore").write_text("/data\n/artifacts\n/.es2\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    _sh("git", "init", "-q", cwd=root)
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=root)
    _sh(str(BIN / "dvc"), "pull", "-q", "data.dvc", cwd=root, env=env)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flows")


@pytest.fixture(scope="module")
def prefect_env(workdir) -> dict[str, str]:
    """Environment of the server, the serving process and its flow runs."""
    (workdir / "tmp").mkdir()
    return {**os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(workdir / "tmp"),
            "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PREFECT_LOGGING_LEVEL": "WARNING", "DO_NOT_TRACK": "1",
            "ES2_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout:.0f} s" + (f":\n{log.read_text()[-3000:]}" if log else ""))


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def api_url(workdir, prefect_env):
    """`prefect server start` on a free port; the test process talks to it through temporary settings."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    port = free_port()
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=prefect_env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 90, "prefect server",
                    proc, log)
        with temporary_settings({PREFECT_API_URL: url, PREFECT_HOME: prefect_env["PREFECT_HOME"]}):
            yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def project(workdir) -> Path:
    return make_project(workdir / "project")


@pytest.fixture(scope="module")
def served(api_url, project, prefect_env, workdir):
    """`flows.serve.main()` in a subprocess (what `es2 serve` runs), serving es2-pipeline/retrain for `project`."""
    from prefect import get_client

    log = workdir / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", f"from flows.serve import main; main(repo={str(project)!r})"],
                                cwd=REPO, env={**prefect_env, "PREFECT_API_URL": api_url}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        def deployment():
            with get_client(sync_client=True) as client:
                return client.read_deployment_by_name(DEPLOYMENT)

        yield _wait_until(deployment, 90, "served deployment", proc, log)
    finally:
        _stop(proc)


def _task_run_names(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


# ------------------------------------------------------------------------------------------ real server


def test_served_deployment_runs_on_demand_and_leaves_promotion_to_ci(served):
    assert not served.schedules and served.parameters["register"] is False  # .github/workflows/retrain.yml's
    assert {"repo", "stages", "register", "params_overrides", "model", "data_rev"} <= set(served.parameters)


def test_triggered_run_completes_and_writes_dvc_lock(served, project):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, parameters={"repo": str(project), "stages": STAGES, "register": False},
                         timeout=240)
    assert run.state.is_completed(), run.state.message
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert json.loads((project / "artifacts/pairs/stats.json").read_text())["splits"]["train"]["pairs"] > 0
    with RunLock(project, "next-run"):  # released
        pass
    assert _task_run_names(run.id) == ["dvc-pairs", "dvc-validate", "publish-reports"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    summary = next(a for a in artifacts if a.key == "es2-run-summary")
    assert "| validate | ran |" in summary.data and "| pairs | ran |" in summary.data
    assert "similarity.png" in summary.data


def test_second_run_skips_unchanged_stages(api_url, project):
    """In-process run (same server): DVC finds nothing stale after the triggered run."""
    from flows.pipeline import pipeline

    lock_before = (project / "dvc.lock").read_text()
    result = pipeline(repo=str(project), stages=STAGES, register=False)
    assert result["stages"] == {s: "skipped (unchanged)" for s in STAGES}
    assert (project / "dvc.lock").read_text() == lock_before


def test_overrides_run_as_dvc_experiments(api_url, project):
    from flows.pipeline import pipeline

    result = pipeline(repo=str(project), stages=STAGES, register=False, params_overrides={"pairs": {"seed": 1}})
    assert result["stages"] == {"validate": "skipped (unchanged)", "pairs": "ran"}
    assert yaml.safe_load((project / "params.yaml").read_text())["pairs"]["seed"] == 1  # as `dvc exp run -S`
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["pairs"]["params"]["params.yaml"]["pairs"]["seed"] == 1
    assert _sh("git", "for-each-ref", "refs/exps", cwd=project).strip()  # recorded as experiments


def test_switching_train_method_trains_on_trajectories_through_the_flow(api_url, workdir, tiny_model_dir):
    """Issue 6: `train.method` switched by a flow parameter runs the trajectory method through DVC (tiny model)."""
    from flows.pipeline import pipeline

    stages = ["validate", "pairs", "align", "train"]
    project = make_project(workdir / "train-project", stages, tiny_model_dir)
    result = pipeline(repo=str(project), stages=stages, register=False,
                      params_overrides={"train": {"method": "es2_trajectory"}})
    assert result["stages"] == {stage: "ran" for stage in stages}
    assert json.loads((project / "artifacts/train/metrics.json").read_text())["method"] == "es2_trajectory"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["method"] == "es2_trajectory"


def test_data_rev_checks_out_and_pulls_data_first(api_url, project):
    from flows.pipeline import pipeline

    state = pipeline(repo=str(project), stages=["validate"], register=False, data_rev="HEAD", return_state=True)
    assert state.is_completed(), state.message
    assert _task_run_names(state.state_details.flow_run_id) == [
        "checkout-data-HEAD", "dvc-pull", "dvc-validate", "publish-reports"]


def test_concurrent_run_fails_fast_with_the_lock_holder(api_url, project):
    from flows.pipeline import pipeline

    with RunLock(project, "busy-run/1234"):
        state = pipeline(repo=str(project), stages=STAGES, register=False, return_state=True)
    assert state.is_failed()
    assert f"locked by run busy-run/1234 (pid {os.getpid()} on {socket.gethostname()}" in state.message
    assert _task_run_names(state.state_details.flow_run_id) == []


def test_failed_validation_fails_the_run_and_nothing_after_it_runs(api_url, workdir):
    from flows.pipeline import pipeline

    bad = make_project(workdir / "bad")
    harmful = bad / "data/train/harmful.jsonl"
    harmful.write_bytes(harmful.read_bytes() + b'{"id": "bad", "prompt": "   ", "label": "harmful", "source": "t"}\n')
    state = pipeline(repo=str(bad), stages=STAGES, register=True, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("data validation failed (not run: pairs, register)")
    assert "Data validation FAILED" in state.message  # the validation summary itself
    assert _task_run_names(state.state_details.flow_run_id) == ["dvc-validate"]
    assert not (bad / "artifacts/pairs").exists()
    with RunLock(bad, "next-run"):  # released
        pass


def test_transient_step_is_retried_then_succeeds_or_reports(api_url, tmp_path, monkeypatch):
    """register is a transient step: a flaky `es2 register` succeeds on its third try; one that keeps failing
    ends Failed after 1 + 3 tries with its output in the state."""
    import flows.pipeline as fp
    from prefect import flow

    counter = tmp_path / "calls"
    script = tmp_path / "flaky.py"
    script.write_text("import sys, pathlib\n"
                      "p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1 if p.exists() else 1\n"
                      "p.write_text(str(n))\n"
                      "if n < int(sys.argv[2]): sys.exit(print(f'registry unreachable (try {n})') or 3)\n"
                      "print('registered version 1')\n")

    @flow(name="es2-register-retry-test")
    def register_only(repo: str):
        return fp.register_model.with_options(retry_delay_seconds=0, retry_jitter_factor=None)(repo)

    monkeypatch.setattr(fp, "es2_command", lambda: [sys.executable, str(script), str(counter), "3"])
    assert "registered version 1" in register_only(str(tmp_path))
    assert counter.read_text() == "3"

    counter.unlink()
    monkeypatch.setattr(fp, "es2_command", lambda: [sys.executable, str(script), str(counter), "99"])
    state = register_only(str(tmp_path), return_state=True)
    assert state.is_failed() and counter.read_text() == "4"
    assert "registry unreachable (try 4)" in state.message


def test_register_registers_and_never_promotes(api_url, tmp_path, monkeypatch):
    """The flow's register step is `es2 register` alone: the CI workflow is the one promoter (README)."""
    import flows.pipeline as fp

    calls = tmp_path / "calls"
    script = tmp_path / "es2.py"
    script.write_text("import sys\nwith open(sys.argv[1], 'a') as f:\n    f.write(' '.join(sys.argv[2:]) + '\\n')\n"
                      "print('registered version 1')\n")
    monkeypatch.setattr(fp, "es2_command", lambda: [sys.executable, str(script), str(calls)])
    result = fp.pipeline(repo=str(tmp_path), stages=[], register=True)
    assert calls.read_text() == "register\n"
    assert result == {"stages": {}, "register": "registered version 1"}


# ------------------------------------------------------------------------------------------ no server


def test_only_transient_steps_retry_with_backoff():
    from flows.pipeline import checkout_data, pull_data, register_model, run_stage

    for transient in (pull_data, register_model):
        assert transient.retries == 3
        delays = transient.retry_delay_seconds
        assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
    for deterministic in (run_stage, checkout_data):
        assert deterministic.retries == 0


def test_override_args_flatten_and_quote():
    from flows.pipeline import override_args

    assert override_args({"train.steps": 5, "pairs": {"seed": 1, "strategy": "random"}, "train.layers": [1, 2]},
                         model="my/model") == ["train.steps=5", "pairs.seed=1", "pairs.strategy=random",
                                               "train.layers=[1, 2]", "model.name_or_path=my/model"]
    assert override_args(None) == []


def test_python_m_flows_run_hands_its_flags_to_the_flow(monkeypatch):
    """What `es2 run --no-register --set ...` starts; the flow's state decides the exit status."""
    import flows.pipeline as fp
    from flows.__main__ import main

    calls, completed = [], [True, False]

    class State:
        name, message = "fake-run", "done"

        @staticmethod
        def is_completed():
            return completed.pop(0)

    monkeypatch.setattr(fp, "pipeline", lambda **kwargs: calls.append(kwargs) or State)
    assert main(["run", "--no-register", "--set", "train.steps=3"]) == 0
    assert main(["run"]) == 1
    assert calls == [{"repo": ".", "register": False, "params_overrides": {"train.steps": "3"}, "return_state": True},
                     {"repo": ".", "register": True, "params_overrides": None, "return_state": True}]


def test_metrics_table_puts_baseline_beside_the_model():
    from flows.pipeline import metrics_table

    table = metrics_table({"asr/direct/jbb": 0.125, "baseline/asr/direct/jbb": 0.5, "seconds": 12.0})
    assert "| `asr/direct/jbb` | 0.125 | 0.5 |" in table
    assert "| `seconds` | 12 |  |" in table
    assert "baseline/" not in table


def test_prefect_yaml_deploys_to_a_process_pool_on_demand(api_url, prefect_env, workdir):
    """`prefect deploy --all` accepts prefect.yaml (deployment renamed so it does not replace the served one)."""
    from prefect import get_client

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (retrain,) = spec["deployments"]
    assert retrain["work_pool"]["name"] == "es2-process"
    retrain["name"] = "retrain-pool"
    here = workdir / "deploy"
    shutil.copytree(REPO / "flows", here / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (here / "prefect.yaml").write_text(yaml.safe_dump(spec))
    env = {**prefect_env, "PREFECT_API_URL": api_url}
    _sh(str(BIN / "prefect"), "work-pool", "create", "es2-process", "--type", "process", cwd=here, env=env)
    _sh(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", cwd=here, env=env)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("es2-pipeline/retrain-pool")
    assert deployment.work_pool_name == "es2-process"
    assert not deployment.schedules
    assert deployment.parameters["stages"] == ["validate", "pairs", "align", "train", "evaluate"]
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(here)}}]
