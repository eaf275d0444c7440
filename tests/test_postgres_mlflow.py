"""MLflow tracking on PostgreSQL (the team setup's backend store, deploy/docker-compose.team.yml), against a
real PostgreSQL server: a throwaway cluster on 127.0.0.1, a free port, password auth, stopped by PID.

Skipped with the reason when no server binaries are installed (`apt-get install -y postgresql`; .ci/run
installs it when apt is available) or psycopg2 is missing (`pip install psycopg2-binary==2.9.13`).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

PASSWORD = "es2-test-password"
USER = "es2"
DATABASE = "mlflow_test"


def _server_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl, else the ones on PATH."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()]
    if found:
        return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    return Path(initdb).resolve().parent if initdb and pg_ctl else None


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` (or `nobody`) user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def postgres():
    """A running cluster: yields the SQLAlchemy URL of an empty database; stopped by PID and removed after."""
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server not installed; .ci/run installs it with apt when available")
    psycopg2 = pytest.importorskip("psycopg2",
                                   reason="psycopg2 not installed (pip install psycopg2-binary==2.9.13)")
    owner = _run_as()
    # under /tmp itself: test temp dirs are private to the (root) test process; the server user enters this
    root = Path(tempfile.mkdtemp(prefix="es2-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    data, log, pwfile = root / "data", root / "server.log", root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    as_user = {}
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PGDATA", None)
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                    f"--pwfile={pwfile}", "--encoding=UTF8", "--no-sync"], check=True, capture_output=True,
                   env=env, cwd=root, **as_user)
    port = free_port()
    started = subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                              "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start"],
                             capture_output=True, text=True, env=env, cwd=root, **as_user)
    pid = None
    try:
        server_log = log.read_text() if log.exists() else ""
        assert started.returncode == 0, started.stdout + started.stderr + server_log
        pid = int((data / "postmaster.pid").read_text().split()[0])
        conn = psycopg2.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD, dbname="postgres")
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()
        yield {"url": f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{port}/{DATABASE}", "port": port,
               "psycopg2": psycopg2}
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # "fast" shutdown: disconnect clients, stop cleanly
            if not _wait_gone(pid, 30):
                os.kill(pid, signal.SIGQUIT)
                _wait_gone(pid, 10)
        shutil.rmtree(root, ignore_errors=True)


SCRIPT = textwrap.dedent("""
    import json, sys
    import mlflow

    uri, artifacts = sys.argv[1], sys.argv[2]
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("es2-postgres", artifact_location=artifacts)
    with mlflow.start_run(experiment_id=experiment_id, run_name="pg") as run:
        mlflow.log_params({"train.kl_weight": 0.5, "train.method": "es2"})
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            mlflow.log_metric("train/loss", loss, step=step)
        mlflow.log_metric("asr/direct/jbb", 0.1)
        mlflow.set_tag("git_commit", "abc123")
        mlflow.log_text("hello", "notes/hello.txt")
    client = mlflow.MlflowClient()
    back = client.get_run(run.info.run_id)
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    found = mlflow.search_runs([experiment_id], filter_string="params.`train.method` = 'es2'",
                               output_format="list")
    print(json.dumps({"run_id": run.info.run_id, "status": back.info.status, "params": back.data.params,
                      "metrics": back.data.metrics, "tags": {"git_commit": back.data.tags.get("git_commit")},
                      "history": history, "found": [r.info.run_id for r in found],
                      "tracking_uri": mlflow.get_tracking_uri(),
                      "artifacts": [f.path for f in client.list_artifacts(run.info.run_id, "notes")]}))
""")


def test_mlflow_logs_and_reads_back_a_run_on_postgresql(postgres, tmp_path):
    # a child process: set_tracking_uri is global and SQLAlchemy engines are cached per process
    done = subprocess.run([sys.executable, "-c", SCRIPT, postgres["url"], (tmp_path / "artifacts").as_uri()],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tracking_uri"].startswith("postgresql://")
    assert result["status"] == "FINISHED"
    assert result["params"] == {"train.kl_weight": "0.5", "train.method": "es2"}
    assert result["metrics"] == {"train/loss": 0.25, "asr/direct/jbb": 0.1}
    assert result["history"] == [1.0, 0.5, 0.25]
    assert result["tags"]["git_commit"] == "abc123"
    assert result["found"] == [result["run_id"]]
    assert result["artifacts"] == ["notes/hello.txt"]

    # the run lives in PostgreSQL's tables (MLflow's schema, migrated by MLflow on first use)
    psycopg2 = postgres["psycopg2"]
    conn = psycopg2.connect(postgres["url"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT key, value FROM params WHERE run_uuid = %s ORDER BY key", (result["run_id"],))
            assert cur.fetchall() == [("train.kl_weight", "0.5"), ("train.method", "es2")]
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'",
                        (result["run_id"],))
            assert cur.fetchone()[0] == 3
    finally:
        conn.close()
