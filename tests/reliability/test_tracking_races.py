"""Writes that several workers make at once against one tracking store: members of a fold share their
datasets (same name and digest), tag the same round run, create the same experiment and registered model.
Each worker is its own process, as members on Ray are; all start the same writes at the same moment.
Afterwards no worker failed and every dataset digest has one row."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.servers import postgres

pytestmark = pytest.mark.slow

N_WORKERS = 8
N_SETS = 6  # dataset sets per worker, logged one after another: each is a fresh race

WORKER = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tasks.tracking").setLevel(logging.INFO)
    from tasks import tracking
    uri, parent, start, index = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    client = tracking.client_for(uri)
    while time.time() < start:
        time.sleep(0.005)
    exp = tracking.experiment_id(client, "races")
    tracking.ensure_registered_model(client, "races-model", "one model for every worker")
    for k in range(%(sets)d):  # a run per set, as a member's run per round
        run = tracking.create_run(client, exp, f"member-{index}-{k}", {"worker": index}, parent_run_id=parent)
        rows = [{"scan_id": f"case_{k}_{i}", "image_hash": f"{k:02d}{i:030d}", "role": "labelled"} for i in range(4)]
        tracking.log_datasets(client, run, {"train": rows, "validation": rows[:2]}, "/data", name_prefix="fold0-")
        tracking.set_tags(client, parent, {"viola.shared": "same value", f"viola.set_{k}": "done"})
    print("ok", index)
""") % {"sets": N_SETS}


def _race(uri: str, tmp: Path) -> list[subprocess.CompletedProcess]:
    from tasks import tracking

    client = tracking.client_for(uri)
    parent = tracking.create_run(client, tracking.experiment_id(client, "parents"), "round", {})
    start = time.time() + 12  # every worker imported and connected by then, on 2 cores too
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, parent, str(start), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp)
             for i in range(N_WORKERS)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    tags = client.get_run(parent).data.tags
    assert tags["viola.shared"] == "same value" and all(tags[f"viola.set_{k}"] == "done" for k in range(N_SETS))
    return done


def _check(done: list[subprocess.CompletedProcess], rows: list[tuple]) -> None:
    failed = [(d.returncode, d.stderr.strip().splitlines()[-1:]) for d in done if d.returncode != 0]
    assert not failed, f"workers failed: {failed}"
    per_digest: dict[tuple, int] = {}
    for name, digest in rows:
        per_digest[(name, digest)] = per_digest.get((name, digest), 0) + 1
    assert len(per_digest) == 2 * N_SETS  # train and validation of every set
    assert set(per_digest.values()) == {1}, per_digest
    retried = sum(d.stderr.count("wrote the same row at once") for d in done)
    print(f"{N_WORKERS} workers x {N_SETS} sets: {retried} lost races retried")


def test_workers_logging_the_same_datasets_at_once_on_a_served_sqlite_store(tmp_path):
    from tasks import tracking

    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    with tracking.shared_tracking(f"sqlite:///{store}", other_processes=True) as served:
        done = _race(served, tmp_path)
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT name, digest FROM datasets").fetchall()
        models = db.execute("SELECT COUNT(*) FROM registered_models WHERE name = 'races-model'").fetchone()[0]
        experiments = db.execute("SELECT COUNT(*) FROM experiments WHERE name = 'races'").fetchone()[0]
        inputs = db.execute("SELECT COUNT(*) FROM inputs WHERE destination_type = 'RUN'").fetchone()[0]
    _check(done, rows)
    assert models == 1 and experiments == 1
    assert inputs == N_WORKERS * N_SETS * 2  # every worker's run has each of its sets, once


def test_workers_logging_the_same_datasets_at_once_on_postgresql(tmp_path):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from tasks import tracking

    with postgres() as backend, tracking.mlflow_server(backend, tmp_path, artifacts_destination=str(
            tmp_path / "artifacts")) as served:
        done = _race(served, tmp_path)
        engine = sqlalchemy.create_engine(backend.replace("postgresql://", "postgresql+psycopg://"))
        with engine.connect() as db:
            rows = [tuple(r) for r in db.execute(sqlalchemy.text("SELECT name, digest FROM datasets"))]
            models = db.execute(sqlalchemy.text(
                "SELECT COUNT(*) FROM registered_models WHERE name = 'races-model'")).scalar()
        engine.dispose()
    _check(done, rows)
    assert models == 1
