"""MLflow tracking and the model registry against a real `mlflow server` on 127.0.0.1, with a tiny Llama + a
perturbed LoRA adapter and realistic stage metrics: the pyfunc model reloads exactly, registering is
idempotent, promotion is gated, and a failed or interrupted registration (the server lost behind a TCP proxy)
leaves no half-registered version. The tests that need no server are in tests/test_tracking_local.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from es2 import tracking
from es2.errors import ES2Error
from tests.conftest import free_port
from tests.tracking_support import PROMPTS, REG, alias, log_and_register, log_run, pipeline, versions
from tests.tracking_support import _client_tmpdir  # noqa: F401 - autouse fixture: importing it applies it


# ------------------------------------------------------------------------------------------------ fixtures


class Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri, self.ready = f"http://127.0.0.1:{self.port}", False
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        env = {**os.environ, "TMPDIR": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(root / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen(
            [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait(self, timeout: float = 150) -> None:
        import requests

        if self.ready:
            return

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    self.ready = True
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
        self.stop()
        pytest.fail(f"mlflow server did not become healthy at {self.uri}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we started: server + uvicorn worker
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(autouse=True, scope="module")
def _server_boot(tmp_path_factory):
    """Start the server (about 10-25 s) as soon as this module runs: every test here needs it (the tests that
    do not are in tests/test_tracking_local.py, so selecting only those starts no server)."""
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_server_boot):
    _server_boot.wait()
    return _server_boot


class FlakyProxy:
    """A TCP forwarder in front of the server: `down()` refuses new connections and drops open ones (what a
    client sees when the server dies), `up()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target, self.port = target_port, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def proxy(mlflow_server, monkeypatch):
    p = FlakyProxy(mlflow_server.port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", p.uri)
    yield p
    p.down()


@pytest.fixture
def on_server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server


# ------------------------------------------------------------------------------------------------ tests


def test_pyfunc_reloads_exactly_and_generates(on_server, trained, tiny_model_dir, tmp_path):
    import pandas as pd
    import torch
    from peft import PeftModel

    from es2.generation import generate

    _, model, tokenizer = trained
    _, version = log_and_register(trained, tiny_model_dir, tmp_path, "tiny-exact")
    assert version == "1"
    loaded = mlflow.pyfunc.load_model("models:/tiny-exact@challenger")
    inner = loaded.unwrap_python_model()
    assert isinstance(inner.model, PeftModel)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**batch).logits, inner.model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter matters, so the comparison below means something
    assert (ours - theirs).abs().max() < 1e-6

    out = loaded.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 3})
    assert list(out) == generate(model, tokenizer, PROMPTS, max_new_tokens=3, progress=False)
    assert list(out) != generate(model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)  # honoured
    sig = loaded.metadata.get_params_schema()
    assert {p.name for p in sig.params} == {"max_new_tokens", "batch_size"}


def test_register_is_idempotent(on_server, trained, tiny_model_dir, tmp_path):
    params, art = pipeline(trained, tiny_model_dir, tmp_path)
    run_id = log_run(params, art, root=tmp_path)
    assert log_run(params, art, root=tmp_path) == run_id
    first = tracking.register(run_id, "tiny-idem", registry=REG)
    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-idem", asr=0.1)
    assert alias("tiny-idem", "challenger") == "2"
    assert tracking.register(run_id, "tiny-idem", registry=REG) == first  # same version, alias re-pointed
    assert alias("tiny-idem", "challenger") == first
    assert set(versions("tiny-idem")) == {"1", "2"}


def test_promote_first_champion_then_a_better_challenger(on_server, trained, tiny_model_dir, tmp_path):
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-promote")
    first = tracking.promote("tiny-promote", registry=REG)
    assert first.promoted and first.champion_version is None
    assert any("skipped" in row.threshold for row in first.table)
    assert alias("tiny-promote", "champion") == "1"

    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-promote", asr=0.1, effort=4.0)
    second = tracking.promote("tiny-promote", registry=REG)
    print(second.table_text())
    assert second.promoted and (second.champion_version, second.challenger_version) == ("1", "2")
    gain = next(r for r in second.table if r.gate == "dsr_gain")
    assert gain.passed and gain.challenger > gain.champion
    assert alias("tiny-promote", "champion") == "2"
    assert "PROMOTED" in second.table_text()


def test_failing_challenger_never_becomes_champion(on_server, trained, tiny_model_dir, tmp_path):
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-gate")
    assert tracking.promote("tiny-gate", registry=REG).promoted
    worse_run, _ = log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-gate", asr=0.4, kl=0.9)
    decision = tracking.promote("tiny-gate", registry=REG)
    text = decision.table_text()
    print(text)
    assert not decision.promoted and "NOT PROMOTED" in text
    assert {r.gate for r in decision.table if not r.passed} == {"dsr_gain", "kl"}
    assert any(r.startswith("kl:") for r in decision.reasons)
    assert alias("tiny-gate", "champion") == "1"
    assert alias("tiny-gate", "challenger") == "2"
    assert versions("tiny-gate")["2"][tracking.PROMOTION_TAG].startswith("rejected")
    # Promoting again changes nothing; a failing first challenger does not become champion either.
    assert not tracking.promote("tiny-gate", registry=REG).promoted
    assert tracking.register(worse_run, "tiny-gate-fresh", registry=REG) == "1"
    fresh = tracking.promote("tiny-gate-fresh", registry=REG)
    assert not fresh.promoted and alias("tiny-gate-fresh", "champion") is None


def _fail_alias_with(monkeypatch, before_call):
    original = mlflow.MlflowClient.set_registered_model_alias

    def set_alias(self, name, alias, version):
        before_call()
        return original(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", set_alias)
    return lambda: monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", original)


def test_failure_between_create_and_alias_deletes_the_version(on_server, trained, tiny_model_dir, tmp_path,
                                                               monkeypatch):
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-rollback")
    params, art = pipeline(trained, tiny_model_dir, tmp_path / "b", asr=0.1)
    run_id = log_run(params, art, root=tmp_path / "b")

    def boom():
        raise mlflow.exceptions.MlflowException("injected failure before the alias")

    restore = _fail_alias_with(monkeypatch, boom)
    with pytest.raises(ES2Error, match="partly registered version was deleted"):
        tracking.register(run_id, "tiny-rollback", registry=REG)
    restore()
    assert set(versions("tiny-rollback")) == {"1"}  # version 2 was created, then deleted
    assert alias("tiny-rollback", "challenger") == "1"
    assert tracking.register(run_id, "tiny-rollback", registry=REG) == "3"


def test_server_lost_mid_registration_leaves_no_half_registered_version(proxy, trained, tiny_model_dir,
                                                                        tmp_path, monkeypatch):
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-lost")
    params, art = pipeline(trained, tiny_model_dir, tmp_path / "b", asr=0.1)
    run_id = log_run(params, art, root=tmp_path / "b")

    # 1. The server dies after the version is created and comes back while MLflow retries the rollback.
    from urllib3.util.retry import Retry

    state = {"lost": False, "rolling_back": False}
    versions_of_run, sleep = tracking.registry._versions_of_run, Retry.sleep

    def lose_server():
        state["lost"] = True
        proxy.down()

    def rollback_starts(*args):
        state["rolling_back"] = state["lost"]
        return versions_of_run(*args)

    def comes_back(self, *args):
        if state["rolling_back"]:
            proxy.up()
        return sleep(self, *args)

    restore = _fail_alias_with(monkeypatch, lose_server)
    monkeypatch.setattr(tracking.registry, "_versions_of_run", rollback_starts)
    monkeypatch.setattr(Retry, "sleep", comes_back)
    with pytest.raises(ES2Error) as err:
        tracking.register(run_id, "tiny-lost", registry=REG)
    assert proxy.uri in str(err.value) and "unreachable" in str(err.value)
    assert "partly registered version was deleted" in str(err.value)
    monkeypatch.setattr(Retry, "sleep", sleep)
    assert set(versions("tiny-lost")) == {"1"}
    assert alias("tiny-lost", "challenger") == "1"

    # 2. The server stays down through the rollback: the error names the leftover, which is not the
    #    challenger, and the next registration of the run finishes the job.
    with pytest.raises(ES2Error) as err:
        tracking.register(run_id, "tiny-lost", registry=REG)
    assert "could not be deleted" in str(err.value) and "NOT the challenger" in str(err.value)
    restore()
    proxy.up()
    assert alias("tiny-lost", "challenger") == "1"
    version = tracking.register(run_id, "tiny-lost", registry=REG)
    assert alias("tiny-lost", "challenger") == version
    left = versions("tiny-lost")
    assert all(tags[tracking.STATUS_TAG] == "complete" for tags in left.values())
    query = f"name = 'tiny-lost' and run_id = '{run_id}'"
    assert len(mlflow.MlflowClient().search_model_versions(query)) == 1
