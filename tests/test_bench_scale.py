"""The scale benchmark's smallest size runs through every stage (slow: it trains nothing, but
labels its scans with a demo-sized ensemble)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_the_scale_benchmark_runs_every_stage_on_ten_scans(tmp_path):
    from benchmarks.bench_scale import STAGES, one_size, report

    res = one_size(tmp_path, 10, None)
    assert set(STAGES) <= set(res) and all(res[s]["seconds"] > 0 for s in STAGES)
    assert res["scans"] == 11  # 10, and the rescan's one new file
    assert res["runs"] == 1 and 0 < res["store_mb"] < 5  # one run per round, not one per scan
    assert 0 < res["rescan_share"] < 1
    assert not list(tmp_path.glob("run_*")) and (tmp_path / "phantoms_10" / "unlabelled").is_dir()
    again = one_size(tmp_path, 10, None)  # the phantoms are reused, the data root made anew
    assert again["scans"] == 11
    lines = report([10, 10], {10: again}).splitlines()  # a size against itself: slope 1
    assert lines[0].startswith("stage") and len(lines) == 1 + len(STAGES) + 2
    assert all(line.split()[0] == stage and line.endswith(" 1.00") for line, stage in zip(lines[1:], STAGES))
