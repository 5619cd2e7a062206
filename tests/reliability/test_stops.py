"""Stopping `viola run`: SIGTERM to its process group (a scheduler's, Kubernetes' normal stop) ends it
within a bounded time, non-zero, with nothing left running and the data root free; after kill -9 of
the run alone, the next `viola run` on the data root stops what the dead run left, saying so in one line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import started_with_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _start(tmp: Path, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    from data_catalog.phantoms import write_phantom_dataset

    root, home = tmp / "data", tmp / "prefect"
    if not root.exists():
        write_phantom_dataset(root, labelled=4, unlabelled=1, test=1, seed=7, size="small")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(home), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--data", str(root),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--set", "train.max_steps=5000",
           "--set", "train.val_every=5", *extra]
    log = open(tmp / f"run-{len(list(tmp.glob('run-*.log')))}.log", "w")  # noqa: SIM115 (the child writes it)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, root, home


def _training(proc: subprocess.Popen, root: Path, tmp: Path) -> None:
    deadline = time.monotonic() + 600
    while not list((root / "viola_work" / "rounds" / "round_000" / "members").glob("*/last.pt")):
        assert proc.poll() is None, sorted(tmp.glob("run-*.log"))[-1].read_text()[-3000:]
        assert time.monotonic() < deadline, "no member started training"
        time.sleep(0.2)


def _cleanup(home: Path) -> None:
    for pid in started_with_home(home):  # whatever this test started and the run under test did not stop
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_group_ends_the_run_in_bounded_time_and_leaves_nothing(tmp_path):
    from tasks.rounds import exclusive

    proc, root, home = _start(tmp_path)
    try:
        _training(proc, root, tmp_path)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
        took = time.monotonic() - t0
        out = (tmp_path / "run-0.log").read_text()
        assert code == 128 + signal.SIGTERM, out[-3000:]
        assert took < 45, f"took {took:.0f} s to stop"
        assert "stopped by SIGTERM" in out.strip().splitlines()[-1]
        deadline = time.monotonic() + 15
        while started_with_home(home):
            assert time.monotonic() < deadline, f"left running: {started_with_home(home)}"
            time.sleep(0.5)
        with exclusive(root / "viola_work"):  # the data root is free
            pass
        assert not (root / "viola_work" / ".run.children.json").exists()
        from tests.helpers import store_client

        client = store_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("self-training-tiny").experiment_id])
        kinds = sorted((r.data.tags.get("viola.kind", ""), r.info.status) for r in runs)
        assert ("round", "KILLED") in kinds and not [k for k in kinds if k[1] == "RUNNING"], kinds
        assert "marked KILLED" in out
        print(f"SIGTERM: exited {code} after {took:.1f} s, nothing left running, MLflow runs {kinds}")
    finally:
        _cleanup(home)


def test_after_kill_9_the_next_run_stops_what_the_dead_run_left(tmp_path):
    proc, root, home = _start(tmp_path)
    try:
        _training(proc, root, tmp_path)
        time.sleep(3)  # the record of its children is refreshed every 2 s
        os.kill(proc.pid, signal.SIGKILL)  # the run alone: what it started lives on
        proc.wait()
        time.sleep(1)
        orphans = started_with_home(home)
        assert orphans, "kill -9 of the run left nothing to find (expected its temporary Prefect server)"
        # the next call on the data root (a different one: it is refused, after the leftovers are stopped)
        nxt, _, _ = _start(tmp_path, "--rounds", "3")
        code = nxt.wait(timeout=120)
        out = (tmp_path / "run-1.log").read_text()
        assert code == 2, out[-3000:]
        lines = out.strip().splitlines()
        found = [line for line in lines if line.startswith("stopped ") and "left by the run that died" in line]
        assert len(found) == 1 and f"(pid {proc.pid})" in found[0], out[-3000:]
        assert lines[-1].startswith("error: ") and "was interrupted" in lines[-1]
        assert not started_with_home(home), f"still running: {started_with_home(home)}"
        print(f"kill -9: {len(orphans)} orphan(s) found and stopped: {found[0]}")
    finally:
        _cleanup(home)
