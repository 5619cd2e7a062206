"""The processes a run started (Ray's head and agents, a served MLflow store, Prefect's temporary server),
recorded beside the data root so that none outlives the run: a stopped run stops them, and the next run
on the data root stops what a killed one (kill -9) left behind.

Linux's ``/proc`` tells descendants and start times; a process is only ever stopped when its PID and start
time both match the record (a PID the system gave to another program since is left alone). Elsewhere the
record stays empty and nothing is stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from data_catalog.scans import atomic_write

__all__ = ["RECORD", "descendants", "recorded_children", "stop_leftovers", "stop_processes"]

log = logging.getLogger(__name__)
RECORD = ".run.children.json"
_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a live process, None if it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None


def _command(pid: int) -> str:
    try:
        words = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return " ".join(w.decode(errors="replace") for w in words if w)[:160]


def descendants(pid: int) -> list[dict]:
    """Every live process below ``pid``: [{"pid", "start", "cmd"}]."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in _PROC.glob("[0-9]*"):
        st = _stat(int(entry.name))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[1]
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append({"pid": p, "start": starts[p], "cmd": _command(p)})
        todo += children.get(p, [])
    return sorted(found, key=lambda d: d["pid"])


def _alive(proc: dict) -> bool:
    st = _stat(int(proc["pid"]))
    return st is not None and st[1] == proc["start"]


def stop_processes(procs: list[dict], grace_s: float = 10.0) -> list[dict]:
    """SIGTERM, then after ``grace_s`` SIGKILL, to each recorded process still alive as recorded;
    returns the ones it found alive."""
    alive = [p for p in procs if _alive(p)]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for p in alive:
            if _alive(p):
                with contextlib.suppress(OSError):
                    os.kill(int(p["pid"]), sig)
        deadline = time.monotonic() + wait
        while any(_alive(p) for p in alive) and time.monotonic() < deadline:
            time.sleep(0.1)
    return alive


def _name(cmd: str) -> str:
    words = cmd.split()
    for key in ("raylet", "gcs_server", "dashboard", "runtime_env", "mlflow", "prefect", "uvicorn"):
        if key in cmd:
            return key
    return Path(words[0]).name if words else "?"


def stop_leftovers(work_dir: Path) -> str | None:
    """What a run that died (kill -9) left running on this data root, stopped by PID (the caller holds
    the data root's lock, so the recorded run is gone); a one-line account, or None when nothing was left."""
    path = Path(work_dir) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _alive(record.get("owner", {"pid": -1, "start": -1})):
        return None  # its run is alive (it let go of the lock, but not yet of its children)
    stopped = stop_processes(record.get("children", []))
    path.unlink(missing_ok=True)
    if not stopped:
        return None
    names = ", ".join(f"{_name(p['cmd'])} ({p['pid']})" for p in stopped[:8]) + " ..." * (len(stopped) > 8)
    return (f"stopped {len(stopped)} process(es) left by the run that died on {Path(work_dir).parent} "
            f"(pid {record['owner']['pid']}): {names}")


@contextlib.contextmanager
def recorded_children(work_dir: Path, every_s: float = 2.0) -> Iterator[threading.Event]:
    """Record this process's descendants in ``work_dir/.run.children.json`` every ``every_s`` while
    the block runs. Set the yielded event to have the block's end stop them (an interrupted run);
    after a normal end their owners have stopped them, and the record is removed."""
    path = Path(work_dir) / RECORD
    me = {"pid": os.getpid(), "start": (_stat(os.getpid()) or (0, -1))[1]}
    stop, interrupted = threading.Event(), threading.Event()
    seen: dict[int, dict] = {}

    def snapshot() -> None:
        now = descendants(os.getpid())
        if {p["pid"] for p in now} - set(seen) or any(not _alive(p) for p in seen.values()):
            seen.clear()
            seen.update({p["pid"]: p for p in now})
            text = json.dumps({"owner": me, "children": list(seen.values())}, indent=1)
            atomic_write(path, lambda tmp: tmp.write_text(text))

    def loop() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError, ValueError):
                snapshot()

    if not _PROC.is_dir():
        yield interrupted
        return
    thread = threading.Thread(target=loop, name="record-children", daemon=True)
    thread.start()
    try:
        yield interrupted
    finally:
        stop.set()
        thread.join(timeout=5)
        if interrupted.is_set():
            left = stop_processes(descendants(os.getpid()), grace_s=5.0)
            if left:
                log.warning("stopped %d process(es) this run started: %s", len(left),
                            ", ".join(f"{_name(p['cmd'])} ({p['pid']})" for p in left[:8]))
        path.unlink(missing_ok=True)
