"""Shared test setup: offline environment, paths to the optional shared datasets, small record fixtures."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

# Offline and quiet before any library import reads them. Tests never touch the network or the user's home.
_TMP = Path(tempfile.mkdtemp(prefix="es2-tests-"))
for key, value in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("ES2_CACHE", str(_TMP / "cache"))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture
def shared_datasets() -> Path:
    """The development datasets beside the checkout; tests needing them skip when absent (e.g. in a bare CI)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (only present on the development machine)")
    return SHARED_DATASETS


def make_records(label: str, n: int, stem: str) -> list[dict]:
    """n distinct, valid records of one label, with prompts that share no word 3-grams across stems."""
    return [
        {"id": f"{stem}-{i}", "prompt": f"{stem} request number {i}: please {stem} item {i * 7919 % 1000}",
         "label": label, "source": "fixture", "category": stem}
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer random Llama with a chat-template tokenizer (no download)."""
    from tests.tiny_model import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The tiny model and its tokenizer, loaded once per test module on one thread (the attack tests share it;
    a module that needs a fresh model per test defines its own `lm`)."""
    import torch

    from es2.modeling import load_causal_lm

    torch.set_num_threads(1)
    return load_causal_lm(str(tiny_model_dir))


def tiny_params(params: dict, model_dir: Path) -> dict:
    """params.yaml shrunk to seconds on the tiny model: every stage still runs for real (align writes its
    disabled marker; evaluate runs the direct and injection attacks at s = 0, so depth.csv has rows)."""
    params["model"]["name_or_path"] = str(model_dir)
    params["align"]["enabled"] = False
    params["train"].update(layers=[1, 2], steps=2, batch_size=4, logging_steps=1, save_steps=2)
    params["evaluate"].update(model="artifacts/train/adapter", baseline=None, attacks=["direct", "injection"],
                              injection_steps=[0], injection_tokens=2, limit=2, max_new_tokens=4,
                              layers=[1, 2])
    return params


def tool_path(name: str) -> str | None:
    """A command-line tool from this venv's bin (pip-installed linters), else from PATH; None when absent."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for the servers tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
