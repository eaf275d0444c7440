"""The connection to MLflow: the tracking URI, a client session with the retry policy, and the `ES2Error`
that an MLflow, HTTP or file failure becomes (naming the URI and the fix)."""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from es2.config import RegistryParams
from es2.errors import ES2Error

MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
CONVERTED = (MlflowException, OSError)  # what becomes an ES2Error (requests' errors are OSErrors)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded store `sqlite:///<cwd>/mlflow.db` (absolute path)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")


def safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and not uri.endswith(":memory:") else None


@contextmanager
def session(reg: RegistryParams, what: str) -> Iterator[tuple[MlflowClient, str]]:
    """A client on the tracking URI, with MLflow's HTTP retry policy taken from `reg` for the block (unless the
    environment sets it); MLflow, HTTP and file errors leave the block as an `ES2Error` saying `what` failed."""
    uri = tracking_uri()
    if (db := sqlite_file(uri)) is not None:
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
            raise failure(exc, uri, what, reg) from exc


def failure(exc: BaseException, uri: str, what: str, reg: RegistryParams, extra: str = "") -> ES2Error:
    """The `ES2Error` for `exc`, raised while `what` at `uri`: unreachable server or failed request, with the
    fix for a server or for the embedded store; `extra` is appended to the problem."""
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
