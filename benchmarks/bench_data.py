"""Data benchmark: preprocessing per full-size scan on a cache miss and on a hit, and catalog
ingest time (first ingest and an unchanged rescan).

    python benchmarks/bench_data.py [--full 3] [--ingest 200] [--ingest-size small]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_catalog import catalog
from data_catalog.phantoms import write_phantom_dataset
from data_catalog.preprocessing import PreprocessSettings, cached_preprocess, load_preprocessed
from data_catalog.scans import file_sha256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=int, default=3, help="full-size scans for the preprocessing timing")
    ap.add_argument("--ingest", type=int, default=200, help="scans for the ingest timing")
    ap.add_argument("--ingest-size", default="small", choices=["small", "full"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_phantom_dataset(tmp / "full", labelled=args.full, unlabelled=0, test=0, seed=11, size="full")
        gen = time.perf_counter() - t0
        images = sorted((tmp / "full" / "train" / "data").glob("*.nii.gz"))
        settings = PreprocessSettings()
        miss, hit, load = [], [], []
        for img in images:
            lab = tmp / "full" / "train" / "label" / img.name
            h_img, h_lab = file_sha256(img), file_sha256(lab)
            t = time.perf_counter()
            path, was_hit = cached_preprocess(tmp / "cache", img, h_img, settings, lab, h_lab)
            miss.append(time.perf_counter() - t)
            assert not was_hit
            t = time.perf_counter()
            path, was_hit = cached_preprocess(tmp / "cache", img, h_img, settings, lab, h_lab)
            hit.append(time.perf_counter() - t)
            assert was_hit
            t = time.perf_counter()
            load_preprocessed(path)
            load.append(time.perf_counter() - t)
        m, h, ld = statistics.median(miss), statistics.median(hit), statistics.median(load)
        print(f"phantom generation: {gen / args.full:.2f} s per full-size scan")
        print(f"preprocessing per full-size scan: miss {m:.3f} s, hit {h * 1e3:.2f} ms (lookup) "
              f"+ {ld * 1e3:.1f} ms (loading the arrays) -> {m / (h + ld):.0f}x faster on a hit")

        t0 = time.perf_counter()
        write_phantom_dataset(tmp / "many", labelled=args.ingest // 2, unlabelled=args.ingest - args.ingest // 2,
                              test=0, seed=3, size=args.ingest_size)
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = catalog.ingest(tmp / "many")
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = catalog.ingest(tmp / "many")
        rescan = time.perf_counter() - t0
        print(f"ingest of {len(report.new)} {args.ingest_size} scans: {first:.1f} s "
              f"({first / max(1, len(report.new)) * 1e3:.0f} ms per scan); unchanged rescan {rescan:.2f} s "
              f"({again.unchanged} unchanged); generating them took {gen:.0f} s")


if __name__ == "__main__":
    main()
