"""MLflow tracking, registry, gated promotion and loading registered models for `es2 evaluate`, against a real
`mlflow server` on 127.0.0.1 and the embedded sqlite store, with a tiny Llama + a perturbed LoRA adapter and
realistic stage metrics."""

from __future__ import annotations

import json
import os
import shutil
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
from es2.config import Params, load_params
from es2.errors import ES2Error
from es2.gates import decide
from tests.conftest import REPO, free_port

DEFAULTS = load_params(REPO / "params.yaml")
# fewer retries than params.yaml's, so that a failure path takes seconds
REG = DEFAULTS.registry.model_copy(update={"experiment": "es2-tests", "retries": 2, "timeout_seconds": 20})
PROMPTS = ["how do i bake bread for my family", "write a poem about the sea"]
GOOD = {"asr": 0.25, "effort": 3.0, "kl": 0.05, "over_refusal": 0.1, "mc": 0.3}
# each attack's ASR is the run's `asr` times this (capped at 1)
ASR_SCALE = {"direct": 1.0, "template_aim": 1.2, "prefill_k5": 1.4, "prefill_k10": 1.5, "prefill_k20": 1.6,
             "injection_s8": 1.3, "scav": 2.0, "gcg": 1.1}
JUDGES = ("jbb", "qi", "semantic")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True, scope="module")
def _client_tmpdir(tmp_path_factory):
    """MLflow's client stages models in the temp dir (and leaves some there over HTTP): use pytest's."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("client-tmp"))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env


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
def _server_boot(request, tmp_path_factory):
    """Start the server (about 10-25 s) as soon as this module runs, when any selected test needs it, so that
    its start overlaps the tests that do not."""
    if not any("mlflow_server" in item.fixturenames for item in request.session.items):
        yield None
        return
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


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished train stage: a perturbed (non-zero) LoRA on the tiny model, its metrics, curve and plot,
    the align metrics. Returns (template artifacts dir, in-memory peft model, tokenizer)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from es2.modeling import load_tokenizer
    from es2.stages.train import _save_curve

    art = tmp_path_factory.mktemp("pipeline") / "artifacts"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero: make the adapter change the logits
    model.eval()
    model.save_pretrained(art / "train" / "adapter")
    history = [{"step": s, "loss": 1.0 / s, "loss/separation": -0.5 * s, "loss/kl": 0.01 * s,
                "grad_norm": 2.0} for s in (5, 10, 15, 20)]
    _save_curve(history, art / "train")
    (art / "train" / "metrics.json").write_text(json.dumps({
        "method": "es2", "steps": 20, "world_size": 1, "heldout_dprime_base": 1.2,
        "heldout_dprime_trained": 2.9,
        "heldout_dprime_ratio": 2.42, "heldout_norm_change": 0.03, "heldout_kl_harmless": 0.004,
        "final_train_loss": 0.05, "wall_seconds": 42.0,
        "per_layer": {"base": {"dprime/mean": 1.2, "dprime/layer1": 1.1}, "trained": {"dprime/mean": 2.9}}}))
    (art / "align").mkdir()
    (art / "align" / "metrics.json").write_text(json.dumps({
        "enabled": True, "steps": 40,
        "before": {"examples": {"harmful": ["Sure, ..."]},
                   "refusal_jbb": {"rate": 0.125, "ci95": [0.04, 0.31], "n": 24}},
        "after": {"refusal_jbb": {"rate": 0.92, "ci95": [0.74, 0.98], "n": 24}}}))
    return art, model, load_tokenizer(str(tiny_model_dir))


def eval_metrics(asr: float, effort: float, kl: float, over_refusal: float, mc: float) -> dict:
    """evaluate/metrics.json as the stage writes it: flat keys, intervals as lists, a baseline block."""
    m: dict = {}
    for attack, scale in ASR_SCALE.items():
        for judge in JUDGES:
            rate = min(1.0, asr * scale)
            m[f"asr/{attack}/{judge}"] = rate
            m[f"asr/{attack}/{judge}_ci95"] = [max(0.0, rate - 0.15), min(1.0, rate + 0.15)]
            m[f"baseline/asr/{attack}/{judge}"] = min(1.0, 0.6 * scale)
    m.update({f"effort/{attack}/{k}": v for attack in ("repe", "scav", "softprompt")
              for k, v in [("median", effort), ("ci_low", effort / 2), ("ci_high", 2 * effort)]})
    m.update({"effort/scav/shift_rel_mean": 0.5, "baseline/effort/scav/median": 1.0, "effort/gcg/median": 10,
              "over_refusal/jbb/rate": over_refusal, "over_refusal/jbb/ci95": [0.0, over_refusal + 0.2],
              "over_refusal/qi/rate": over_refusal, "over_refusal/semantic/rate": over_refusal,
              "capability/kl_to_baseline": kl,
              "capability/mc_accuracy": mc,
              "capability/mc_n": 40, "capability/perplexity": 31.5, "capability/greedy_agreement": 0.8,
              "geometry/dprime/mean": 2.9, "baseline/geometry/dprime/mean": 1.2, "refusal_margin/mean": 1.4,
              "seconds": 321.0})
    return m


def eval_outcomes(asr: float, n: int = 40, **_) -> dict:
    """evaluate/outcomes.json matching eval_metrics: per attack, the first round(rate * n) of the same n prompts
    succeed, so a lower `asr` defends a superset of the prompts (a paired gain)."""
    def role(rate_of):
        return {"attacks": {a: {"family": a.split("_")[0], "prompts": [f"p{i:02d}" for i in range(n)],
                                "success": [i < round(rate_of(a) * n) for i in range(n)]} for a in ASR_SCALE},
                "benign": {"prompts": ["b0", "b1"], "refused": [False, False], "borderline": [False, True]},
                "mc": {"questions": ["q0"], "correct": [True]}}
    return {"judge": "semantic", "roles": {"model": role(lambda a: min(1.0, asr * ASR_SCALE[a])),
                                           "baseline": role(lambda a: min(1.0, 0.6 * ASR_SCALE[a]))}}


def pipeline(trained, tiny_model_dir, root: Path, outcomes: bool = True, **metrics) -> tuple[Params, Path]:
    """A pipeline's artifacts folder under root with the given evaluate metrics (and the matching outcomes.json
    unless `outcomes` is false); params for the tiny model."""
    art = root / "artifacts"
    shutil.copytree(trained[0], art)
    (art / "evaluate").mkdir()
    (art / "evaluate" / "metrics.json").write_text(json.dumps(eval_metrics(**{**GOOD, **metrics}), indent=2))
    if outcomes:
        (art / "evaluate" / "outcomes.json").write_text(json.dumps(eval_outcomes(**{**GOOD, **metrics})))
    (art / "evaluate" / "report.html").write_text("<!doctype html><title>es2 report</title><h1>ASR</h1>")
    shutil.copy(art / "train" / "curve.png", art / "evaluate" / "asr_jbb.png")
    return tiny_params(tiny_model_dir), art


def tiny_params(tiny_model_dir, **train) -> Params:
    """params.yaml for the tiny model (align off) with the tests' registry settings."""
    raw = DEFAULTS.model_dump(mode="json", by_alias=True)
    raw["model"]["name_or_path"], raw["align"]["enabled"], raw["registry"] = str(tiny_model_dir), False, \
        REG.model_dump(mode="json")
    raw["train"].update(layers=[1, 2], steps=20, **train)
    return Params.model_validate(raw)


def log_run(params: Params, art: Path, **kwargs) -> str:
    """The pipeline logged; the tiny model is the base (align is off)."""
    return tracking.log_pipeline_run(params, art, base_model=params.model.name_or_path, **kwargs)


def log_and_register(trained, tiny_model_dir, root: Path, name: str, outcomes: bool = True,
                     **metrics) -> tuple[str, str]:
    params, art = pipeline(trained, tiny_model_dir, root, outcomes, **metrics)
    run_id = log_run(params, art, root=root)
    return run_id, tracking.register(run_id, name, registry=REG)


def alias(name: str, which: str) -> str | None:
    """The version an alias points at, None when unset."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, which).version)
    except mlflow.exceptions.MlflowException:
        return None


def versions(name: str) -> dict[str, dict]:
    client = mlflow.MlflowClient()
    return {v.version: v.tags for v in client.search_model_versions(f"name = '{name}'")}


# ------------------------------------------------------------------------------------------------ tests


def test_embedded_sqlite_store_logs_everything_once(trained, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 98b7.dir\n  path: data\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train:\n    cmd: es2 train\n    outs:\n"
                                       "    - path: artifacts/train/adapter\n      md5: abc1.dir\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], cwd=tmp_path, check=True)
    params, art = pipeline(trained, tiny_model_dir, tmp_path)

    run_id = log_run(params, art)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "mlruns").is_dir()
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["train.method"] == "es2" and run.data.params["align.enabled"] == "false"
    assert json.loads(run.data.params["train.layers"]) == [1, 2]
    m = run.data.metrics
    assert m["evaluate/asr/direct/jbb"] == 0.25 and m["evaluate/asr/direct/jbb_ci95/1"] == pytest.approx(0.4)
    assert m["train/heldout_dprime_trained"] == 2.9 and m["train/per_layer/base/dprime/mean"] == 1.2
    assert m["align/after/refusal_jbb/rate"] == 0.92
    curve = mlflow.MlflowClient().get_metric_history(run_id, "train/curve/loss")
    assert [(h.step, round(h.value, 4)) for h in curve] == [(5, 0.2), (10, 0.1), (15, 0.0667), (20, 0.05)]
    tags = run.data.tags
    assert tags["dvc.data.data.md5"] == "98b7.dir"
    assert tags["dvc.train.artifacts/train/adapter.md5"] == "abc1.dir"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags[tracking.KEY_TAG]
    logged = {a.path for folder in ("train", "evaluate", "pipeline")
              for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}
    assert {"train/curve.png", "train/curve.csv", "evaluate/report.html", "evaluate/asr_jbb.png",
            "evaluate/outcomes.json", "pipeline/dvc.lock"} <= logged

    assert log_run(params, art) == run_id  # same pipeline: the same run
    assert tracking.register(run_id, "tiny-local", registry=REG) == "1"
    assert tracking.register(run_id, "tiny-local", registry=REG) == "1"
    assert alias("tiny-local", "challenger") == "1"

    # A full fine-tune (no adapter): the saved folder itself is the model.
    import torch
    from transformers import AutoModelForCausalLM

    shutil.rmtree(art / "train" / "adapter")
    shutil.copytree(tiny_model_dir, art / "train" / "adapter")
    full = tiny_params(tiny_model_dir, full_finetune=True)
    full_run = log_run(full, art)
    assert full_run != run_id
    uri = mlflow.MlflowClient().get_run(full_run).data.tags[tracking.MODEL_TAG]
    loaded = mlflow.pyfunc.load_model(uri)
    assert set(loaded.metadata.flavors["python_function"]["artifacts"]) == {"base", "tokenizer"}
    inner = loaded.unwrap_python_model()
    batch = trained[2](PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(**batch).logits
        assert (inner.model(**batch).logits - expected).abs().max() < 1e-6


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


def _embedded_store(tmp_path, monkeypatch) -> Path:
    """An sqlite registry and an es2 cache of this test's own; returns the registry download cache."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("ES2_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "registry"


def test_evaluate_loads_registered_models_once_per_version(trained, tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from peft import PeftModel

    from es2.generation import generate
    from es2.stages.evaluate import load_model

    cache = _embedded_store(tmp_path, monkeypatch)
    params, art = pipeline(trained, tiny_model_dir, tmp_path / "a")
    run_id = log_run(params, art, root=tmp_path / "a")
    tracking.register(run_id, "tiny-eval", registry=REG)
    assert tracking.promote("tiny-eval", registry=REG).promoted
    downloads = []
    download = mlflow.artifacts.download_artifacts

    def counted(**kwargs):
        downloads.append(kwargs["artifact_uri"])
        return download(**kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counted)
    local, local_tokenizer = load_model(str(art / "train" / "adapter"), params)
    batch = local_tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = local(**batch).logits
        with local.disable_adapter():
            assert (local(**batch).logits - expected).abs().max() > 1e-3  # so a missing adapter would show
    greedy = generate(local, local_tokenizer, PROMPTS, max_new_tokens=4, progress=False)
    for spec in ("models:/tiny-eval@champion", "models:/tiny-eval/1", "models:/tiny-eval@challenger"):
        model, tokenizer = load_model(spec, params)
        assert isinstance(model, PeftModel)
        with torch.no_grad():
            assert (model(**batch).logits - expected).abs().max() < 1e-6
        assert generate(model, tokenizer, PROMPTS, max_new_tokens=4, progress=False) == greedy
    assert downloads == ["models:/tiny-eval/1"]  # all three name version 1: downloaded once

    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-eval", asr=0.1)
    load_model("models:/tiny-eval@challenger", params)  # the alias moved to version 2
    assert downloads == ["models:/tiny-eval/1", "models:/tiny-eval/2"]
    cached = sorted(p.name for p in cache.iterdir())
    assert [name.rsplit("-", 1)[0] for name in cached] == ["tiny-eval-v1", "tiny-eval-v2"]


def test_registered_model_errors_name_the_uri_and_the_fix(trained, tiny_model_dir, tmp_path, monkeypatch):
    from es2.errors import ConfigError

    cache = _embedded_store(tmp_path, monkeypatch)
    log_and_register(trained, tiny_model_dir, tmp_path, "tiny-errors")
    for uri, words in (
            ("models:/tiny-errors@champion", ["alias 'champion'", "es2 promote"]),
            ("models:/tiny-errors@nightly", ["alias 'nightly'", "models:/tiny-errors@champion"]),
            ("models:/tiny-errors/9", ["no version 9"]),
            ("models:/tiny-nowhere@challenger", ["registered model 'tiny-nowhere'", "es2 register"])):
        with pytest.raises(ES2Error) as err:
            tracking.load_registered_model(uri, REG)
        assert all(w in str(err.value) for w in [uri, *words]), str(err.value)
    with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
        tracking.load_registered_model("models:/tiny-errors", REG)

    download = mlflow.artifacts.download_artifacts

    def interrupted(artifact_uri, dst_path, **kwargs):
        (Path(dst_path) / "MLmodel").write_text("flavors: {}\n")  # a partial download
        raise OSError("connection reset mid-download")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", interrupted)
    with pytest.raises(ES2Error, match="models:/tiny-errors@challenger: .*connection reset"):
        tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert list(cache.iterdir()) == []  # nothing left that a later call could trust
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    model, _ = tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert type(model).__name__ == "PeftModelForCausalLM" and len(list(cache.iterdir())) == 1

    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    with pytest.raises(ES2Error) as err:
        tracking.load_registered_model("models:/tiny-errors@challenger", REG)
    assert all(w in str(err.value) for w in ("models:/tiny-errors@challenger", down, "unreachable"))


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


def test_promote_decides_the_dsr_gain_on_the_logged_outcomes(trained, tiny_model_dir, tmp_path, monkeypatch):
    _embedded_store(tmp_path, monkeypatch)
    log_and_register(trained, tiny_model_dir, tmp_path / "a", "tiny-paired")
    assert tracking.promote("tiny-paired", registry=REG).promoted

    log_and_register(trained, tiny_model_dir, tmp_path / "b", "tiny-paired", effort=3.5)  # same outcomes
    same = tracking.promote("tiny-paired", registry=REG)
    gain = next(r for r in same.table if r.gate == "dsr_gain")
    assert not same.promoted and not gain.passed and "not shown (no gain, p = 1, n = 120 paired)" in gain.threshold
    assert alias("tiny-paired", "champion") == "1"

    log_and_register(trained, tiny_model_dir, tmp_path / "c", "tiny-paired", outcomes=False, asr=0.1)
    missing = tracking.promote("tiny-paired", registry=REG)
    assert not missing.promoted
    assert any("challenger's run has no evaluate/outcomes.json" in r and "same prompt files" in r
               for r in missing.reasons), missing.reasons

    log_and_register(trained, tiny_model_dir, tmp_path / "d", "tiny-paired", asr=0.1)
    better = tracking.promote("tiny-paired", registry=REG)
    print(better.table_text())
    gain = next(r for r in better.table if r.gate == "dsr_gain")
    assert better.promoted and gain.challenger > gain.champion and "shown (p = " in gain.threshold
    assert alias("tiny-paired", "champion") == "4"


def test_decide_gates_without_a_server():
    gates = REG.gates.model_copy(update={"attacks": ["direct", "scav"], "min_dsr": 0.5, "min_effort_gain": 1.1,
                                         "effort_attacks": ["scav"]})
    good = {f"evaluate/{k}": v for k, v in eval_metrics(**GOOD).items() if not isinstance(v, list)}
    rows, reasons = decide(good, None, gates)
    assert all(r.passed for r in rows) and not reasons  # DSR = 1 - (0.25 + 0.5) / 2 = 0.625
    assert next(r for r in rows if r.gate == "dsr").challenger == pytest.approx(0.625)
    lacking = {k: v for k, v in good.items() if "scav" not in k}
    rows, reasons = decide(lacking, good, gates)
    failed = {r.gate for r in rows if not r.passed}
    assert failed == {"dsr", "dsr_gain", "effort_gain_scav"} and len(reasons) == 3


def test_server_down_gives_a_clear_error_after_retries(trained, tiny_model_dir, tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params, art = pipeline(trained, tiny_model_dir, tmp_path)
    started = time.monotonic()
    with pytest.raises(ES2Error) as err:
        log_run(params, art, root=tmp_path)
    assert time.monotonic() - started >= 2.0  # MLflow's retries: at once, then after 2 x the backoff factor
    message = str(err.value)
    assert uri in message and "after 3 attempts" in message and "mlflow server" in message
    with pytest.raises(ES2Error, match="unreachable"):
        tracking.register("0" * 32, "tiny-down", registry=REG)
    with pytest.raises(ES2Error, match="unreachable"):
        tracking.promote("tiny-down", registry=REG)


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


def test_only_tracking_imports_mlflow():
    import re

    root = Path(tracking.__file__).resolve().parents[1]  # es2/
    pattern = re.compile(r"^\s*(import mlflow|from mlflow)", re.MULTILINE)
    importers = {p.relative_to(root).as_posix() for p in root.rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))}
    assert importers and {name.split("/")[0] for name in importers} == {"tracking"}
