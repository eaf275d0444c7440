"""Loading a registered model (es2 evaluate --model models:/...), downloaded once per version."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from es2.config import RegistryParams
from es2.errors import ConfigError, ES2Error
from es2.tracking.connection import MISSING, safe_name, session
from es2.tracking.model import load_packaged
from es2.tracking.registry import CHALLENGER, CHAMPION

REGISTERED_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


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
        with session(registry, "downloading the model") as (client, uri):
            version = _registered_version(client, uri, name, alias, number)
            # Keyed by what the version points at, so another registry's "v1" never hits this one's files.
            digest = hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:12]
            target = cache_dir() / "registry" / f"{safe_name(name)}-v{version.version}-{digest}"
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
