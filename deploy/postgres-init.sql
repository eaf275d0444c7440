-- Runs once, when the postgres container initialises an empty data volume: the Prefect server's database beside
-- MLflow's (POSTGRES_DB=mlflow). Both belong to the `es2` role; give each its own role in a larger installation.
CREATE DATABASE prefect OWNER es2;
