# The team's MLflow tracking server: MLflow at the version es2 pins, the PostgreSQL driver and boto3 for the S3
# (MinIO) artifact store. Built by deploy/docker-compose.team.yml.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 MLFLOW_DISABLE_TELEMETRY=true
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.44.5 \
 && useradd --create-home --uid 1000 --user-group mlflow
# the mlflow user (uid 1000); numeric so that the host can verify it is not root
USER 1000:1000
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health')"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
