"""Thin Prefect tasks: each calls one library function and records what it did in MLflow."""
