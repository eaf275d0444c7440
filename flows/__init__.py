"""Prefect flows: orchestration only. Every task runs a stage defined in `es2/` (through DVC, so dvc.lock stays
true); no business logic lives here."""
