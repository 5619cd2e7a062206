"""Prefect flows of the self-training pipeline and the `viola` command line."""
