"""Services for the tests that need them, started on 127.0.0.1 in temporary folders and stopped by
PID: a free port, a process group stopped, a Prefect server, a PostgreSQL server (the backend store
of a multi-machine MLflow set-up)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def started_with_home(home: Path) -> list[int]:
    """Live processes (zombies aside) started with this PREFECT_HOME: what a test started, and their
    children; the test's own process excluded."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ours = f"PREFECT_HOME={home}".encode() in (proc / "environ").read_bytes()
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            if ours and not zombie and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


PREFECT = str(Path(sys.executable).parent / "prefect")


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check`` each second until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def prefect_env(home: Path, port: int) -> dict[str, str]:
    """The environment of a test's Prefect commands: its own home, its server, no telemetry."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_PROFILES_PATH", None)
    return env


@contextlib.contextmanager
def prefect_server(env: dict[str, str], port: int, log) -> Iterator[subprocess.Popen]:
    """`prefect server start` on 127.0.0.1:``port`` (output to the open file ``log``), healthy
    before it is yielded, stopped with its process group after."""
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: healthy() or server.poll() is not None, 120, "the Prefect server")
        assert server.poll() is None, f"the Prefect server stopped with exit code {server.returncode}"
        yield server
    finally:
        stop_group(server)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server with an empty database ``mlflow``; yields its SQLAlchemy URL. PostgreSQL
    refuses to run as root: there it runs as ``nobody`` in a folder of its own."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    pytest.importorskip("psycopg")
    folder = Path(tempfile.mkdtemp(prefix="viola-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chmod(folder, 0o755)
        os.chown(folder, 65534, 65534)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    port = free_port()
    run = {"check": True, "capture_output": True, "timeout": 120, "cwd": folder}
    proc = None
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(folder / "data"), "-U", "mlflow",
                        "--auth=trust", "-E", "UTF8"], **run)
        proc = subprocess.Popen([*as_user, str(bindir / "postgres"), "-D", str(folder / "data"), "-h", "127.0.0.1",
                                 "-p", str(port), "-k", str(folder)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=folder)
        deadline = time.monotonic() + 60
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], **run)
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()  # PostgreSQL's smart shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
