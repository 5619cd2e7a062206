"""Runs on two data roots at once keep their Prefect state apart: each `viola run` process's
temporary Prefect server writes the database under its own data root, never a shared ~/.prefect."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from flows.cli import _isolate_prefect, _profile_root
    _isolate_prefect(_profile_root("tiny", Path(sys.argv[1]), None))
    from prefect import flow

    @flow
    def hello() -> int:
        return 1

    assert hello() == 1
""")


def test_two_data_roots_at_once_use_two_prefect_databases(tmp_path):
    home = tmp_path / "home"
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(root)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for root in roots]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-2000:]
    for root in roots:
        assert (root / "viola_work" / "prefect" / "prefect.db").stat().st_size > 0
    assert not list(home.rglob("*.db"))  # nothing in the shared Prefect home


def test_a_named_prefect_api_or_database_is_left_as_the_user_set_it(tmp_path, monkeypatch):
    from flows.cli import _isolate_prefect, _profile_root

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    _isolate_prefect(tmp_path)
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ and not (tmp_path / "viola_work").exists()
    # a user's data root that does not exist gets nothing created before it is checked
    assert _profile_root("tiny", tmp_path / "missing", None) is None
    assert _profile_root("tiny", None, [f"data.root='{tmp_path}'"]) == tmp_path.resolve()
    assert _profile_root("demo", None, None) == Path("data/demo").resolve()
