"""MLflow tracking and model registry. The only module in es2 that imports mlflow.

- `log_pipeline_run(params, artifacts_dir)`: one MLflow run per pipeline run (params, per-stage metrics, the
  training curve, plots, the HTML report, DVC hashes and the git commit as tags) with the model logged as an
  `ES2Model` pyfunc. Idempotent: a finished run with the same `es2.pipeline_key` is reused. What the run
  records is read by `es2.run_record`; this module only sends it.
- `register(run_id, model_name)`: a new registry version pointed at by the `challenger` alias; idempotent per
  run; a registration that fails midway is rolled back (the version is deleted).
- `promote(model_name, gates)`: moves `champion` to the challenger only when every gate passes (the gate
  arithmetic is `es2.gates`; the DSR gain is a paired test on both runs' `evaluate/outcomes.json`).
- `download_model("models:/NAME@ALIAS" | "models:/NAME/VERSION")`: the registered model's `base`, `tokenizer`
  and `adapter` folders, downloaded once per version into `$ES2_CACHE/registry/` (for `es2 evaluate`).

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working directory with
artifacts under `mlruns/`. An HTTP server that does not answer is retried with backoff, then reported as an
`ES2Error` naming the URI and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # else it writes ~/.config/mlflow/telemetry.json

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from es2.errors import ConfigError, ES2Error
from es2.config import GateParams, RegistryParams
from es2.gates import Decision, decide
from es2.run_record import flatten_params, logged_files, pipeline_key, run_metrics, version_tags

KEY_TAG = "es2.pipeline_key"
MODEL_TAG = "es2.model_uri"
STATUS_TAG = "es2.registration"  # pending -> complete; the `challenger` alias is set last (the commit point)
PROMOTION_TAG = "es2.promotion"
OUTCOMES = "evaluate/outcomes.json"  # per-prompt outcomes, logged by log_pipeline_run with the evaluate stage
CHALLENGER, CHAMPION = "challenger", "champion"
MODEL_NAME_IN_RUN = "model"
GENERATION_DEFAULTS = {"max_new_tokens": 32, "batch_size": 16}
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# connection: URI, retries, errors


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded store `sqlite:///<cwd>/mlflow.db` (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):])


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For the embedded store: `mlruns/<experiment>` beside the database. Servers choose their own."""
    db = _sqlite_file(uri)
    if db is None:
        return None
    return (db.resolve().parent / "mlruns" / _safe_name(experiment)).as_uri()


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _fix(uri: str) -> str:
    if _is_http(uri):
        port = re.search(r":(\d+)", uri.split("//", 1)[1])
        return ("start the server (mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 "
                f"--port {port.group(1) if port else 5000}), point MLFLOW_TRACKING_URI at one that runs, or "
                "unset MLFLOW_TRACKING_URI to use the embedded sqlite:///mlflow.db")
    return ("check that the database file is writable and not locked by another process "
            "(for concurrent writers run an mlflow server and set MLFLOW_TRACKING_URI)")


def _reachable(uri: str, timeout: float = 3.0) -> tuple[bool, str]:
    if not _is_http(uri):
        return True, ""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        return False, type(exc).__name__
    return response.status_code == 200, f"HTTP {response.status_code}"


def _wait_for_server(uri: str, reg: RegistryParams) -> None:
    """Retry `/health` with exponential backoff; an `ES2Error` naming the URI when it never answers."""
    started, detail = time.monotonic(), ""
    for attempt in range(reg.retries + 1):
        ok, detail = _reachable(uri)
        if ok:
            return
        if attempt < reg.retries:
            time.sleep(reg.backoff_seconds * 2**attempt)
    raise ES2Error(f"the MLflow tracking server at {uri} is unreachable ({detail}) after {reg.retries + 1} "
                   f"attempts over {time.monotonic() - started:.1f} s", _fix(uri))


@contextmanager
def _http_policy(reg: RegistryParams) -> Iterator[None]:
    """MLflow's own HTTP retries (read per request) from the params, unless the user set them in the env."""
    policy = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(reg.retries),  # the factor is parsed as an int
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(round(reg.backoff_seconds)),
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(reg.backoff_seconds / 2),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(reg.timeout_seconds)}
    added = {k: v for k, v in policy.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextmanager
def _session(reg: RegistryParams) -> Iterator[tuple[MlflowClient, str]]:
    uri = tracking_uri()
    with _http_policy(reg):
        if _is_http(uri):
            _wait_for_server(uri, reg)
        elif (db := _sqlite_file(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _short(exc: BaseException, limit: int = 300) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _connection_lost(exc: BaseException) -> bool:
    import requests

    text = str(exc)
    return isinstance(exc, (requests.ConnectionError, ConnectionError)) or any(
        s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish",
                            "Connection aborted", "RemoteDisconnected"))


def _as_error(exc: BaseException, uri: str, what: str, extra: str = "") -> ES2Error:
    if isinstance(exc, ES2Error):
        return ES2Error(exc.problem + extra, exc.hint) if extra else exc
    if _is_http(uri) and (_connection_lost(exc) or not _reachable(uri)[0]):
        return ES2Error(f"the MLflow tracking server at {uri} stopped answering while {what} "
                        f"({_short(exc)}){extra}", _fix(uri))
    return ES2Error(f"MLflow failed while {what} at {uri}: {_short(exc)}{extra}", _fix(uri))


def _converts(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, (ES2Error, MlflowException, requests.RequestException, OSError))


@contextmanager
def _guard(uri: str, what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if _converts(exc) and not isinstance(exc, ES2Error):
            raise _as_error(exc, uri, what) from exc
        raise


# ------------------------------------------------------------------------------------------------------------
# the pyfunc model


class ES2Model(mlflow.pyfunc.PythonModel):
    """Base model + peft adapter (or a full model) + tokenizer; `predict` generates greedily for `prompt`s."""

    def load_context(self, context):  # MLflow passes context/model_input/params by keyword
        import torch

        model, self.tokenizer = load_packaged(context.artifacts, context.model_config or {})
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input, params=None):
        from es2.generation import generate

        options = {**GENERATION_DEFAULTS, **(params or {})}
        return generate(self.model, self.tokenizer, _prompts(model_input),
                        max_new_tokens=int(options["max_new_tokens"]), batch_size=int(options["batch_size"]),
                        progress=False)


def load_packaged(artifacts: dict, config: dict):
    """(model, tokenizer) in eval mode from a packaged es2 model's folders (`base`, `tokenizer`, and `adapter`
    when LoRA-trained) with the dtype and trust_remote_code it was logged with: what `ES2Model` serves and
    what `es2 evaluate --model models:/...` evaluates."""
    from es2.modeling import load_causal_lm

    model, tokenizer = load_causal_lm(str(artifacts["base"]), dtype=config.get("dtype", "float32"),
                                      trust_remote_code=bool(config.get("trust_remote_code")),
                                      tokenizer_from=str(artifacts["tokenizer"]))
    if "adapter" in artifacts:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(artifacts["adapter"]))
    return model.eval(), tokenizer


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        if "prompt" not in model_input.columns:
            raise ValueError(f"the input needs a 'prompt' column (got {list(model_input.columns)})")
        return [str(p) for p in model_input["prompt"]]
    return [str(p) for p in model_input]


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec(k, "long", v) for k, v in GENERATION_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def pip_requirements() -> list[str]:
    """Exact pins of what loading and generating needs (installed versions; no inference, no torchvision)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate",
                    "pandas", "jinja2", "tqdm", "pydantic", "pyyaml", "requests"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # drop local tags such as +cpu
        except PackageNotFoundError:
            continue
    return pins


def _package_copy(staging: Path) -> str:
    """The es2 package without caches, bundled with the model so that it loads where es2 is not installed."""
    import shutil

    target = staging / "code" / "es2"
    shutil.copytree(Path(__file__).resolve().parent, target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return str(target)


def _model_artifacts(params, artifacts_dir: Path, staging: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Local folders for the pyfunc: base (clean HF folder), adapter (if peft), tokenizer."""
    from es2.modeling import load_causal_lm, load_tokenizer, resolve_model_path
    from es2.stages.train import base_model_path

    trained = artifacts_dir / "train" / "adapter"
    base = base_model_path(params)
    if (trained / "adapter_config.json").exists():
        base_dir = Path(resolve_model_path(base))
        if not base_dir.is_dir():  # an HF id in the local cache: materialise it
            model, _ = load_causal_lm(base, params.model.revision, params.model.trust_remote_code,
                                      params.model.dtype)
            base_dir = staging / "base"
            model.save_pretrained(base_dir)
        artifacts = {"base": str(base_dir), "adapter": str(trained)}
        tokenizer_source = str(base_dir)
    else:  # full fine-tune: the folder is the model
        artifacts = {"base": str(trained)}
        tokenizer_source = str(trained) if (trained / "tokenizer_config.json").exists() else base
    load_tokenizer(tokenizer_source, trust_remote_code=params.model.trust_remote_code).save_pretrained(
        staging / "tokenizer")
    artifacts["tokenizer"] = str(staging / "tokenizer")
    config = {"dtype": params.model.dtype, "trust_remote_code": params.model.trust_remote_code,
              "base_model": str(base)}
    return artifacts, config


# ------------------------------------------------------------------------------------------------------------
# logging a pipeline run (what it records: es2.run_record)


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _log_contents(client: MlflowClient, run_id: str, params_dict: dict, artifacts_dir: Path,
                  root: Path, stage_files: list[tuple[str, Path]]) -> None:
    now = int(time.time() * 1000)
    flat = flatten_params(params_dict)
    for chunk in _batches([Param(k, v) for k, v in sorted(flat.items())], 100):
        client.log_batch(run_id, params=chunk)
    metrics = [Metric(key, value, now, step) for key, value, step in run_metrics(artifacts_dir)]
    for chunk in _batches(metrics, 1000):
        client.log_batch(run_id, metrics=chunk)
    for stage, path in stage_files:
        client.log_artifact(run_id, str(path), artifact_path=stage)
    for name in ("params.yaml", "dvc.lock", "dvc.yaml"):
        if (root / name).exists():
            client.log_artifact(run_id, str(root / name), artifact_path="pipeline")
    client.log_dict(run_id, params_dict, "pipeline/params.resolved.json")


def log_pipeline_run(params, artifacts_dir: str | Path = "artifacts", *, root: str | Path = ".",
                     registry: RegistryParams | None = None) -> str:
    """Log one pipeline run (params, metrics, curve, plots, report, versions, pyfunc model); return its id.

    Reuses the finished run whose `es2.pipeline_key` matches (same params, dvc.lock, base and artifact bytes).
    """
    reg = registry or params.registry
    root, artifacts_dir = Path(root), Path(artifacts_dir)
    trained = artifacts_dir / "train" / "adapter"
    evaluated = artifacts_dir / "evaluate" / "metrics.json"
    for needed, stage in ((trained, "train"), (evaluated, "evaluate")):
        if not needed.exists():
            raise ES2Error(f"{needed} is missing, so there is nothing to log",
                           f"run `es2 {stage}` (or `dvc repro`)")
    from es2.stages.train import base_model_path

    params_dict = params.model_dump(mode="json", by_alias=True)
    params_json = json.dumps(params_dict, sort_keys=True)
    stage_files = logged_files(artifacts_dir)
    model_files = [f for f in sorted(trained.rglob("*")) if f.is_file()]
    key = pipeline_key(params_json, root, artifacts_dir, [f for _, f in stage_files] + model_files,
                       str(base_model_path(params)))
    tags = {KEY_TAG: key, "es2.params_sha256": hashlib.sha256(params_json.encode()).hexdigest(),
            "es2.method": params.train.method, "es2.base_model": str(base_model_path(params)),
            **version_tags(root)}

    with _session(reg) as (client, uri), _guard(uri, "logging the pipeline run"):
        experiment_id = _experiment_id(client, reg.experiment, uri)
        query = f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
        found = client.search_runs([experiment_id], query, max_results=5)
        reusable = [r for r in found if r.data.tags.get(MODEL_TAG)]
        if reusable:
            return reusable[0].info.run_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{key[:8]}", tags=tags) as run:
            run_id = run.info.run_id
            _log_contents(client, run_id, params_dict, artifacts_dir, root, stage_files)
            with tempfile.TemporaryDirectory(prefix="es2-pyfunc-") as staging:
                artifacts, config = _model_artifacts(params, artifacts_dir, Path(staging))
                with warnings.catch_warnings():  # an input example would load and run the model at log time
                    warnings.filterwarnings("ignore", message=".*input example.*")
                    info = mlflow.pyfunc.log_model(
                        name=MODEL_NAME_IN_RUN, python_model=ES2Model(), artifacts=artifacts,
                        signature=model_signature(), pip_requirements=pip_requirements(),
                        code_paths=[_package_copy(Path(staging))], model_config=config)
            client.set_tag(run_id, MODEL_TAG, info.model_uri)  # last: marks the run as complete
        return run_id


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:  # created concurrently
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# ------------------------------------------------------------------------------------------------------------
# registry


def _alias_version(client: MlflowClient, name: str, alias: str):
    """The version an alias points at, or None. (Search results omit aliases: always resolve by alias.)"""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (*_MISSING, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _require_registered_model(client: MlflowClient, name: str, uri: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise ES2Error(f"no registered model '{name}' at {uri}",
                           "run `es2 register` first, or point MLFLOW_TRACKING_URI at the registry holding it"
                           ) from exc
        raise


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    return list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _MISSING:
            raise
        try:
            client.create_registered_model(name, description="es2 models; `champion` is served, "
                                                             "`challenger` awaits `es2 promote`")
        except MlflowException as again:
            if again.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise


def register(run_id: str, model_name: str, *, registry: RegistryParams | None = None) -> str:
    """Register the run's model as a new version with alias `challenger`; return the version.

    Idempotent per run: a completed version of this run is returned (and `challenger` re-pointed at it);
    leftovers of an interrupted registration of this run are deleted first. On failure after the version was
    created, the version is deleted again (retried while the server comes back) so no half-registered version
    stays; if the server stays away, the error names it and the next `register` of the run finishes it (when
    it was complete) or removes it. The `challenger` alias is moved last, so it never points at a partial one.
    """
    reg = registry or RegistryParams()
    with _session(reg) as (client, uri):
        with _guard(uri, f"reading run {run_id}"):
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if exc.error_code in _MISSING:
                    raise ES2Error(f"run {run_id} does not exist at {uri}",
                                   "log the pipeline first (es2 register does) or check MLFLOW_TRACKING_URI"
                                   ) from exc
                raise
        model_uri = run.data.tags.get(MODEL_TAG)
        if not model_uri:
            raise ES2Error(f"run {run_id} has no es2 model logged (tag {MODEL_TAG} missing)",
                           "log the pipeline run with es2.tracking.log_pipeline_run (es2 register does)")
        with _guard(uri, f"registering run {run_id} as '{model_name}'"):
            _ensure_registered_model(client, model_name)
            done = []
            for version in _versions_of_run(client, model_name, run_id):
                if version.tags.get(STATUS_TAG) == "complete" and version.status == "READY":
                    done.append(version)
                else:  # an interrupted registration of this run
                    client.delete_model_version(model_name, version.version)
            if done:
                version = max(done, key=lambda v: int(v.version)).version
                client.set_registered_model_alias(model_name, CHALLENGER, version)
                return str(version)
        return _new_version(client, uri, reg, model_name, run_id, model_uri, run.data.tags.get(KEY_TAG, ""))


def _new_version(client: MlflowClient, uri: str, reg: RegistryParams, name: str, run_id: str, model_uri: str,
                 key: str) -> str:
    created: list[str] = []
    try:
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags={STATUS_TAG: "pending", KEY_TAG: key},
            model_id=model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None,
            await_creation_for=max(60, reg.timeout_seconds))
        created.append(str(version.version))
        if version.status != "READY":
            raise ES2Error(f"model version {version.version} of '{name}' ended in status {version.status} "
                           f"({version.status_message})", "check the tracking server's log")
        client.set_model_version_tag(name, version.version, STATUS_TAG, "complete")
        client.set_registered_model_alias(name, CHALLENGER, version.version)  # the commit point
        return str(version.version)
    except BaseException as exc:
        left = _roll_back(client, uri, reg, name, run_id, created)
        if not _converts(exc):
            raise
        extra = (f"; version {', '.join(left)} could not be deleted and is NOT the challenger: register the "
                 "run again once the server answers, which finishes or removes it" if left else
                 "; the partly registered version was deleted")
        raise _as_error(exc, uri, f"registering run {run_id} as '{name}'", extra) from exc


def _roll_back(client: MlflowClient, uri: str, reg: RegistryParams, name: str, run_id: str,
               created: list[str]) -> list[str]:
    """Delete the versions of this run (none was complete when the registration began); retried with backoff
    while the server is down. Returns the versions that could not be deleted."""
    for attempt in range(reg.retries + 1):
        if _reachable(uri)[0]:
            try:
                versions = {str(v.version) for v in _versions_of_run(client, name, run_id)} | set(created)
                for version in sorted(versions, key=int):
                    try:
                        client.delete_model_version(name, version)
                    except MlflowException as exc:
                        if exc.error_code not in _MISSING:
                            raise
                return []
            except Exception as exc:  # noqa: BLE001 - the server went away again: retry
                _log.debug("rollback attempt %d failed: %s", attempt + 1, _short(exc))
        if attempt < reg.retries:
            time.sleep(reg.backoff_seconds * 2**attempt)
    return created or ["(unknown)"]


# ------------------------------------------------------------------------------------------------------------
# promotion (the gate decision: es2.gates)


def promote(model_name: str, gates: GateParams | None = None, *,
            registry: RegistryParams | None = None) -> Decision:
    """Move `champion` to the `challenger` version only when every gate passes; never otherwise."""
    reg = registry or RegistryParams()
    gates = gates or reg.gates
    with _session(reg) as (client, uri), _guard(uri, f"promoting '{model_name}'"):
        _require_registered_model(client, model_name, uri)
        challenger = _alias_version(client, model_name, CHALLENGER)
        if challenger is None:
            raise ES2Error(f"'{model_name}' has no '{CHALLENGER}' version at {uri}",
                           "run `es2 register` first")
        if challenger.tags.get(STATUS_TAG) != "complete":
            raise ES2Error(f"'{model_name}' v{challenger.version} is only partly registered",
                           "run `es2 register` again for its run")
        champion = _alias_version(client, model_name, CHAMPION)
        ch_metrics = client.get_run(challenger.run_id).data.metrics
        if champion is not None and str(champion.version) == str(challenger.version):
            rows, _ = decide(ch_metrics, None, gates)
            return Decision(False, model_name, str(challenger.version), str(champion.version), rows,
                            [f"v{challenger.version} is already the champion; register a new challenger"])
        cp_metrics = client.get_run(champion.run_id).data.metrics if champion is not None else None
        outcomes = ((_run_outcomes(client, uri, challenger.run_id), _run_outcomes(client, uri, champion.run_id))
                    if champion is not None else (None, None))
        rows, reasons = decide(ch_metrics, cp_metrics, gates, *outcomes)
        promoted = all(r.passed for r in rows)
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, challenger.version)
            reasons = [f"all {len(rows)} gates pass"] + (
                ["no champion yet: relative gates skipped, absolute gates decided"] if champion is None
                else [])
        client.set_model_version_tag(model_name, challenger.version, PROMOTION_TAG,
                                     "promoted" if promoted else "rejected: " + "; ".join(reasons)[:5000])
        return Decision(promoted, model_name, str(challenger.version),
                        str(champion.version) if champion is not None else None, rows, reasons)


def _run_outcomes(client: MlflowClient, uri: str, run_id: str) -> dict | None:
    """The run's evaluate/outcomes.json, or None when it has none (older runs; es2.gates then says so)."""
    # Looked up before downloading: a missing artifact raises differently on each artifact store.
    if OUTCOMES not in {f.path for f in client.list_artifacts(run_id, Path(OUTCOMES).parent.as_posix())}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OUTCOMES, dst_path=tmp,
                                                    tracking_uri=uri)
        text = Path(local).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ES2Error(f"run {run_id}: {OUTCOMES} is not valid JSON ({exc.msg})",
                       "evaluate the model again and register the new run") from exc


def alias_version(model_name: str, alias: str, *, registry: RegistryParams | None = None) -> str | None:
    """The version number an alias points at (None when unset)."""
    reg = registry or RegistryParams()
    with _session(reg) as (client, uri), _guard(uri, f"reading alias '{alias}' of '{model_name}'"):
        version = _alias_version(client, model_name, alias)
        return None if version is None else str(version.version)


# ------------------------------------------------------------------------------------------------------------
# downloading a registered model (es2 evaluate --model models:/...)

_REGISTERED_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
_ALIAS_FIX = {CHAMPION: "run `es2 promote` (it moves champion to the challenger when the gates pass)",
              CHALLENGER: "run `es2 register`"}


def load_registered_model(model_uri: str, registry: RegistryParams | None = None):
    """(model, tokenizer) of a registered es2 model (`download_model`, then `load_packaged` with the logged
    dtype and trust_remote_code)."""
    return load_packaged(*_downloaded(model_uri, registry))


def download_model(model_uri: str, registry: RegistryParams | None = None) -> dict[str, Path]:
    """Local folders of a registered es2 model, keyed as logged: `base`, `tokenizer` and, when LoRA-trained,
    `adapter`. `model_uri` is `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    The alias is resolved on every call (it moves); the files are downloaded once per version into
    `$ES2_CACHE/registry/`, into a temp folder beside that is renamed into place only when complete, so an
    interrupted download is never reused.
    """
    return _downloaded(model_uri, registry)[0]


def _downloaded(model_uri: str, registry: RegistryParams | None) -> tuple[dict[str, Path], dict]:
    """The registered model's artifact folders and logged model_config, downloaded (see `download_model`)."""
    from es2.modeling import cache_dir

    match = _REGISTERED_URI.fullmatch(model_uri.strip())
    if match is None:
        raise ConfigError(f"{model_uri} is not a registered model URI",
                          "write models:/NAME@ALIAS (e.g. models:/es2@champion) or models:/NAME/VERSION")
    name, alias, number = match.group("name", "alias", "version")
    reg = registry or RegistryParams()
    try:
        with _session(reg) as (client, uri), _guard(uri, "downloading the model"):
            version = _registered_version(client, uri, name, alias, number)
            # Keyed by what the version points at, so another registry's "v1" never hits this one's files.
            digest = hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:12]
            target = cache_dir() / "registry" / f"{_safe_name(name)}-v{version.version}-{digest}"
            if not target.is_dir():
                _download_once(f"models:/{name}/{version.version}", target, uri)
        return _pyfunc(target)  # inside the try: a model that is not an es2 pyfunc is refused with the URI
    except ES2Error as exc:  # evaluate loads several models: say which one failed
        raise type(exc)(f"{model_uri}: {exc.problem}", exc.hint) from exc


def _registered_version(client: MlflowClient, uri: str, name: str, alias: str | None, number: str | None):
    _require_registered_model(client, name, uri)
    if alias is not None:
        version = _alias_version(client, name, alias)
        if version is None:
            raise ES2Error(f"no version of '{name}' has alias '{alias}' at {uri}", _ALIAS_FIX.get(
                alias, f"use models:/{name}@{CHAMPION}, @{CHALLENGER} or models:/{name}/<version>"))
        return version
    try:
        return client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise ES2Error(f"'{name}' has no version {number} at {uri}",
                           f"use an existing version (see `mlflow ui`) or models:/{name}@{CHAMPION}") from exc
        raise


def _download_once(source: str, target: Path, uri: str) -> None:
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        downloaded = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging),
                                                         tracking_uri=uri, registry_uri=uri)
        try:
            Path(downloaded).rename(target)
        except OSError:
            if not target.is_dir():  # else a concurrent download of the same version finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _pyfunc(model_dir: Path) -> tuple[dict[str, Path], dict]:
    """The artifact folders as the pyfunc flavor records them (MLflow chooses the layout inside the model) and
    the model_config it was logged with."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    artifacts = {key: model_dir / entry["path"] for key, entry in flavor.get("artifacts", {}).items()}
    if not {"base", "tokenizer"} <= artifacts.keys():
        raise ES2Error("not an es2 model (its pyfunc has no base and tokenizer artifacts)",
                       "register a pipeline run with `es2 register`")
    return artifacts, flavor.get("model_config") or {}
