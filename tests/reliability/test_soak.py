"""A soak of the served pipeline as a hospital runs it: a Prefect server, `viola serve` (the round
on a schedule of every minute, the watcher), one SIGTERM and one SIGKILL of `viola serve` at random
points of a round's training, each followed by a restart, and new unlabelled scans dropped in twice:
while round 1 trains (before the kill) and after it (the watcher announces them).

Afterwards: rounds 0-2 finished; the scans of the first drop pseudo-labelled by round 1, which
resumed after their arrival, those of the second by round 2 and not before; no process of the soak
left; no Prefect flow run or MLflow run left RUNNING; one registered model version per finished
round; every input file byte-identical. The kill points come from a seeded generator
(``VIOLA_SOAK_SEED``, printed), so a failure can be replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import store_client
from tests.servers import free_port, started_with_home, stop_group

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
ROUNDS = Path("viola_work") / "rounds"
ACTIVE = ("RUNNING", "PENDING", "CANCELLING")


def _inputs(root: Path) -> dict[str, str]:
    """sha256 of every file of the data root outside the pipeline's own folders (work, catalog)."""
    own = {"viola_work", "viola_catalog"}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not own & set(p.relative_to(root).parts)}


def _api(env: dict, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as resp:
        return json.loads(resp.read())


def _flow_runs(env: dict) -> list[dict]:
    return _api(env, "/flow_runs/filter", {"flows": {"name": {"any_": ["self-training"]}}, "limit": 200})


def _wait(check, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def _finished(root: Path, round_: int) -> bool:
    state = root / ROUNDS / f"round_{round_:03d}" / "state.json"
    return state.exists() and json.loads(state.read_text()).get("status") == "finished"


def _training(root: Path, round_: int) -> bool:
    return bool(list((root / ROUNDS / f"round_{round_:03d}" / "members").glob("*/last.pt")))


def test_served_rounds_survive_new_scans_sigterm_and_sigkill(tmp_path):
    from data_catalog.phantoms import write_phantom_dataset

    seed = int(os.environ.get("VIOLA_SOAK_SEED", "2026"))
    rng = random.Random(seed)
    print(f"soak seed {seed}")
    data, store, home, logs = tmp_path / "data", tmp_path / "mlflow.db", tmp_path / "prefect", tmp_path / "logs"
    logs.mkdir()
    write_phantom_dataset(data, labelled=4, unlabelled=3, test=2, seed=7, size="small")  # the tiny profile's
    arrivals = tmp_path / "arrivals"
    write_phantom_dataset(arrivals, labelled=0, unlabelled=3, test=0, seed=8, size="small")
    drops = sorted((arrivals / "unlabelled").glob("*.nii.gz"))
    first, second = drops[:2], drops[2:]

    def drop(files: list[Path]) -> None:
        for src in files:  # as a careful copier does: whole files appear, under their final name
            tmp = data / "unlabelled" / f".{src.name}.part"
            shutil.copyfile(src, tmp)
            tmp.rename(data / "unlabelled" / src.name)
    before = _inputs(data)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "OMP_NUM_THREADS": "1"}
    for key in ("PREFECT_PROFILES_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    serve_cmd = [sys.executable, "-m", "flows.cli", "serve", "--profile", "tiny", "--data", str(data),
                 "--cron", "* * * * *", "--tracking-uri", f"sqlite:///{store}"]
    figures = {"sigterm": 0, "sigkill": 0, "restarts": 0}

    def start_serve() -> subprocess.Popen:
        log = open(logs / f"serve-{figures['restarts']}.log", "w")  # noqa: SIM115 (the child writes it)
        return subprocess.Popen(serve_cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                              start_new_session=True)
    serve = None
    try:
        def healthy() -> bool:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                return r.status == 200
            return False

        _wait(healthy, 180, "the Prefect server", logs)
        serve = start_serve()

        # round 0: SIGTERM to `viola serve` at a random point of its training, then a restart
        _wait(lambda: _training(data, 0), 600, "round 0's training", logs)
        time.sleep(rng.uniform(0.0, 8.0))
        t0 = time.monotonic()
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)
        figures |= {"sigterm": 1, "sigterm_exit_s": round(time.monotonic() - t0, 1)}
        assert not _finished(data, 0), "the SIGTERM came too late to interrupt round 0"
        figures["restarts"] += 1
        serve = start_serve()

        # round 1: new unlabelled scans arrive while it trains, then SIGKILL of the whole group
        _wait(lambda: _finished(data, 0), 900, "round 0 after the restart", logs)
        _wait(lambda: _training(data, 1), 600, "round 1's training", logs)
        drop(first)
        time.sleep(rng.uniform(0.0, 8.0))
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(timeout=30)
        figures["sigkill"] = 1
        assert not _finished(data, 1), "the SIGKILL came too late to interrupt round 1"
        figures["restarts"] += 1
        serve = start_serve()

        # round 2: more scans once round 1 is done; the watcher announces them
        _wait(lambda: _finished(data, 1), 900, "round 1 after the restart", logs)
        drop(second)
        watch = subprocess.run([PREFECT, "deployment", "run", "watch-unlabelled/watch", "--watch",
                                "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=400)
        assert watch.returncode == 0, watch.stdout[-2000:] + watch.stderr[-2000:]

        # round 2 labels them; the schedule's later runs find nothing new
        _wait(lambda: _finished(data, 2), 1200, "round 2", logs)
        _wait(lambda: not any(r["state_type"] in ACTIVE for r in _flow_runs(env)), 300,
              "no flow run in progress", logs)
        stop_group(serve)
        runs = _flow_runs(env)
    finally:
        if serve is not None:
            stop_group(serve)
        stop_group(server)
        left = started_with_home(home)
        for pid in left:  # what the soak started and nobody stopped: reported below, then stopped
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    print("soak figures", figures)
    assert left == [], f"processes left behind: {left}"
    states = sorted(r["state_type"] for r in runs)
    print("flow runs", {s: states.count(s) for s in set(states)})
    assert not [s for s in states if s in ACTIVE], states
    client = store_client(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("self-training-tiny")
    mlflow_runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert [r.info.run_name for r in mlflow_runs if r.info.status == "RUNNING"] == []
    finished = [r for r in range(10) if _finished(data, r)]
    versions = client.search_model_versions("name='viola-ich-tiny'")
    assert finished == [0, 1, 2] and len(versions) == len(finished), (finished, [v.version for v in versions])
    ids = [{p.name.removesuffix(".nii.gz") for p in files} for files in (first, second)]
    labelled_by = {r: {p.stem for p in (data / ROUNDS / f"round_{r:03d}" / "pseudo").glob("*.json")} for r in (1, 2)}
    assert ids[0] <= labelled_by[1] and not ids[1] & labelled_by[1], labelled_by
    assert ids[0] | ids[1] <= labelled_by[2], labelled_by
    after = _inputs(data)
    arrived = {f"unlabelled/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in drops}
    assert {k: v for k, v in after.items() if k not in arrived} == before
    assert {k: after.get(k) for k in arrived} == arrived
