"""Where members train (``[compute]``): the settings' checks, the SQLite store served to workers,
and a tiny round on a local Ray (two workers, one torch thread each) against the sequential runner:
the same checkpoints and test metrics, also when a worker is killed in the middle of a member."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from flows.profiles import ProfileError, load_profile
from tests.helpers import round_context, store_client

ROUNDS = Path("viola_work") / "rounds"


@pytest.mark.parametrize(("compute", "message"), [
    ({"runner": "slurm"}, "compute.runner: Input should be 'sequential' or 'ray'"),
    ({"runner": "ray", "address": "10.0.0.1:6379"}, "expected empty (a local Ray), 'auto' or 'ray://HOST:PORT'"),
    ({"address": "auto"}, "needs runner = 'ray'"),
    ({"runner": "ray", "gpus_per_member": 1.5}, "above 1 it must be a whole number"),
    ({"gpus_per_member": 0.25}, "gpus_per_member is a Ray setting"),
    ({"runner": "ray", "cpus_per_member": 0}, "compute.cpus_per_member: Input should be greater than 0"),
    ({"runner": "ray", "torch_threads": 0}, "compute.torch_threads: Input should be greater than or equal to 1"),
    ({"workers": 2}, "compute.workers: Extra inputs are not permitted"),
])
def test_compute_settings_are_checked_when_the_profile_loads(compute, message):
    with pytest.raises(ProfileError, match=re.escape(message)) as err:
        load_profile("tiny", overrides={"compute": compute})
    assert "\n" not in str(err.value)


def test_compute_settings_that_hold():
    s = load_profile("tiny", overrides={"compute": {"runner": "ray", "address": "ray://head.example:10001",
                                                    "gpus_per_member": 0.25, "torch_threads": 2}})
    assert (s.compute.runner, s.compute.gpus_per_member, s.compute.torch_threads) == ("ray", 0.25, 2)
    assert load_profile("tiny").compute.runner == "sequential"
    # where members run does not change what a round computes: the profile digest ignores it
    assert s.digest() == load_profile("tiny").digest()


def test_a_remote_cluster_needs_a_tracking_server():
    pytest.importorskip("prefect_ray")
    from tasks.compute import ClusterError, task_runner

    s = load_profile("tiny", overrides={"compute": {"runner": "ray", "address": "ray://head.example:10001"}})
    with pytest.raises(ClusterError, match=r"cannot write to sqlite:///x/mlflow\.db"):
        task_runner(s.compute, "sqlite:///x/mlflow.db")
    from tasks.compute import check_reachable

    for api in (None, "http://127.0.0.1:4200/api"):  # its workers cannot reach this machine's own API
        with pytest.raises(ClusterError, match="cannot reach this machine's own Prefect API"):
            check_reachable(s.compute, "http://mlflow.example:5000", api)
    check_reachable(s.compute, "http://mlflow.example:5000", "http://prefect.example:4200/api")
    check_reachable(load_profile("tiny").compute, "sqlite:///x/mlflow.db", None)  # a local run needs neither


def test_a_worker_that_cannot_see_the_data_says_which_path_and_is_not_retried(tmp_path):
    from tasks.training import WorkerCannotSeeData, train_member, worth_retrying
    from viola_models.training import TrainSettings

    spec = {"name": "viola_tiny-fold0", "fold": 0, "train": [str(tmp_path / "gone.npz")], "val": [],
            "labelled": [], "init": None}
    with pytest.raises(WorkerCannotSeeData, match=r"viola_tiny-fold0 on .*: cannot read .*gone\.npz; every worker"):
        train_member.fn(round_context(tmp_path), {"spec": spec, "settings": TrainSettings(model="viola_tiny"),
                                                  "out_dir": tmp_path / "m"})
    assert not (tmp_path / "m").exists()

    class State:
        def __init__(self, error):
            self.error = error

        def result(self, raise_on_failure=False):
            return self.error

    assert worth_retrying(None, None, State(WorkerCannotSeeData("x"))) is False
    assert worth_retrying(None, None, State(RuntimeError("CUDA error"))) is True


@pytest.mark.slow
def test_a_sqlite_store_is_served_to_workers_and_the_server_stopped(tmp_path):
    from tasks import tracking

    (tmp_path / "mlruns").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with tracking.shared_tracking(uri, other_processes=False) as same:
        assert same == uri
    with tracking.shared_tracking(uri, other_processes=True) as served:
        assert served.startswith("http://127.0.0.1:")
        client = store_client(served)
        exp = tracking.experiment_id(tracking.client_for(uri), "e")
        run = client.create_run(exp, run_name="from a worker")
        (tmp_path / "a.txt").write_text("checkpoint")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"), "checkpoint")
    # the same run, read from the file itself; its artifact beside the store; the server is gone
    direct = store_client(uri)
    assert direct.get_run(run.info.run_id).info.run_name == "from a worker"
    assert [a.path for a in direct.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/a.txt"]
    with pytest.raises(OSError):
        import urllib.request

        urllib.request.urlopen(f"{served}/health", timeout=2)
    assert not list((tmp_path / "mlruns").glob("mlflow-server-*.log"))


# ------------------------------------------------------------------------------ a tiny round on Ray
def _phantoms(root: Path) -> Path:
    from data_catalog.phantoms import write_phantom_dataset

    write_phantom_dataset(root, labelled=4, unlabelled=3, test=2, seed=7, size="small")
    return root


def _rounds(tmp: Path, runner: str, rounds: int, during=None) -> list[dict]:
    """``rounds`` rounds of the tiny profile with one torch thread per member; per round its
    checkpoints, test metrics and member runs. ``during(root)`` runs in a thread beside them."""
    from flows.self_training import self_training

    (tmp / "mlruns").mkdir(parents=True)
    root, uri = _phantoms(tmp / "data"), f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    side = threading.Thread(target=during, args=(root,), daemon=True) if during else None
    if side:
        side.start()
    threads = torch.get_num_threads()
    try:
        self_training(profile="tiny", data_root=str(root), rounds=rounds, tracking_uri=uri, overrides={
            "compute": {"runner": runner, "torch_threads": 1, "cpus_per_member": 1}})
    finally:
        torch.set_num_threads(threads)
    if side:
        side.join(timeout=60)
    client = store_client(uri)
    exp = client.get_experiment_by_name("self-training-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    out = []
    for r in range(rounds):
        folder = root / ROUNDS / f"round_{r:03d}"
        weights = {p.parent.name: torch.load(p, weights_only=True)["state_dict"]
                   for p in sorted((folder / "members").glob("*/best.pt"))}
        test = json.loads((folder / "state.json").read_text())["test"]
        pseudo = sorted(p.name for p in (folder / "pseudo").glob("*.nii.gz"))
        out.append({"weights": weights, "test": {k: v for k, v in test.items() if k != "test/seconds"},
                    "pseudo": pseudo, "members": sorted(
                        (rr.data.tags["mlflow.runName"], rr.info.status) for rr in runs
                        if rr.data.tags.get("viola.kind") == "member" and rr.data.tags.get("viola.round") == str(r))})
    return out


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def sequential(prefect_api, tmp_path_factory) -> list[dict]:
    return _rounds(tmp_path_factory.mktemp("sequential"), "sequential", 2)


def _same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys() and len(a["weights"]) == 2
    for name in a["weights"]:
        for key, tensor in a["weights"][name].items():
            assert torch.equal(tensor, b["weights"][name][key]), (name, key)
    # the metrics' own float sums may differ in the last bits between processes (seen: NSD at 2e-10)
    assert a["test"] == pytest.approx(b["test"], rel=1e-7, abs=1e-9)


@pytest.mark.slow
def test_rounds_on_ray_give_what_the_sequential_runner_gives(sequential, prefect_api, tmp_path):
    """Round 0 (members side by side) and round 1 (the teacher's masks in shares, then members)."""
    pytest.importorskip("prefect_ray")
    on_ray = _rounds(tmp_path, "ray", 2)
    for r in (0, 1):
        _same(on_ray[r], sequential[r])
        assert on_ray[r]["pseudo"] == sequential[r]["pseudo"]
        assert on_ray[r]["members"] == sequential[r]["members"] == [("nnunet_tiny-fold0", "FINISHED"),
                                                                    ("viola_tiny-fold0", "FINISHED")]
    assert len(on_ray[1]["pseudo"]) == 3  # every unlabelled scan got the teacher's mask


def _ray_members() -> list[int]:
    """The PIDs of Ray workers running a member now (their process title names the task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::train-member"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_worker_killed_in_a_member_is_retried_and_resumes(sequential, prefect_api, tmp_path):
    pytest.importorskip("prefect_ray")
    killed: list[int] = []

    def kill_one(root: Path) -> None:
        members = root / ROUNDS / "round_000" / "members"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the first checkpoint to resume from, before the member ends
            started = [p.parent for p in members.glob("*/last.pt") if not (p.parent / "result.json").exists()]
            workers = _ray_members()
            if started and workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
                return
            time.sleep(0.01)

    on_ray = _rounds(tmp_path, "ray", 1, during=kill_one)[0]
    assert killed, "no member was caught between its first checkpoint and its end"
    _same(on_ray, sequential[0])  # resumed exactly
    assert on_ray["members"] == sequential[0]["members"]  # one run per member, finished: none duplicated


# ------------------------------------------------------------------- MLflow for many machines
@pytest.mark.slow
def test_a_round_logs_to_a_tracking_server_over_http(prefect_api, tmp_path, monkeypatch):
    """The multi-machine set-up: ``mlflow server`` over PostgreSQL, artifacts uploaded through the
    server; the round logs over HTTP alone (no local store appears) and registers its ensemble."""
    from flows.self_training import self_training
    from tasks import tracking
    from tests.servers import postgres
    from viola_models.inference.ensemble import load_ensemble

    monkeypatch.chdir(tmp_path)
    root = _phantoms(tmp_path / "data")
    with postgres() as backend, tracking.mlflow_server(backend, tmp_path, artifacts_destination=str(
            tmp_path / "artifacts")) as uri:
        summary = self_training(profile="tiny", data_root=str(root), rounds=1, tracking_uri=uri)[0]
        client = store_client(uri)
        runs = client.search_runs([client.get_experiment_by_name("self-training-tiny").experiment_id])
        assert sorted((r.data.tags["viola.kind"], r.info.status) for r in runs) == [
            ("member", "FINISHED"), ("member", "FINISHED"), ("round", "FINISHED")]
        assert client.get_run(summary["run_id"]).data.metrics["test/dsc"] == summary["test"]["test/dsc"]
        ens = tracking.download_ensemble("models:/viola-ich-tiny@champion", uri, tmp_path / "champion")
        assert len(load_ensemble(ens).members) == 2
    # the artifacts went through the server to its destination; nothing was written beside the data
    assert len(list((tmp_path / "artifacts").rglob("best.pt"))) == 2
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_pseudo_labels_made_on_ray_are_those_made_here(ensemble_dir, prefect_api, tmp_path):
    """The teacher's masks of the unlabelled scans, in shares side by side on Ray, are those that one
    process makes: same masks, same scores, records that the pseudo-label task reads back."""
    pytest.importorskip("prefect_ray")
    import nibabel as nib
    import numpy as np

    from data_catalog.scans import file_sha256
    from flows.self_training import label_unlabelled
    from tasks.compute import task_runner
    from tests.helpers import head_volume, write_nifti
    from viola_models.inference.ensemble import load_ensemble
    from viola_models.inference.pseudo_labels import label_scans

    (tmp_path / "unl").mkdir()
    scans = {}
    for i in range(3):
        img, _, aff = head_volume(seed=20 + i, lesions=((8 - 5 * i, 4, 0, 10.0),))
        path = write_nifti(tmp_path / "unl" / f"u{i}.nii.gz", img, aff, np.int16)
        scans[f"u{i}"] = {"image": str(path), "image_hash": file_sha256(path)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = label_scans(load_ensemble(ensemble_dir), scans, tmp_path / "here", "teacher",
                           cache_dir=tmp_path / "cache", overlap=0.25).set_index("scan_id")
    finally:
        torch.set_num_threads(threads)
    ctx = round_context(tmp_path, round_=1, teacher_dir=str(ensemble_dir), teacher_run_id="teacher",
                        overrides={"compute": {"runner": "ray", "torch_threads": 1}, "pseudo": {"overlap": 0.25}})
    runner = label_unlabelled.with_options(task_runner=task_runner(ctx.settings.compute, "sqlite:///unused"))
    assert runner(ctx, scans) == 3
    on_ray = ctx.dir / "pseudo"
    read_back = label_scans(lambda: pytest.fail("every scan should have been labelled on Ray"), scans,
                            on_ray, "teacher").set_index("scan_id")
    for scan_id in scans:
        a, b = (nib.load(d / f"{scan_id}.nii.gz").get_fdata() for d in (tmp_path / "here", on_ray))
        assert np.array_equal(a, b) and a.any(), scan_id
        for score in ("agreement", "union_agreement", "mean_max_probability", "volume_ml"):
            assert read_back.loc[scan_id, score] == pytest.approx(here.loc[scan_id, score], abs=1e-6), (scan_id, score)


def _ours(prefect_home: Path) -> list[int]:
    """PIDs of processes left by a run with this PREFECT_HOME (its environment says so)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"PREFECT_HOME={prefect_home}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


@pytest.mark.slow
def test_a_driver_killed_under_ray_is_completed_by_the_same_command(sequential, tmp_path):
    """kill -9 of `viola run` (its process group) while members train on Ray: the workers die with
    it, and the same command resumes them to what the sequential runner gives."""
    pytest.importorskip("prefect_ray")
    import subprocess
    import sys

    root, store, home = _phantoms(tmp_path / "data"), tmp_path / "mlflow.db", tmp_path / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--data", str(root), "--rounds", "1",
           "--tracking-uri", f"sqlite:///{store}", "--set", "compute.runner=ray", "--set", "compute.torch_threads=1"]
    repo = Path(__file__).resolve().parents[1]
    try:
        with open(tmp_path / "run.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        members = root / ROUNDS / "round_000" / "members"
        deadline = time.monotonic() + 600
        while not list(members.glob("*/last.pt")):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no member wrote a checkpoint"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60  # Ray's workers share the driver's fate
        while any(p in _ray_members() for p in _ours(home)):
            assert time.monotonic() < deadline, "Ray workers of the killed run are still training"
            time.sleep(0.5)
        again = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        # in a plain log too (pipes, no terminal), the members' lines come from their workers: the training
        # loop's own lines, whichever the rerun finds (a worker that outlived its driver for a few seconds may
        # have left its member resumable at step 12, or finished, so that the rerun logs only its start or
        # "already trained")
        assert re.search(r"\(train-member pid=\d+\).*viola_models\.training\.loop - (viola|nnunet)_tiny-fold0: ",
                         again.stdout + again.stderr), again.stdout[-3000:] + again.stderr[-3000:]
    finally:
        for pid in _ours(home):  # Ray's agents outlive a killed driver: stop what this test started
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    weights = {p.parent.name: torch.load(p, weights_only=True)["state_dict"]
               for p in sorted((members).glob("*/best.pt"))}
    test = json.loads((root / ROUNDS / "round_000" / "state.json").read_text())["test"]
    _same({"weights": weights, "test": {k: v for k, v in test.items() if k != "test/seconds"}}, sequential[0])
    client = store_client(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("self-training-tiny").experiment_id])
    assert sorted((r.data.tags["mlflow.runName"], r.info.status) for r in runs
                  if r.data.tags.get("viola.kind") == "member") == sequential[0]["members"]


def test_viola_run_refuses_a_remote_cluster_without_a_tracking_server_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    root = _phantoms(tmp_path / "data")
    res = CliRunner().invoke(app, ["run", "--profile", "tiny", "--data", str(root), "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'mlflow.db'}", "--set", "compute.runner=ray",
                                   "--set", "compute.address=ray://head.example:10001"])
    assert res.exit_code == 2, res.output  # refused before Prefect starts
    assert res.output.strip().splitlines()[-1].startswith("error: a remote Ray cluster (ray://head.example:10001) "
                                                          "cannot write to sqlite:///")
    assert "Traceback" not in res.output


def _in_a_terminal(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` with a pseudo-terminal (200 columns) as its stdout and stderr; its exit code and output."""
    import fcntl
    import pty
    import struct
    import subprocess
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the last writer is gone
            while data := os.read(master, 65536):
                chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_members_on_ray_report_their_steps_to_the_terminal(tmp_path):
    """`viola run` in a terminal with members on Ray: every member's steps, loss and time left, and
    every share of the test scans, reach the driver's terminal (Ray forwards the workers' lines and
    folds none of them into "[repeated ...]"); the same lines as in a plain log."""
    pytest.importorskip("prefect_ray")
    import sys

    root, store, home = _phantoms(tmp_path / "data"), tmp_path / "mlflow.db", tmp_path / "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_PROFILES_PATH", "VIOLA_PROGRESS",
                "RAY_DEDUP_LOGS", "RAY_DEDUP_LOGS_ALLOW_REGEX"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--data", str(root), "--rounds", "1",
           "--tracking-uri", f"sqlite:///{store}", "--set", "compute.runner=ray", "--set", "compute.torch_threads=1"]
    try:
        code, out = _in_a_terminal(cmd, Path(__file__).resolve().parents[1], env, timeout=900)
    finally:
        for pid in _ours(home):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)  # colours and cursor moves
    assert code == 0, text[-3000:]
    for member in ("viola_tiny-fold0", "nnunet_tiny-fold0"):
        steps = re.findall(rf"\(train-member pid=\d+\).*{member}: step (\d+)/12 loss \d\.\d+ .*min left", text)
        assert steps == ["4", "8", "12"], (member, text[-3000:])
    scored = re.findall(r"\(score-scans pid=\d+\).*score: (\d)/(\d) scans", text)
    assert sorted(scored) == [("1", "1"), ("1", "1")], text[-3000:]
    assert "repeated" not in text
