"""Scale benchmark: how a round's work around the networks grows from 10 to 1,000 unlabelled scans.

For each size N (small phantoms, generated once into ``--out`` and reused by later calls), on a
fresh copy of the data root (hard links), the time and peak memory (the process's resident set
above its level at the stage's start, sampled every 20 ms) of:

* ingest, cold; then a rescan after 1 % new unlabelled files (at least one);
* catalog queries (usable scans, the catalog hash, the fold split, the lineage table, ``describe``);
* preprocessing of the unlabelled scans with the demo profile's settings, cold, then cached;
* pseudo-labelling of every unlabelled scan by a demo-sized ensemble (viola_small and
  nnunet_small, random weights unless ``--ensemble DIR``) on the preprocessed cache;
* selection (the demo profile's rule, the truth's Dice) and its lineage rows in the catalog;
* the MLflow logging of the round as ``tasks.pseudo.pseudo_label`` does it (the pseudo-label
  table, the dataset inputs, metrics) in a SQLite store, and the store's size afterwards.

Each stage's cost per scan is printed; the last column is the per-scan cost against the
previous size's (1.0: linear; the target at 1,000 scans is within 1.5x of 100). The rescan's share
of the cold ingest is printed too (target: at most 5 %).

    python benchmarks/bench_scale.py --out scale_out [--sizes 10 100 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.bench_predict import machine, make_ensemble
from data_catalog import catalog
from data_catalog.phantoms import write_phantom_dataset
from data_catalog.preprocessing import cached_preprocess

STAGES = ("ingest_cold", "ingest_rescan", "catalog_queries", "preprocess_cold", "preprocess_cached", "pseudo_label",
          "selection", "mlflow_logging")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def measured(results: dict, stage: str):
    """Seconds and peak resident memory above the start (MB) of the ``with`` body."""
    start, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
        results[stage] = {"seconds": seconds, "peak_mb": max(0.0, max(peak[0], _rss_mb()) - start)}


def phantoms(out: Path, n: int) -> tuple[Path, Path]:
    """The size-``n`` data root (4 labelled, ``n`` unlabelled) and its 1 % extra unlabelled scans,
    generated once."""
    base, extra = out / f"phantoms_{n}", out / f"extra_{n}"
    if not (base / "unlabelled").is_dir():
        write_phantom_dataset(base, labelled=4, unlabelled=n, test=0, seed=5000 + n, size="small")
    if not (extra / "unlabelled").is_dir():
        write_phantom_dataset(extra, labelled=0, unlabelled=max(1, n // 100), test=0, seed=9000 + n, size="small")
        for p in (extra / "unlabelled").iterdir():  # names of their own: new scans, not replacements
            p.rename(p.with_name("extra_" + p.name))
    return base, extra


MEMBERS = {"demo": (("viola_small", "nnunet_small"), (48, 48, 16)),
           "tiny": (("viola_tiny", "nnunet_tiny"), (32, 32, 8))}


def _log_round(root: Path, n: int, decided):
    """What a round logs of its pseudo-labels to a fresh SQLite store: the table, the datasets, the counts."""
    from tasks import tracking

    store = root / "mlruns"
    store.mkdir()
    client = tracking.client_for(f"sqlite:///{store / 'mlflow.db'}")
    experiment = tracking.experiment_id(client, f"scale-{n}")
    run = tracking.create_run(client, experiment, "round 1", tags={})
    shown = decided.drop(columns=[c for c in ("image", "image_hash") if c in decided])
    tracking.log_table(client, run, shown.assign(members=shown["members"].map(json.dumps)), "pseudo/pseudo_labels.csv")
    chosen = decided[decided.selected]
    tracking.log_datasets(client, run, {"pseudo": [{"scan_id": r.scan_id, "image_hash": r.image_hash,
                                                    "label_hash": r.mask_hash} for r in chosen.itertuples()]},
                          str(root))
    tracking.log_metrics(client, run, {"pseudo/n_candidates": len(decided), "pseudo/n_selected": len(chosen)}, 1)
    return client, experiment


def one_size(out: Path, n: int, ensemble_dir: Path | None, members: str = "demo") -> dict:
    from data_catalog.selection import select_pseudo_labels
    from flows.profiles import load_profile
    from viola_models.inference.ensemble import load_ensemble
    from viola_models.inference.pseudo_labels import label_scans, with_true_dice

    base, extra = phantoms(out, n)
    # a new folder per call: MLflow keeps its SQLite engine per store path for the process's life
    root = Path(tempfile.mkdtemp(prefix=f"run_{n}_", dir=out)) / "data"
    shutil.copytree(base, root, copy_function=os.link)
    settings = load_profile("demo", root)
    res: dict = {}
    with measured(res, "ingest_cold"):
        catalog.ingest(root)
    for p in (extra / "unlabelled").iterdir():
        os.link(p, root / "unlabelled" / p.name)
    with measured(res, "ingest_rescan"):
        catalog.ingest(root)
    with measured(res, "catalog_queries"):
        unlabelled = catalog.usable_scans(root, "unlabelled")
        catalog.catalog_hash(root)
        catalog.update_folds(root, 2, 0)
        catalog.load_pseudo_labels(root)
        catalog.describe(root)
    scans = {r.scan_id: {"image": str(root / r.image_path), "image_hash": r.image_hash}
             for r in unlabelled.itertuples()}
    cache = root / "viola_work" / "cache"
    for stage in ("preprocess_cold", "preprocess_cached"):
        with measured(res, stage):
            for s in scans.values():
                cached_preprocess(cache, Path(s["image"]), s["image_hash"], settings.preprocess)
    architectures, patch = MEMBERS[members]
    ens = ensemble_dir or make_ensemble(out / f"ensemble_{members}", 2, architectures, patch,
                                        settings.preprocess)
    with measured(res, "pseudo_label"):
        table = label_scans(lambda: load_ensemble(ens, device="cpu"), scans, root / "pseudo", "bench",
                            cache_dir=cache, overlap=settings.pseudo.overlap, tta=False)
    with measured(res, "selection"):
        ensemble = load_ensemble(ens, device="cpu")
        rule = settings.pseudo.rule
        decided = with_true_dice(select_pseudo_labels(table, rule, ensemble.calibration_for(rule.score)),
                                 root / catalog.TRUTH_DIR)
        catalog.record_pseudo_labels(root, [{**r, "round": 1, "teacher_run_id": "bench",
                                             "mask_path": os.path.relpath(r["mask_path"], root)}
                                            for r in decided.to_dict("records") if isinstance(r["mask_path"], str)])
    with measured(res, "mlflow_logging"):
        client, experiment = _log_round(root, n, decided)
    store = root / "mlruns"
    res["store_mb"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20
    res["runs"] = len(client.search_runs([experiment]))
    res["scans"] = len(scans)
    res["rescan_share"] = res["ingest_rescan"]["seconds"] / res["ingest_cold"]["seconds"]
    shutil.rmtree(root.parent, ignore_errors=True)
    return res


def report(sizes: list[int], results: dict[int, dict]) -> str:
    lines = [f"{'stage':<18}" + "".join(f"{f'{n} s/scan':>14}{'MB':>7}" for n in sizes) + f"{'slope':>8}"]
    for stage in STAGES:
        row, per = f"{stage:<18}", []
        for n in sizes:
            r = results[n][stage]
            per.append(r["seconds"] / results[n]["scans"])
            row += f"{per[-1]:>14.4f}{r['peak_mb']:>7.0f}"
        slope = per[-1] / per[-2] if len(per) > 1 and per[-2] > 0 else float("nan")
        lines.append(row + f"{slope:>8.2f}")
    for n in sizes:
        r = results[n]
        lines.append(f"# {n} scans: rescan of 1 % new files = {r['rescan_share']:.1%} of the cold ingest; MLflow "
                     f"store {r['store_mb']:.2f} MB, {r['runs']} run(s)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for the phantoms (reused); default: temporary")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--ensemble", type=Path, default=None, help="a trained ensemble folder instead of random weights")
    ap.add_argument("--members", choices=sorted(MEMBERS), default="demo",
                    help="random-weight members: the demo's, or tiny ones (viola_tiny, nnunet_tiny, 32x32x8) for the "
                         "stages around the networks at sizes where the demo's take hours on a CPU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"members: {args.ensemble or args.members}")
    with tempfile.TemporaryDirectory() as tmp:
        out = (args.out or Path(tmp)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        results = {}
        for n in args.sizes:
            results[n] = one_size(out, n, args.ensemble, args.members)
            print(f"# {n} scans done", flush=True)
        text = report(args.sizes, results)
        print(text)
        if args.out:
            (out / "scale_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
