"""MLflow bookkeeping shared by the tasks: explicit run ids through ``MlflowClient``.

Prefect may run tasks in worker threads, and MLflow's fluent "active run" is per thread, so every
call here names its run. Child runs carry ``mlflow.parentRunId`` (the MLflow UI nests them).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from tasks.ensemble_model import fetch_member_checkpoints, model_ensemble_dir, save_ensemble_model

__all__ = [
    "TrackingUnavailable",
    "client_for",
    "code_version",
    "create_run",
    "default_tracking_uri",
    "download_ensemble",
    "ensure_registered_model",
    "experiment_id",
    "fetch_member_checkpoints",
    "log_ensemble",
    "log_metrics",
    "log_params",
    "log_table",
    "mlflow_server",
    "resolve_ensemble_dir",
    "run_exists",
    "shared_tracking",
    "with_retries",
]

log = logging.getLogger(__name__)
_MAX_PARAM = 6000


class TrackingUnavailable(RuntimeError):
    """The MLflow store stayed busy or unreachable for the whole bounded wait (one-line reason)."""


BUSY_WAIT_S = 60.0  # how long a busy or unreachable store is retried before giving up
_TRANSIENT = ("database is locked", "database table is locked", "connection refused", "max retries exceeded",
              "failed to establish a new connection", "temporarily unavailable", "timed out")
# a get-or-create that lost a race: another worker inserted the same row (dataset, tag, param) between
# this one's read and its insert; the store rolled the call back, and made again it finds that row
_CONFLICT = ("unique constraint", "duplicate key value", "integrityerror", "uniqueviolation")
CONFLICT_TRIES = 6


def default_tracking_uri(cwd: Path | None = None, create: bool = True) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``mlruns/mlflow.db`` under ``cwd``
    (its folder is created only with ``create``: a command that only reads must not leave one)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = (cwd or Path.cwd()).resolve() / "mlruns"
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _transient(e: BaseException) -> bool:
    text = str(e).lower()
    return any(t in text for t in _TRANSIENT)


def _conflict(e: BaseException) -> bool:
    text = str(e).lower()
    return any(t in text for t in _CONFLICT)


def with_retries(call, what: str, wait_s: float | None = None):
    """``call()``, retried with backoff while the store is busy (SQLite locked by another writer) or
    unreachable (a tracking server restarting); after ``wait_s`` (default ``BUSY_WAIT_S``) a
    TrackingUnavailable with one line. A call that lost a unique-constraint race to another worker
    (both inserting the same dataset, tag or parameter at once) is made again after a short random
    wait, up to ``CONFLICT_TRIES`` times: the store rolled it back, and the second time it finds the row."""
    wait_s = BUSY_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    delay = 0.2
    conflicts = 0
    while True:
        try:
            return call()
        except Exception as e:
            if _conflict(e) and conflicts < CONFLICT_TRIES - 1:
                conflicts += 1
                log.info("MLflow store %s: another worker wrote the same row at once; trying again", what)
                time.sleep(random.uniform(0.05, 0.25) * conflicts)
                continue
            if not _transient(e):
                raise
            if time.monotonic() + delay > deadline:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise TrackingUnavailable(f"MLflow store {what} still busy or unreachable after {wait_s:.0f} s "
                                          f"({first})") from None
            log.warning("MLflow store %s busy or unreachable; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class _RetryingClient:
    """An MlflowClient whose calls are retried while the store is busy or unreachable."""

    def __init__(self, client: MlflowClient, uri: str) -> None:
        self._client, self._uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: with_retries(lambda: attr(*a, **kw), self._uri)


_READY: set[str] = set()


def _prepare_store(uri: str) -> None:
    """Create and migrate a SQLite store once, under a file lock beside it: two processes opening a
    new store at once must not both run its schema migration (that leaves it broken for good)."""
    path = sqlite_path(uri)
    if path is None or uri in _READY:
        return
    if not path.parent.is_dir():
        raise TrackingUnavailable(f"MLflow store {uri}: folder {path.parent} does not exist")
    import filelock

    with filelock.FileLock(str(path) + ".lock", timeout=BUSY_WAIT_S):
        with_retries(lambda: MlflowClient(tracking_uri=uri).search_experiments(max_results=1), uri)
    _READY.add(uri)


def client_for(uri: str) -> MlflowClient:
    """A client of ``uri`` for runs and registered models alike (also the process default); a new
    SQLite store is created under a lock, and calls are retried while the store is busy."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # models:/ URIs resolve through the registry URI, not the tracking one
    try:
        _prepare_store(uri)
    except TimeoutError:  # filelock.Timeout
        raise TrackingUnavailable(f"MLflow store {uri}: another process has been creating it for over "
                                  f"{BUSY_WAIT_S:.0f} s") from None
    return _RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), uri)  # type: ignore[return-value]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, log_dir: Path, artifact_root: str | None = None,
                  artifacts_destination: str | None = None) -> Iterator[str]:
    """An ``mlflow server`` on 127.0.0.1 (a free port) over ``backend_uri`` (SQLite, PostgreSQL)
    for the duration of the block, stopped by its PID (and its web workers, a process group started
    here). ``artifact_root``: where new experiments' artifacts go, written by the clients
    themselves; ``artifacts_destination``: artifacts uploaded through the server instead. Yields
    its ``http://`` URI; a server that does not answer within two minutes is a TrackingUnavailable
    naming its log."""
    port = _free_port()
    log_file = Path(log_dir) / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root, "--no-serve-artifacts"]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    served = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{served}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise TrackingUnavailable(f"mlflow server over {backend_uri} did not start ({tail[0][:200]}); "
                                          f"see {log_file}")
            time.sleep(0.5)
        log.info("mlflow server over %s at %s (pid %d)", backend_uri, served, proc.pid)
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode in (0, -signal.SIGTERM, -signal.SIGKILL):
            log_file.unlink(missing_ok=True)


@contextlib.contextmanager
def shared_tracking(uri: str, other_processes: bool) -> Iterator[str]:
    """The tracking URI to give workers in other processes. An ``http(s)://`` server (or a store
    used by this process alone) is passed on as it is; a SQLite store is served for the duration of
    the block by an ``mlflow server`` on 127.0.0.1, so that only that server writes the file
    (several processes writing one SQLite file is what breaks stores). Artifacts still go to the
    store's folder (``mlruns/``), which the workers must see."""
    path = sqlite_path(uri)
    if not other_processes or path is None:
        yield uri
        return
    client_for(uri)  # created and migrated here, once
    with mlflow_server(uri, path.parent, artifact_root=_artifact_root(uri) or str(path.parent)) as served:
        yield served


def _artifact_root(uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``mlruns/``); None lets the server decide."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.resolve().as_uri()
    return None


def _already_exists(e: BaseException) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(e).lower()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment ``name``, created if need be (restored if deleted); two workers
    creating it at once get the same one."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = _artifact_root(client.tracking_uri)
    location = f"{root}/{name}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException as e:
        if not _already_exists(e):
            raise
        return client.get_experiment_by_name(name).experiment_id  # another worker created it first


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Create the registered model ``name`` unless it exists (also when another worker creates it at once)."""
    try:
        client.get_registered_model(name)
        return
    except mlflow.exceptions.MlflowException:
        pass
    try:
        client.create_registered_model(name, description=description)
    except mlflow.exceptions.MlflowException as e:
        if not _already_exists(e):
            raise


def create_run(client: MlflowClient, exp_id: str, name: str, tags: Mapping[str, Any],
               parent_run_id: str | None = None) -> str:
    all_tags = {MLFLOW_RUN_NAME: name, **{k: str(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    return run.info.run_id


def run_exists(client: MlflowClient, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
        out[prefix] = text[:_MAX_PARAM]


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Nested settings as dotted MLflow params (``train.lr``); values already logged are skipped."""
    flat: dict[str, str] = {}
    _flatten("", params, flat)
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in flat.items() if k not in existing]
    for i in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and v == v]
    if batch:
        client.log_batch(run_id, metrics=batch)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


DATASET_COLUMNS = ["scan_id", "image_hash", "label_hash", "label_source", "weight"]


def dataset_digest(rows: list[dict]) -> str:
    """Content digest of a scan set: its scans' image and label hashes (and loss weights), in scan order."""
    key = sorted((str(r.get("scan_id", "")), str(r.get("image_hash", "")), str(r.get("label_hash", "")),
                  round(float(r.get("weight", 1.0)), 6)) for r in rows)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def log_datasets(client: MlflowClient, run_id: str, sets: Mapping[str, list[dict]], source: str,
                 name_prefix: str = "") -> None:
    """Record scan sets as the run's MLflow dataset inputs, one per context (``train``, ``pseudo``,
    ``validation``, ``test``): a table of scan ids with the catalog's content hashes, digested by
    that content, so equal sets are one dataset across runs; the table itself goes beside it as
    ``datasets/<context>.csv``. Sets already recorded on the run (a rerun) are not logged again;
    empty sets are skipped."""
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    run = client.get_run(run_id)
    have = {t.value for d in (run.inputs.dataset_inputs if run.inputs else []) for t in d.tags
            if t.key == MLFLOW_DATASET_CONTEXT}
    inputs = []
    for context, rows in sets.items():
        if not rows or context in have:
            continue
        df = pd.DataFrame([{c: r.get(c, 1.0 if c == "weight" else "") for c in DATASET_COLUMNS} for r in rows],
                          columns=DATASET_COLUMNS).sort_values("scan_id", kind="stable").reset_index(drop=True)
        with warnings.catch_warnings():  # MLflow warns that a local folder is the source: ours are
            warnings.simplefilter("ignore")
            ds = from_pandas(df, source=source, name=f"{name_prefix}{context}", digest=dataset_digest(rows))
        inputs.append(DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        log_table(client, run_id, df, f"datasets/{context}.csv")  # the rows themselves, beside the digest
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def log_table(client: MlflowClient, run_id: str, df: pd.DataFrame, name: str) -> None:
    """A table as a CSV artifact (opens in the MLflow UI's artifact view)."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    client.log_text(run_id, buf.getvalue(), name)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit (and '-dirty') when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("viola-ich")
    except PackageNotFoundError:
        ver = "0+unknown"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{ver}+g{commit}{'-dirty' if dirty else ''}" if commit else ver


def log_ensemble(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Log an ensemble folder as ``run_id``'s ``ensemble`` artifact, a pyfunc model
    (``tasks.ensemble_model``), without the member checkpoints that its manifest ties to member
    runs (each is already that run's ``checkpoint/best.pt``): a paper round's ten checkpoints are
    stored once, not twice."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="viola-model-") as tmp:
        model = save_ensemble_model(Path(folder), Path(tmp) / "model")
        with_retries(lambda: client.log_artifacts(run_id, str(model), "ensemble"), client.tracking_uri)


def download_ensemble(model_uri: str, tracking_uri: str, dst: Path | None = None) -> Path:
    """An ensemble folder from MLflow (``models:/NAME@champion``, ``runs:/ID/ensemble``): the
    manifest and calibration of the version (inside its pyfunc model, ``tasks.ensemble_model``,
    or, for older versions, the folder itself), and each member's checkpoint from its member run."""
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri,
                                                      dst_path=str(dst) if dst else None))
    folder = model_ensemble_dir(folder) or folder
    fetch_member_checkpoints(folder, tracking_uri)
    return folder


def resolve_ensemble_dir(model_uri: str | None = None, round_: int | None = None, checkpoints: Path | None = None,
                         work_dir: Path | None = None, registered_model: str | None = None,
                         tracking_uri: str | None = None, download_to: Path | None = None) -> Path:
    """The local folder of an ensemble, from exactly one of: ``checkpoints`` (a folder),
    ``round_`` (``work_dir/rounds/round_NNN/ensemble``), ``model_uri`` (e.g.
    ``models:/NAME@champion``, downloaded from MLflow) or, with none given, the champion of
    ``registered_model`` in the local registry. A registry model is downloaded into ``download_to``
    (a temporary folder of the caller's, so nothing is left behind)."""
    given = [x is not None for x in (model_uri, round_, checkpoints)]
    if sum(given) > 1:
        raise ValueError("give at most one of --model, --round and --checkpoints")
    if checkpoints is not None:
        if not Path(checkpoints).is_dir():
            raise FileNotFoundError(f"checkpoint folder {checkpoints} does not exist")
        return Path(checkpoints)
    if round_ is not None:
        folder = Path(work_dir or ".") / "rounds" / f"round_{round_:03d}" / "ensemble"
        if not (folder / "ensemble.json").exists():
            raise FileNotFoundError(f"round {round_} has no finished ensemble in {folder}")
        return folder
    uri = tracking_uri or default_tracking_uri(create=False)
    model_uri = model_uri or f"models:/{registered_model}@champion"
    store = sqlite_path(uri)
    if store is not None and not store.is_file():  # reading must not create an empty store
        raise FileNotFoundError(f"cannot load {model_uri}: there is no MLflow store at {store} (run `viola run` "
                                "first, give --tracking-uri, or give --checkpoints or --round)")
    client_for(uri)
    try:
        return download_ensemble(model_uri, uri, download_to)
    except mlflow.exceptions.MlflowException as e:
        first = str(e).splitlines()[0]
        raise FileNotFoundError(f"cannot load {model_uri} from {uri}: {first} (run `viola run` first, or give "
                                "--checkpoints or --round)") from None
