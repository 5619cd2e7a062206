"""The pipeline under kill -9, concurrent starts and a busy store, for real: separate processes,
SIGKILL of the whole process group, then the same command again.

A reference two-round tiny run gives the metrics an uninterrupted run reaches; every killed run,
completed by the same command, must reach exactly them, with no duplicate MLflow run or model
version, no run left RUNNING, and the killed Prefect flow run marked CRASHED.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import store_client

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROUNDS = Path("viola_work") / "rounds"


def _env(tmp: Path) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    return env


def _data(root: Path) -> Path:
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(root, labelled=4, unlabelled=3, test=2, seed=7, size="small")
    return root


def _cmd(root: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--data", str(root), "--rounds", "2",
            "--tracking-uri", f"sqlite:///{store}"]


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _outcome(root: Path, store: Path) -> dict:
    """What a finished two-round run left: its test metrics and the MLflow bookkeeping."""
    client = store_client(f"sqlite:///{store}")
    exp = client.get_experiment_by_name("self-training-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    tests = [{k: v for k, v in json.loads((root / ROUNDS / f"round_00{r}" / "state.json").read_text())["test"].items()
              if k != "test/seconds"} for r in (0, 1)]  # every metric but the time it took
    return {
        "test": tests,
        "round_runs": sorted(r.data.tags["mlflow.runName"] for r in runs if r.data.tags.get("viola.kind") == "round"),
        "member_runs": sorted((r.data.tags["viola.round"], r.data.tags["mlflow.runName"]) for r in runs
                              if r.data.tags.get("viola.kind") == "member" and r.info.status != "KILLED"),
        "statuses": sorted({r.info.status for r in runs if r.info.status != "KILLED"}),
        "versions": len(client.search_model_versions("name='viola-ich-tiny'")),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("reference")
    root, store = _data(tmp / "data"), tmp / "mlflow.db"
    done = subprocess.run(_cmd(root, store), cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _outcome(root, store)


KILL_POINTS = {
    # in the order a two-round run reaches them: the first file that appears at each point
    "training in round 0": "round_000/members/viola_tiny-fold0/last.pt",
    "between members": "round_000/members/nnunet_tiny-fold0/mlflow_run_id",
    "evaluation of round 0": "round_000/ensemble/ensemble.json",
    "pseudo-labelling": "round_001/pseudo/ph_s0007_u002.json",
    "training in round 1": "round_001/members/nnunet_tiny-fold0/last.pt",
    "evaluation of round 1": "round_001/ensemble/ensemble.json",
}


def test_kill_9_anywhere_then_the_same_command_completes_identically(reference, tmp_path):
    """Killed at each point in turn (each start resumes the previous kill), then completed: the same
    metrics as an uninterrupted run, no duplicate runs or versions, every killed flow run CRASHED."""
    root, store, env = _data(tmp_path / "data"), tmp_path / "mlflow.db", _env(tmp_path)
    log = tmp_path / "run.log"
    killed_flows = {}
    for point, rel in KILL_POINTS.items():
        marker = root / ROUNDS / rel
        assert not marker.exists(), f"{point}: {rel} exists before the run that should reach it"
        proc = _start(_cmd(root, store), env, log)
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before {point}:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{marker} never appeared"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        running = [json.loads(p.read_text()) for p in sorted((root / ROUNDS).glob("*/state.json"))]
        killed_flows[point] = next(s["flow_run_id"] for s in reversed(running) if s.get("status") == "running")

    again = subprocess.run(_cmd(root, store), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not (root / ROUNDS / "round_002").exists()  # --rounds 2: two rounds in all, resumed ones included
    assert _outcome(root, store) == reference
    db = sqlite3.connect(root / "viola_work" / "prefect" / "prefect.db")  # viola run keeps it beside the data
    states = {point: db.execute("select state_type from flow_run where id in (?, ?)",
                                (flow, flow.replace("-", ""))).fetchone() for point, flow in killed_flows.items()}
    assert all(s is not None and s[0] == "CRASHED" for s in states.values()), states
    # nor any of their subflows (the members' fan-out): nothing is left RUNNING
    assert db.execute("select count(*) from flow_run where state_type = 'RUNNING'").fetchone()[0] == 0


def test_two_runs_at_once_the_second_refuses_and_a_new_store_stays_sound(tmp_path):
    root, store, env = _data(tmp_path / "data"), tmp_path / "mlflow.db", _env(tmp_path)
    first = _start(_cmd(root, store), env, tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while not (root / "viola_work" / ".run.owner").exists():
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    second = subprocess.run(_cmd(root, store), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = (second.stdout + second.stderr).strip()
    assert second.returncode == 2 and out.splitlines()[-1].startswith("error: another run is working on"), out
    assert "Traceback" not in out and f"pid {first.pid} on" in out
    first.wait(timeout=900)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    # two runs on two data roots open one new store at the same moment: created once, never broken
    roots = [_data(tmp_path / f"root{i}") for i in (1, 2)]
    runs = [_start(_cmd(r, tmp_path / "shared.db"), env, tmp_path / f"{r.name}.log") for r in roots]
    for r in runs:
        r.wait(timeout=900)
    assert [r.returncode for r in runs] == [0, 0], [(tmp_path / f"{r.name}.log").read_text()[-2000:] for r in roots]
    client = store_client(f"sqlite:///{tmp_path / 'shared.db'}")
    assert len(client.search_model_versions("name='viola-ich-tiny'")) == 4  # two rounds of each root


def test_a_locked_store_waits_then_says_so_in_one_line(tmp_path, monkeypatch):
    from tasks import tracking

    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    tracking.client_for(uri)  # create it
    holder = sqlite3.connect(store, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database
    monkeypatch.setattr(tracking, "BUSY_WAIT_S", 3.0)
    client = tracking.client_for(uri)
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match="still busy or unreachable after") as err:
        client.create_experiment("e")
    assert time.monotonic() - t0 >= 2.5 and "\n" not in str(err.value)
    holder.rollback()
    assert client.create_experiment("e")  # free again: it works
