"""Progress for people: a bar in a terminal, log lines with the time left elsewhere."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from tasks import progress as progress_mod
from tasks.progress import format_seconds, interactive, progress


def test_time_is_written_for_people():
    assert [format_seconds(s) for s in (0, 12.4, 65, 3600 + 7 * 60 + 3)] == ["0 s", "12 s", "1 min 05 s",
                                                                            "1 h 07 min"]


def test_plain_lines_away_from_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv("VIOLA_PROGRESS", "log")
    assert not interactive()
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    log = logging.getLogger("tests.progress")
    with caplog.at_level(logging.INFO, logger="tests.progress"), progress("train m", 4, log, unit="steps") as bar:
        for i, t in enumerate((10.0, 20.0, 50.0, 60.0)):
            now[0] = t
            bar.advance(note=f"loss {1 / (i + 1):.2f}")
    lines = [r.getMessage() for r in caplog.records]
    # the first item, one every 30 s, and the last: with the time spent and the time left
    assert lines[0] == "train m: 1/4 steps, 10 s, about 30 s left (loss 1.00)"
    assert lines[-1].startswith("train m: 4/4 steps, 1 min 00 s") and "left" not in lines[-1]
    assert len(lines) == 3


def test_no_lines_without_a_logger(monkeypatch, caplog):
    monkeypatch.setenv("VIOLA_PROGRESS", "log")
    with caplog.at_level(logging.DEBUG), progress("segment", None) as bar:
        bar.set_total(2)
        bar.update(2, "a.nii.gz")
    assert not caplog.records and bar.done == 2


def test_a_bar_in_a_terminal_keeps_log_records_and_restores_the_handlers(monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.setenv("VIOLA_PROGRESS", "bar")
    logger = logging.getLogger("tests.progress.bar")
    handler = logging.StreamHandler(sys.__stderr__)
    logger.addHandler(handler)
    seen = io.StringIO()
    try:
        with progress("preprocess", 3, logger) as bar:
            assert handler.stream is not sys.__stderr__  # rerouted above the bar
            handler.setStream(seen)  # what the bar's console passes on is recorded here
            logger.warning("skipping x.nii.gz: truncated")
            for _ in range(3):
                bar.advance()
            handler.setStream(sys.__stderr__)  # as it was rerouted, to check the restore
        assert bar.done == 3 and bar.remaining_s() == 0
        assert "skipping x.nii.gz: truncated" in seen.getvalue()
    finally:
        logger.removeHandler(handler)


def test_a_second_reporter_logs_while_a_bar_is_drawn(monkeypatch, caplog):
    """Two tasks of one process at once: one bar on the terminal, the other in log lines."""
    pytest.importorskip("rich")
    monkeypatch.setenv("VIOLA_PROGRESS", "bar")
    log = logging.getLogger("tests.progress.second")
    with (progress("train a", 2) as first, caplog.at_level(logging.INFO, logger="tests.progress.second"),
          progress("train b", 2, log) as second):
        assert isinstance(first, progress_mod._BarProgress) and type(second) is progress_mod.Progress
        second.advance()
        second.advance()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["train b: 1/2", "train b: 2/2"]
    with progress("after", 1) as third:  # the terminal is free again
        assert isinstance(third, progress_mod._BarProgress)
