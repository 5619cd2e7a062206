"""The deployment path as users run it: a local Prefect server on 127.0.0.1, `viola serve`, then
`prefect deployment run self-training/round --watch`; the watcher's event starts another round.
Everything started here is stopped here, by PID."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import head_volume, write_nifti
from tests.servers import PREFECT, free_port, prefect_env, prefect_server, stop_group, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _flow_runs(env: dict, flow: str) -> list[dict]:
    body = json.dumps({"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"}).encode()
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_serve_then_run_the_round_deployment(tmp_path):
    port = free_port()
    env = prefect_env(tmp_path / "prefect", port)
    data, store = tmp_path / "data", tmp_path / "mlruns"
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(data, labelled=4, unlabelled=3, test=2, seed=7, size="small")  # the tiny profile's
    store.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    with (open(logs / "server.log", "w") as server_log, open(logs / "serve.log", "w") as serve_log,
          prefect_server(env, port, server_log) as server):
        _serve_and_run(env, data, store, logs, serve_log)
    assert server.poll() is not None


def _serve_and_run(env: dict, data: Path, store: Path, logs: Path, serve_log) -> None:
    serve = None
    try:
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--profile", "tiny", "--data", str(data),
             "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"],
            env=env, cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)

        def deployed() -> bool:
            return subprocess.run([PREFECT, "deployment", "inspect", "self-training/round"], env=env,
                                  capture_output=True).returncode == 0

        wait_for(deployed, 120, "the served deployments")
        inspect = subprocess.run([PREFECT, "deployment", "inspect", "self-training/round"], env=env,
                                 capture_output=True, text=True).stdout
        assert "viola.unlabelled.arrived" in inspect  # the event trigger
        assert "'limit': 1" in inspect and "ENQUEUE" in inspect  # one round at a time, the next queued
        done = subprocess.run([PREFECT, "deployment", "run", "self-training/round", "--watch",
                               "--watch-timeout", "600"], env=env, capture_output=True, text=True, timeout=700)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + (logs / "serve.log").read_text()[
            -3000:]
        assert "Completed" in done.stdout
        state = json.loads((data / "viola_work" / "rounds" / "round_000" / "state.json").read_text())
        assert state["status"] == "finished"

        # a new unlabelled scan: the watcher announces it and the trigger starts the next round. The
        # watcher's own schedule may also have announced the first scans when serving began, so the
        # round looked for is one the automation created after this scan arrived
        arrived = datetime.now(UTC)
        img, _, aff = head_volume(shape=(64, 64, 16), spacing=(3.6, 3.6, 10.0), seed=5)
        write_nifti(data / "unlabelled" / "arrived_later.nii.gz", img, aff, dtype="int16")
        watch = subprocess.run([PREFECT, "deployment", "run", "watch-unlabelled/watch", "--watch",
                                "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=400)
        assert watch.returncode == 0, watch.stdout[-2000:] + watch.stderr[-2000:]

        def triggered() -> list[dict]:
            return [r for r in _flow_runs(env, "self-training")
                    if (r.get("created_by") or {}).get("type") == "AUTOMATION"
                    and datetime.fromisoformat(r["created"].replace("Z", "+00:00")) >= arrived]

        wait_for(lambda: any(r["state_type"] == "COMPLETED" for r in triggered()), 600,
              "a completed round started by the new-scans event")
        state1 = json.loads((data / "viola_work" / "rounds" / "round_001" / "state.json").read_text())
        assert state1["status"] == "finished"
    finally:
        if serve is not None:
            stop_group(serve)
    assert serve is None or serve.poll() is not None


def test_a_process_work_pool_runs_the_deployments_of_prefect_yaml(tmp_path):
    """README's work-pool path with the repository's own prefect.yaml: create the pool, deploy
    both deployments, start a worker elsewhere, run a tiny round through it. The server's scheduler
    is off, so that the nightly and watcher schedules of prefect.yaml start nothing here."""
    port = free_port()
    env = prefect_env(tmp_path / "prefect", port) | {"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}
    data, store = tmp_path / "data", tmp_path / "mlruns"
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(data, labelled=4, unlabelled=3, test=2, seed=7, size="small")  # the tiny profile's
    store.mkdir()
    spec = (REPO / "prefect.yaml").read_bytes()

    def prefect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    with (open(tmp_path / "server.log", "w") as server_log, open(tmp_path / "worker.log", "w") as worker_log,
          prefect_server(env, port, server_log)):
        made = prefect("work-pool", "create", "viola", "--type", "process")
        assert made.returncode == 0, made.stdout + made.stderr
        deployed = prefect("--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        assert (REPO / "prefect.yaml").read_bytes() == spec  # deploying does not rewrite it
        for name in ("self-training/round", "watch-unlabelled/watch"):
            inspect = prefect("deployment", "inspect", name)
            assert inspect.returncode == 0 and "'work_pool_name': 'viola'" in inspect.stdout, inspect.stdout
            assert str(REPO) in inspect.stdout  # the working directory the worker runs the flows in
        inspect = prefect("deployment", "inspect", "self-training/round").stdout
        assert "viola.unlabelled.arrived" in inspect and "ENQUEUE" in inspect and "0 2 * * *" in inspect
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "viola"], env=env, cwd=tmp_path,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            done = prefect("deployment", "run", "self-training/round", "-p", "profile=tiny", "-p",
                           f"data_root={data}", "-p", f"tracking_uri=sqlite:///{store / 'mlflow.db'}", "--watch",
                           "--watch-timeout", "600", timeout=700)
            assert done.returncode == 0 and "Completed" in done.stdout, (
                done.stdout[-3000:] + done.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:])
        finally:
            stop_group(worker)
        assert worker.poll() is not None
    state = json.loads((data / "viola_work" / "rounds" / "round_000" / "state.json").read_text())
    assert state["status"] == "finished"
