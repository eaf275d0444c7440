"""Pipeline stages. Each is one function called by the CLI (which DVC runs) and by the Prefect flow."""
