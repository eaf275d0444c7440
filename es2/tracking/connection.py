"""MLflow tracking and model registry: the only module in es2 that imports mlflow.

`log_pipeline_run` logs one pipeline run (what `es2.run_record` reads: params, stage metrics, the training curve,
plots, the report, data and code versions) with the model as an `ES2Model` pyfunc, once per pipeline key.
`register` makes it a new version with the `challenger` alias (idempotent per run, rolled back when it fails
midway); `promote` moves `champion` to it only when every gate of `es2.gates` passes; `load_registered_model`
loads `models:/NAME@ALIAS` or `models:/NAME/VERSION` for `es2 evaluate`, downloaded once per version.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the working directory with
artifacts under `mlruns/`. MLflow's own HTTP client retries requests to a server (`registry.retries`,
`backoff_seconds`, `timeout_seconds`); what still fails becomes an `ES2Error` naming the URI and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # else it writes ~/.config/mlflow/telemetry.json

import mlflow
import mlflow.pyfunc
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from es2.config import GateParams, RegistryParams
from es2.errors import ConfigError, ES2Error
from es2.gates import Decision, decide
from es2.run_record import flatten_params, logged_files, pipeline_key, run_metrics, version_tags

KEY_TAG = "es2.pipeline_key"
MODEL_TAG = "es2.model_uri"  # set last: a run without it was interrupted while logging
STATUS_TAG = "es2.registration"  # pending -> complete; the `challenger` alias is set last (the commit point)
PROMOTION_TAG = "es2.promotion"
OUTCOMES = "evaluate/outcomes.json"  # per-prompt outcomes, logged with the evaluate stage's files
CHALLENGER, CHAMPION = "challenger", "champion"
GENERATION_DEFAULTS = {"max_new_tokens": 32, "batch_size": 16}
MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
CONVERTED = (MlflowException, OSError)  # what becomes an ES2Error (requests' errors are OSErrors)
REGISTERED_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


# ------------------------------------------------------------------------------------------------------------
# connection


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded store `sqlite:///<cwd>/mlflow.db` (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and not uri.endswith(":memory:") else None


@contextmanager
def _session(reg: RegistryParams, what: str) -> Iterator[tuple[MlflowClient, str]]:
    """A client on the tracking URI, with MLflow's HTTP retry policy taken from `reg` for the block (unless the
    environment sets it); MLflow, HTTP and file errors leave the block as an `ES2Error` saying `what` failed."""
    uri = tracking_uri()
    if (db := _sqlite_file(uri)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    policy = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(reg.retries),
              # MLflow reads the factor as whole seconds; urllib3 then waits 0, 2, 4, ... times it
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(math.ceil(reg.backoff_seconds)),
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": str(reg.backoff_seconds / 2),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(reg.timeout_seconds)}
    with mock.patch.dict(os.environ, {k: v for k, v in policy.items() if k not in os.environ}):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield MlflowClient(tracking_uri=uri, registry_uri=uri), uri
        except CONVERTED as exc:
            raise _error(exc, uri, what, reg) from exc


def _error(exc: BaseException, uri: str, what: str, reg: RegistryParams, extra: str = "") -> ES2Error:
    if (lost := _connection_error(exc)) is not None:
        problem = (f"the MLflow tracking server at {uri} is unreachable ({type(lost).__name__} while {what}, "
                   f"after {reg.retries + 1} attempts)")
    else:
        problem = f"MLflow failed while {what} at {uri}: {textwrap.shorten(str(exc), 300)}"
    if uri.startswith(("http://", "https://")):
        fix = (f"start the server (mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "
               f"{urlparse(uri).port or 5000}), point MLFLOW_TRACKING_URI at one that runs, or unset "
               "MLFLOW_TRACKING_URI to use the embedded sqlite:///mlflow.db")
    else:
        fix = ("check that the database file is writable and not locked by another process (for concurrent "
               "writers run an mlflow server and set MLFLOW_TRACKING_URI)")
    return ES2Error(problem + extra, fix)


def _connection_error(exc: BaseException | None) -> BaseException | None:
    """The connection error or timeout behind `exc`, if the server did not answer: MLflow raises an
    MlflowException once its retries are spent, with requests' error as the exception it was handling."""
    while exc is not None and not isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        exc = exc.__cause__ or exc.__context__
    return exc


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
        prompts = [str(p) for p in model_input["prompt"]]  # the signature makes every input a DataFrame
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=int(options["max_new_tokens"]),
                        batch_size=int(options["batch_size"]), progress=False)


def load_packaged(artifacts: dict, config: dict):
    """(model, tokenizer) in eval mode from a packaged es2 model's folders (`base`, `tokenizer`, and `adapter`
    when LoRA-trained) with the dtype and trust_remote_code it was logged with."""
    from es2.modeling import load_causal_lm

    model, tokenizer = load_causal_lm(str(artifacts["base"]), dtype=config.get("dtype", "float32"),
                                      trust_remote_code=bool(config.get("trust_remote_code")),
                                      tokenizer_from=str(artifacts["tokenizer"]))
    if "adapter" in artifacts:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(artifacts["adapter"]))
    return model.eval(), tokenizer


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec(k, "long", v) for k, v in GENERATION_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def _pip_requirements() -> list[str]:
    """Exact pins of what loading and generating needs: the installed versions without local tags such as
    +cpu (MLflow's inference would load the model at log time and pull in torchvision)."""
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}" for package in (
        "mlflow", "torch", "transformers", "peft", "tokenizers", "safetensors", "accelerate", "pandas", "jinja2",
        "tqdm", "pydantic", "pyyaml", "requests")]


def _model_artifacts(params, trained: Path, base: str, staging: Path) -> dict[str, str]:
    """Local folders for the pyfunc: base (an HF folder), adapter (when peft-trained), tokenizer, and the es2
    package (bundled so that the model loads where es2 is not installed)."""
    from es2.modeling import load_causal_lm, load_tokenizer, resolve_model_path

    if (trained / "adapter_config.json").exists():
        base_dir = Path(resolve_model_path(base))
        if not base_dir.is_dir():  # an HF id in the local cache: materialise it
            model, _ = load_causal_lm(base, params.model.revision, params.model.trust_remote_code,
                                      params.model.dtype)
            base_dir = staging / "base"
            model.save_pretrained(base_dir)
        artifacts, tokenizer_source = {"base": str(base_dir), "adapter": str(trained)}, str(base_dir)
    else:  # full fine-tune: the folder is the model
        artifacts = {"base": str(trained)}
        tokenizer_source = str(trained) if (trained / "tokenizer_config.json").exists() else base
    load_tokenizer(tokenizer_source, trust_remote_code=params.model.trust_remote_code).save_pretrained(
        staging / "tokenizer")
    shutil.copytree(Path(__file__).resolve().parent, staging / "code" / "es2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return {**artifacts, "tokenizer": str(staging / "tokenizer")}


# ------------------------------------------------------------------------------------------------------------
# logging a pipeline run (what it records: es2.run_record)


def log_pipeline_run(params, artifacts_dir: str | Path = "artifacts", *, base_model: str,
                     root: str | Path = ".") -> str:
    """Log one pipeline run (params, metrics, curve, plots, report, versions, pyfunc model); return its id.

    `base_model` is what training started from (the aligned base when align ran). Reuses the finished run
    whose `es2.pipeline_key` matches (same params, dvc.lock, base and artifact bytes).
    """
    root, artifacts_dir = Path(root), Path(artifacts_dir)
    trained = artifacts_dir / "train" / "adapter"
    for needed, stage in ((trained, "train"), (artifacts_dir / "evaluate" / "metrics.json", "evaluate")):
        if not needed.exists():
            raise ES2Error(f"{needed} is missing, so there is nothing to log", f"run `es2 {stage}` (or `dvc repro`)")
    params_dict = params.model_dump(mode="json", by_alias=True)
    params_json = json.dumps(params_dict, sort_keys=True)
    stage_files = logged_files(artifacts_dir)
    model_files = [f for f in sorted(trained.rglob("*")) if f.is_file()]
    key = pipeline_key(params_json, root, artifacts_dir, [f for _, f in stage_files] + model_files, base_model)
    tags = {KEY_TAG: key, "es2.params_sha256": hashlib.sha256(params_json.encode()).hexdigest(),
            "es2.method": params.train.method, "es2.base_model": base_model, **version_tags(root)}

    with _session(params.registry, "logging the pipeline run") as (client, uri):
        experiment_id = _experiment_id(client, params.registry.experiment, uri)
        query = f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'"
        for found in client.search_runs([experiment_id], query, max_results=5):
            if found.data.tags.get(MODEL_TAG):
                return found.info.run_id
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{key[:8]}", tags=tags) as run:
            run_id, now = run.info.run_id, int(time.time() * 1000)
            client.log_batch(run_id, params=[Param(k, v) for k, v in sorted(flatten_params(params_dict).items())],
                             metrics=[Metric(k, v, now, step) for k, v, step in run_metrics(artifacts_dir)])
            files = stage_files + [("pipeline", root / name) for name in ("params.yaml", "dvc.lock", "dvc.yaml")
                                   if (root / name).exists()]
            for folder, path in files:
                client.log_artifact(run_id, str(path), artifact_path=folder)
            client.log_dict(run_id, params_dict, "pipeline/params.resolved.json")
            with tempfile.TemporaryDirectory(prefix="es2-pyfunc-") as staging, warnings.catch_warnings():
                # an input example would load and run the model at log time
                warnings.filterwarnings("ignore", message=".*input example.*")
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=ES2Model(), signature=_signature(),
                    artifacts=_model_artifacts(params, trained, base_model, Path(staging)),
                    pip_requirements=_pip_requirements(), code_paths=[str(Path(staging) / "code" / "es2")],
                    model_config={"dtype": params.model.dtype, "trust_remote_code": params.model.trust_remote_code,
                                  "base_model": base_model})
            client.set_tag(run_id, MODEL_TAG, info.model_uri)
        return run_id


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = _sqlite_file(uri)  # the embedded store keeps artifacts in mlruns/ beside it; servers choose their own
        location = (db.resolve().parent / "mlruns" / _safe_name(name)).as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
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
    """The version an alias points at, or None (also when there is no such registered model). Search results
    omit aliases: always resolve by alias."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (*MISSING, "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    return list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))


def register(run_id: str, model_name: str, *, registry: RegistryParams) -> str:
    """Register the run's model as a new version with alias `challenger`; return the version.

    Idempotent per run: a completed version of this run is returned (and `challenger` re-pointed at it);
    leftovers of an interrupted registration of this run are deleted first. A failure after the version was
    created deletes it again; when even that fails the error says so, and the next `register` of the run
    removes it. The `challenger` alias is moved last, so it never points at a partial version.
    """
    what = f"registering run {run_id} as '{model_name}'"
    with _session(registry, what) as (client, uri):
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code in MISSING:
                raise ES2Error(f"run {run_id} does not exist at {uri}",
                               "log the pipeline first (es2 register does) or check MLFLOW_TRACKING_URI") from exc
            raise
        model_uri = run.data.tags.get(MODEL_TAG)
        if not model_uri:
            raise ES2Error(f"run {run_id} has no es2 model logged (tag {MODEL_TAG} missing)",
                           "log the pipeline run with es2.tracking.log_pipeline_run (es2 register does)")
        try:
            client.create_registered_model(model_name, description="es2 models; `champion` is served, "
                                                                   "`challenger` awaits `es2 promote`")
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        done = []
        for version in _versions_of_run(client, model_name, run_id):
            if version.tags.get(STATUS_TAG) == "complete" and version.status == "READY":
                done.append(int(version.version))
            else:  # left by an interrupted registration of this run
                client.delete_model_version(model_name, version.version)
        if done:
            client.set_registered_model_alias(model_name, CHALLENGER, str(max(done)))
            return str(max(done))
        return _new_version(client, uri, registry, what, model_name, run_id, model_uri,
                            run.data.tags.get(KEY_TAG, ""))


def _new_version(client: MlflowClient, uri: str, reg: RegistryParams, what: str, name: str, run_id: str,
                 model_uri: str, key: str) -> str:
    try:
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags={STATUS_TAG: "pending", KEY_TAG: key},
            model_id=model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None,
            await_creation_for=max(60, reg.timeout_seconds))
        if version.status != "READY":
            raise ES2Error(f"model version {version.version} of '{name}' ended in status {version.status} "
                           f"({version.status_message})", "check the tracking server's log")
        client.set_model_version_tag(name, version.version, STATUS_TAG, "complete")
        client.set_registered_model_alias(name, CHALLENGER, version.version)  # the commit point
        return str(version.version)
    except BaseException as exc:
        try:  # every version of this run: none was complete when the registration began
            for leftover in _versions_of_run(client, name, run_id):
                client.delete_model_version(name, leftover.version)
            extra = "; the partly registered version was deleted"
        except CONVERTED:
            extra = ("; the partly registered version could not be deleted and is NOT the challenger: register "
                     "the run again once the server answers, which removes it")
        if isinstance(exc, ES2Error):
            raise ES2Error(exc.problem + extra, exc.hint) from exc
        if isinstance(exc, CONVERTED):
            raise _error(exc, uri, what, reg, extra) from exc
        raise


# ------------------------------------------------------------------------------------------------------------
# promotion (the gate decision: es2.gates)


def promote(model_name: str, gates: GateParams | None = None, *, registry: RegistryParams) -> Decision:
    """Move `champion` to the `challenger` version only when every gate passes; never otherwise."""
    gates = gates or registry.gates
    with _session(registry, f"promoting '{model_name}'") as (client, uri):
        challenger = _alias_version(client, model_name, CHALLENGER)
        if challenger is None:
            raise ES2Error(f"'{model_name}' has no '{CHALLENGER}' version at {uri}", "run `es2 register` first")
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
        outcomes = ((_run_outcomes(client, challenger.run_id), _run_outcomes(client, champion.run_id))
                    if champion is not None else (None, None))
        rows, reasons = decide(ch_metrics, cp_metrics, gates, *outcomes)
        promoted = all(r.passed for r in rows)
        if promoted:
            client.set_registered_model_alias(model_name, CHAMPION, challenger.version)
            reasons = [f"all {len(rows)} gates pass"] + (
                ["no champion yet: relative gates skipped, absolute gates decided"] if champion is None else [])
        client.set_model_version_tag(model_name, challenger.version, PROMOTION_TAG,
                                     "promoted" if promoted else "rejected: " + "; ".join(reasons)[:5000])
        return Decision(promoted, model_name, str(challenger.version),
                        str(champion.version) if champion is not None else None, rows, reasons)


def _run_outcomes(client: MlflowClient, run_id: str) -> dict | None:
    """The run's evaluate/outcomes.json, or None when it has none (older runs; es2.gates then says so)."""
    # Looked up before downloading: a missing artifact raises differently on each artifact store.
    if OUTCOMES not in {f.path for f in client.list_artifacts(run_id, Path(OUTCOMES).parent.as_posix())}:
        return None
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{OUTCOMES}")
    except MlflowException as exc:
        if isinstance(exc.__cause__, json.JSONDecodeError):
            raise ES2Error(f"run {run_id}: {OUTCOMES} is not valid JSON",
                           "evaluate the model again and register the new run") from exc
        raise


# ------------------------------------------------------------------------------------------------------------
# loading a registered model (es2 evaluate --model models:/...)


def load_registered_model(model_uri: str, registry: RegistryParams):
    """(model, tokenizer) of a registered es2 model, with the dtype and trust_remote_code it was logged with.

    `model_uri` is `models:/NAME@ALIAS` (resolved on every call: aliases move) or `models:/NAME/VERSION`. The
    files are downloaded once per version into `$ES2_CACHE/registry/`, through a temp folder that is renamed
    into place only when complete, so an interrupted download is never reused.
    """
    from mlflow.models import Model

    from es2.modeling import cache_dir

    match = REGISTERED_URI.fullmatch(model_uri.strip())
    if match is None:
        raise ConfigError(f"{model_uri} is not a registered model URI",
                          "write models:/NAME@ALIAS (e.g. models:/es2@champion) or models:/NAME/VERSION")
    name, alias, number = match.group("name", "alias", "version")
    try:
        with _session(registry, "downloading the model") as (client, uri):
            version = _registered_version(client, uri, name, alias, number)
            # Keyed by what the version points at, so another registry's "v1" never hits this one's files.
            digest = hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:12]
            target = cache_dir() / "registry" / f"{_safe_name(name)}-v{version.version}-{digest}"
            if not target.is_dir():
                _download_once(f"models:/{name}/{version.version}", target, uri)
            flavor = Model.load(str(target)).flavors.get("python_function", {})  # MLflow's layout of the files
        artifacts = {key: target / entry["path"] for key, entry in flavor.get("artifacts", {}).items()}
        if not {"base", "tokenizer"} <= artifacts.keys():
            raise ES2Error("not an es2 model (its pyfunc has no base and tokenizer artifacts)",
                           "register a pipeline run with `es2 register`")
    except ES2Error as exc:  # evaluate loads several models: say which one failed
        raise type(exc)(f"{model_uri}: {exc.problem}", exc.hint) from exc
    return load_packaged(artifacts, flavor.get("model_config") or {})


def _registered_version(client: MlflowClient, uri: str, name: str, alias: str | None, number: str | None):
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as exc:
        if exc.error_code not in (*MISSING, "INVALID_PARAMETER_VALUE"):
            raise
        fix = {CHAMPION: "run `es2 promote` (it moves champion to the challenger when the gates pass)",
               CHALLENGER: "run `es2 register`"}.get(
            alias, f"use models:/{name}@{CHAMPION}, @{CHALLENGER} or an existing version (see `mlflow ui`)")
        which = f"version with alias '{alias}'" if alias else f"version {number}"
        raise ES2Error(f"no {which} of registered model '{name}' at {uri}", fix) from exc


def _download_once(source: str, target: Path, uri: str) -> None:
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
