# The image Prefect's Docker worker runs flow runs in: the es2 image plus DVC's S3 plugin (the team remote,
# deploy/dvc-s3-remote.md), with a pass-through entrypoint: the worker passes `prefect flow-run execute ...` as the
# command, which the cpu target's ENTRYPOINT ["es2"] would swallow.
#   docker build --target cpu -t es2:cpu . && docker build -f deploy/prefect-flow.Dockerfile -t es2-flow:cpu .
# GPU pools: docker build --target gpu -t es2:gpu . && docker build -f deploy/prefect-flow.Dockerfile \
#              --build-arg ES2_IMAGE=es2:gpu -t es2-flow:gpu .
ARG ES2_IMAGE=es2:cpu
# hadolint ignore=DL3006
FROM ${ES2_IMAGE}
USER 0
# dvc-s3 3.3.0 resolves against requirements.lock to s3fs 2026.9.0 (= the locked fsspec), aiobotocore 3.10.0
RUN pip install --no-cache-dir -c /app/requirements.lock dvc-s3==3.3.0
# back to the es2 user (uid 1000) of the base image
USER 1000:1000
# each flow run works in a fresh clone made by the deployment's pull step (deploy/prefect-work-pool.yaml)
ENTRYPOINT []
CMD ["prefect", "version"]
