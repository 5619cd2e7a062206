"""The deployment path as users run it: a local Prefect server on 127.0.0.1, `viola serve`, then
`prefect deployment run self-training/round --watch`; the watcher's event starts another round.
Everything started here is stopped here, by PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.helpers import head_volume, write_nifti
from tests.servers import free_port, stop_group

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _flow_runs(env: dict, flow: str) -> list[dict]:
    body = json.dumps({"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"}).encode()
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/flow_runs/filter", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_serve_then_run_the_round_deployment(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_PROFILES_PATH", None)
    data, store = tmp_path / "data", tmp_path / "mlruns"
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(data, labelled=4, unlabelled=3, test=2, seed=7, size="small")  # the tiny profile's
    store.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    with open(logs / "server.log", "w") as server_log, open(logs / "serve.log", "w") as serve_log:
        _serve_and_run(env, port, data, store, logs, server_log, serve_log)


def _serve_and_run(env: dict, port: int, data: Path, store: Path, logs: Path, server_log, serve_log) -> None:
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        _wait(healthy, 120, "the Prefect server")
        serve = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--profile", "tiny", "--data", str(data),
             "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"],
            env=env, cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True)

        def deployed() -> bool:
            return subprocess.run([PREFECT, "deployment", "inspect", "self-training/round"], env=env,
                                  capture_output=True).returncode == 0

        _wait(deployed, 120, "the served deployments")
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

        _wait(lambda: any(r["state_type"] == "COMPLETED" for r in triggered()), 600,
              "a completed round started by the new-scans event")
        state1 = json.loads((data / "viola_work" / "rounds" / "round_001" / "state.json").read_text())
        assert state1["status"] == "finished"
    finally:
        if serve is not None:
            stop_group(serve)
        stop_group(server)
    assert server.poll() is not None and (serve is None or serve.poll() is not None)
