"""Progress of long steps for people: a bar with time remaining in a terminal (rich), throttled log
lines with the same numbers everywhere else (CI, Prefect workers, Ray, files).

    with progress("preprocess", total=len(scans), log=log) as bar:
        for scan in scans:
            ...
            bar.advance(note=scan_id)

``VIOLA_PROGRESS=bar`` or ``=log`` overrides the choice (default: a bar when stderr is a terminal).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PROJECT_LOGGERS", "Progress", "format_seconds", "interactive", "progress", "worker_logging"]

PROJECT_LOGGERS = ("viola_models", "data_catalog", "tasks", "flows")
LEVEL_ENV = "VIOLA_LOG_LEVEL"  # the driver's level, handed to the processes that run its tasks

_LOG_EVERY_S = 30.0  # a log line at most this often (and at the first and last item)
_bar_lock = threading.Lock()
_drawing = False  # a bar is on the terminal


def interactive() -> bool:
    """Whether progress is drawn as a bar: stderr is a terminal (or VIOLA_PROGRESS says so)."""
    choice = os.environ.get("VIOLA_PROGRESS", "auto").lower()
    if choice in ("bar", "log"):
        return choice == "bar"
    return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"


def worker_logging() -> None:
    """In a process that runs tasks for a driver (Ray's ``worker_process_setup_hook``): the
    project's loggers at the driver's level (``VIOLA_LOG_LEVEL``, default INFO), so that a member's
    steps, loss and time left reach the driver's terminal through Ray's log forwarding, as they do
    when the member trains in the driver. Without it a worker keeps Python's default, WARNING."""
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level if level in logging.getLevelNamesMapping() else "INFO")


def format_seconds(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Counts done items of ``total`` and reports them; see :func:`progress`."""

    def __init__(self, description: str, total: int | None, log: logging.Logger | None = None,
                 unit: str = "") -> None:
        self.description, self.total, self.unit = description, total, unit
        self.log = log
        self.done = 0
        self.started = time.perf_counter()
        self._last_log = -_LOG_EVERY_S

    def remaining_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first item or without a total)."""
        if not self.total or not self.done:
            return None
        return (time.perf_counter() - self.started) / self.done * (self.total - self.done)

    def advance(self, n: int = 1, note: str = "") -> None:
        self.update(self.done + n, note)

    def set_total(self, total: int | None) -> None:
        self.total = total

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        last = self.total is not None and done >= self.total
        if self.log is not None and (last or now - self._last_log >= _LOG_EVERY_S):
            self._last_log = now
            self.log.info("%s", self.line(note))

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        text = f"{self.description}: {count}{f' {self.unit}' if self.unit else ''}, {format_seconds(elapsed)}"
        left = self.remaining_s()
        if left is not None and self.done < (self.total or 0):
            text += f", about {format_seconds(left)} left"
        return f"{text}{f' ({note})' if note else ''}"

    def close(self) -> None:
        pass


class _BarProgress(Progress):
    """The same counts drawn as a rich progress bar on stderr; log records printed above it."""

    def __init__(self, description: str, total: int | None, log: logging.Logger | None = None,
                 unit: str = "") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        super().__init__(description, total, log, unit)
        self._console = Console(stderr=True)
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("elapsed,"), TimeRemainingColumn(),
                                 TextColumn("left"),
                                 TextColumn("{task.fields[note]}"), console=self._console, redirect_stderr=True,
                                 redirect_stdout=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total, note="")
        self._rerouted = _route_logging(sys.stderr)  # handlers write through the bar's console

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._bar.update(self._task, total=total)

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        self._bar.update(self._task, completed=done, note=note)

    def close(self) -> None:
        _restore_logging(self._rerouted)
        self._bar.stop()


def _route_logging(stream) -> list[tuple[logging.Handler, object, object]]:
    """Point the stream handlers that write to the terminal (Prefect's rich console included) at
    ``stream`` while a bar is drawn; returns what :func:`_restore_logging` puts back."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    changed, seen = [], set()
    for logger in loggers:
        for handler in logger.handlers:
            if id(handler) in seen or not isinstance(handler, logging.StreamHandler):
                continue
            seen.add(id(handler))
            if handler.stream not in (sys.__stderr__, sys.__stdout__):
                continue
            console = getattr(handler, "console", None)
            old_file = getattr(console, "file", None) if console is not None else None
            changed.append((handler, handler.stream, old_file))
            handler.setStream(stream)
            if console is not None:
                console.file = stream
    return changed


def _restore_logging(changed: list[tuple[logging.Handler, object, object]]) -> None:
    for handler, old_stream, old_file in changed:
        handler.setStream(old_stream)
        console = getattr(handler, "console", None)
        if console is not None and old_file is not None:
            console.file = old_file


@contextmanager
def progress(description: str, total: int | None, log: logging.Logger | None = None,
             unit: str = "") -> Iterator[Progress]:
    """A progress reporter for ``total`` items: a bar in a terminal, else a log line (on ``log``;
    none without one, for callers that print their own) at the first item, every 30 s and at the
    last, each with the time elapsed and left. While one bar is drawn, a second reporter of the
    process (a task in another thread, a nested step) writes log lines."""
    global _drawing
    with _bar_lock:  # one bar at a time per process (rich draws one live display); others log
        bar = interactive() and not _drawing
        _drawing = _drawing or bar
    try:
        reporter = (_BarProgress if bar else Progress)(description, total, log, unit)
        try:
            yield reporter
        finally:
            reporter.close()
    finally:
        if bar:
            with _bar_lock:
                _drawing = False
