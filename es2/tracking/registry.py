"""The model registry: `register` makes a logged run's model the `challenger` version (idempotent per run,
rolled back when it fails midway); `promote` moves `champion` to it only when every gate passes (the gate
decision: es2.gates)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from es2.config import GateParams, RegistryParams
from es2.errors import ES2Error
from es2.gates import Decision, decide
from es2.tracking.connection import CONVERTED, MISSING, failure, session
from es2.tracking.runs import KEY_TAG, MODEL_TAG

STATUS_TAG = "es2.registration"  # pending -> complete; the `challenger` alias is set last (the commit point)
PROMOTION_TAG = "es2.promotion"
OUTCOMES = "evaluate/outcomes.json"  # per-prompt outcomes, logged with the evaluate stage's files
CHALLENGER, CHAMPION = "challenger", "champion"


def register(run_id: str, model_name: str, *, registry: RegistryParams) -> str:
    """Register the run's model as a new version with alias `challenger`; return the version.

    Idempotent per run: a completed version of this run is returned (and `challenger` re-pointed at it);
    leftovers of an interrupted registration of this run are deleted first. A failure after the version was
    created deletes it again; when even that fails the error says so, and the next `register` of the run
    removes it. The `challenger` alias is moved last, so it never points at a partial version.
    """
    what = f"registering run {run_id} as '{model_name}'"
    with session(registry, what) as (client, uri):
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


def _versions_of_run(client: MlflowClient, name: str, run_id: str) -> list:
    return list(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))


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
            raise failure(exc, uri, what, reg, extra) from exc
        raise


def promote(model_name: str, gates: GateParams | None = None, *, registry: RegistryParams) -> Decision:
    """Move `champion` to the `challenger` version only when every gate passes; never otherwise."""
    gates = gates or registry.gates
    with session(registry, f"promoting '{model_name}'") as (client, uri):
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


def _alias_version(client: MlflowClient, name: str, alias: str):
    """The version an alias points at, or None (also when there is no such registered model). Search results
    omit aliases: always resolve by alias."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (*MISSING, "INVALID_PARAMETER_VALUE"):
            return None
        raise


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
