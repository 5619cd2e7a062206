"""Tracking writes that lose a race to another worker: made again, or the other worker's row read back."""

from __future__ import annotations

import mlflow
import pytest

from tasks import tracking


def _conflicting(times: int, error: str = "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: "
                                          "datasets.experiment_id, datasets.name, datasets.digest"):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= times:
            raise mlflow.exceptions.MlflowException(error)
        return "written"
    return call, calls


def test_a_write_that_lost_a_unique_constraint_race_is_made_again(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    call, calls = _conflicting(2)
    assert tracking.with_retries(call, "store") == "written" and len(calls) == 3
    pg, pg_calls = _conflicting(1, 'duplicate key value violates unique constraint "dataset_pk"')
    assert tracking.with_retries(pg, "store") == "written" and len(pg_calls) == 2


def test_a_conflict_that_does_not_go_away_is_raised_after_bounded_tries(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    call, calls = _conflicting(100)
    with pytest.raises(mlflow.exceptions.MlflowException, match="UNIQUE constraint failed"):
        tracking.with_retries(call, "store")
    assert len(calls) == tracking.CONFLICT_TRIES


def test_other_errors_are_not_retried():
    call, calls = _conflicting(5, "RESOURCE_DOES_NOT_EXIST: run abc not found")
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        tracking.with_retries(call, "store")
    assert len(calls) == 1


def test_an_experiment_or_model_another_worker_created_first_is_read_back(tmp_path, monkeypatch):
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    made = client.create_experiment("shared")
    # the other worker's create lands between this one's read and its create
    monkeypatch.setattr(client, "get_experiment_by_name", _first_none(client.get_experiment_by_name), raising=False)
    assert tracking.experiment_id(client, "shared") == made
    client.create_registered_model("model")
    monkeypatch.setattr(client, "get_registered_model", _always_missing, raising=False)
    tracking.ensure_registered_model(client, "model", "d")  # RESOURCE_ALREADY_EXISTS: not an error
    assert [m.name for m in client.search_registered_models()] == ["model"]


def _first_none(get):
    seen = []

    def wrapped(name):
        seen.append(name)
        return None if len(seen) == 1 else get(name)
    return wrapped


def _always_missing(name):
    raise mlflow.exceptions.MlflowException(f"RESOURCE_DOES_NOT_EXIST: registered model {name} not found")
