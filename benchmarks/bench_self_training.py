"""Does a pseudo-label round beat the labels alone? Self-training against its controls, on phantoms.

For each phantom seed (a fresh data root: labelled, unlabelled and test phantoms, with the hidden
truth of the unlabelled ones), through the real pipeline (the `self-training` flow):

* round 0, then round 1 with its two siblings: the control (the same round without pseudo-labels:
  same steps, schedule, seeds and initial weights) and the oracle (the unlabelled scans with their
  true labels instead of pseudo-labels);
* round 2 (forced: the data did not change) with its control, which continues the control chain,
  so that control 2 has had exactly the compute of round 2;
* with ``--options``, round 1 again in a copy of the data root after round 0, once per variant:
  the paper profile's stricter rule (target Dice 0.8, unweighted), a lenient one (0.3), the
  pseudo-label loss unweighted, a student trained from scratch (noisy student) and a last
  labelled-only fine-tune,
  each with its own control where the option changes what the control does.

It prints one table: test DSC and NSD, mean and sd over the seeds, per arm; gap closed =
(self-training - control) / (oracle - control); the quality of the selected pseudo-labels against
the hidden truth; the rank correlation of confidence and true Dice. Nothing here looks at a test
scan to choose anything: the profile's settings are used as they are.

    python benchmarks/bench_self_training.py --out bench_out [--seeds 2026 2027 2028] [--options]
    python benchmarks/bench_self_training.py --out bench_out --report     # the table of what has run

Each step is resumable: run the same command again after an interruption. The demo profile's
core arms took about 65 minutes per seed on 2 CPU cores with two seeds side by side (one process
each, ``--seeds``, ``OMP_NUM_THREADS=1``, separate ``--out`` and ``PREFECT_HOME``; ``--report`` reads
every ``seed_*.json`` of one ``--out``); the options roughly double it. The core arms of every seed
run before any option.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIONS = {  # overrides of the profile, and whether the option changes what its control does
    "strict": ({"pseudo": {"rule": {"min_predicted_dice": 0.8}}, "student": {"pseudo_weight": "uniform"}}, False),
    "lenient": ({"pseudo": {"rule": {"min_predicted_dice": 0.3}}}, False),
    "unweighted": ({"student": {"pseudo_weight": "uniform"}}, False),
    "scratch": ({"student": {"init": "scratch"}}, True),
    "final-labelled": ({"student": {"labelled_only_steps": 100}}, True),
}


def _write_data(root: Path, seed: int, labelled: int, unlabelled: int, test: int) -> None:
    from data_catalog.phantoms import write_phantom_dataset

    if not (root / "train").exists():
        write_phantom_dataset(root, labelled=labelled, unlabelled=unlabelled, test=test, seed=seed, size="small")


def _branch(src: Path, dst: Path) -> None:
    """A copy of a data root after round 0 (hard links: nothing is written to the source)."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def skip(folder: str, names: list[str]) -> list[str]:  # round 0 only, and no record of a call in progress
        return [n for n in names if (Path(folder).name == "rounds" and n != "round_000")
                or (Path(folder).name == "viola_work" and n in ("invocation.json", ".run.lock", ".run.owner"))]

    shutil.copytree(src, tmp, ignore=skip, copy_function=os.link)
    tmp.rename(dst)


def _record(results: dict, key: str, summary: dict, client) -> None:
    if summary.get("skipped"):
        return
    run = client.get_run(summary["run_id"])
    m = run.data.metrics
    results[key] = {"dsc": summary["test"].get("test/dsc"), "nsd": summary["test"].get("test/nsd"),
                    "seconds": m.get("round/seconds"), "n_pseudo": m.get("round/n_pseudo_labels"),
                    **{k: v for k, v in m.items() if k.startswith("pseudo/")}}


def run_seed(out: Path, seed: int, profile: str, uri: str, stage: str, counts: tuple[int, int, int]) -> dict:
    """``stage``: "core" (rounds 0-2 with controls and the oracle) or "options" (needs the core's round 0)."""
    from mlflow.tracking import MlflowClient

    from flows.self_training import self_training

    client = MlflowClient(uri)
    results_file = out / f"seed_{seed}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    root = out / f"seed_{seed}" / "data"
    _write_data(root, seed, *counts)
    common = {"experiment": "bench-self-training"}

    def run(data_root: Path, name: str, **kw) -> list[dict]:
        t0 = time.perf_counter()
        over = {"tracking": {**common, "registered_model": f"bench-{name}"}, **kw.pop("overrides", {})}
        out_ = self_training(profile=profile, data_root=str(data_root), tracking_uri=uri, overrides=over, **kw)
        logging.getLogger("bench").warning("seed %d %s: %.1f min", seed, name, (time.perf_counter() - t0) / 60)
        return out_

    if stage == "core":
        # each call once: a restarted benchmark must not run a finished call again (the flow would
        # take it for a new call and run the next rounds)
        if not {"round1", "round1-control", "round1-oracle"} <= set(results):
            for s in run(root, "core", rounds=2, control=True, oracle=True):
                key = f"round{s['round']}" + ("" if s["arm"] == "self-training" else f"-{s['arm']}")
                _record(results, key, s, client)
            results_file.write_text(json.dumps(results, indent=1))
        if not {"round2", "round2-control"} <= set(results):
            for s in run(root, "core", rounds=1, control=True, force=True):
                if s["round"] == 2:
                    _record(results, "round2" + ("" if s["arm"] == "self-training" else f"-{s['arm']}"), s, client)
            results_file.write_text(json.dumps(results, indent=1))
    else:
        for name, (over, with_control) in OPTIONS.items():
            vroot = out / f"seed_{seed}" / f"option-{name}"
            _branch(root, vroot)
            for s in run(vroot, name, rounds=1, control=with_control, overrides=over):
                if s["round"] == 1:
                    _record(results, f"{name}" + ("" if s["arm"] == "self-training" else f"-{s['arm']}"), s, client)
            results_file.write_text(json.dumps(results, indent=1))
    return results


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def report(out: Path) -> str:
    per_seed = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in sorted(out.glob("seed_*.json"))}
    if not per_seed:
        return f"no results in {out}"
    for seed, results in per_seed.items():  # round 0 finished by an earlier call: from its state
        state = out / f"seed_{seed}" / "data" / "viola_work" / "rounds" / "round_000" / "state.json"
        if "round0" not in results and state.exists():
            test = json.loads(state.read_text()).get("test", {})
            results["round0"] = {"dsc": test.get("test/dsc"), "nsd": test.get("test/nsd"), "seconds": None}
    arms = [("round0", "round 0 (labelled only)"), ("round1-control", "control 1 (labelled only, equal compute)"),
            ("round1", "self-training round 1"), ("round1-oracle", "oracle 1 (true labels)"),
            ("round2-control", "control 2"), ("round2", "self-training round 2"),
            ("strict", "round 1, target Dice 0.8, unweighted"),
            ("lenient", "round 1, target Dice 0.3"),
            ("unweighted", "round 1, pseudo-label loss unweighted"),
            ("scratch-control", "control 1, student from scratch"), ("scratch", "round 1, student from scratch"),
            ("final-labelled-control", "control 1, + labelled-only fine-tune"),
            ("final-labelled", "round 1, + labelled-only fine-tune")]
    seeds = sorted(per_seed)
    lines = [f"self-training benchmark: seeds {seeds}; {platform.node()} ({os.cpu_count()} CPU)", "",
             f"{'arm':<44}{'n':>3}  {'test DSC (mean ± sd)':>22}  {'test NSD (mean ± sd)':>22}  {'min/run':>8}"]
    for key, label in arms:
        rows = [per_seed[s][key] for s in seeds if key in per_seed[s]]
        if rows:
            mins = [r["seconds"] / 60 for r in rows if r.get("seconds")]  # wall time: the machine was shared
            lines.append(f"{label:<44}{len(rows):>3}  {_ms([r['dsc'] for r in rows]):>22}  "
                         f"{_ms([r['nsd'] for r in rows]):>22}  "
                         f"{f'{statistics.mean(mins):.1f}' if mins else '-':>8}")

    def diff(a: str, b: str, metric: str = "dsc") -> list[float]:
        return [per_seed[s][a][metric] - per_seed[s][b][metric] for s in seeds if a in per_seed[s] and b in per_seed[s]]

    lines += ["", "gains over the equal-compute control (test DSC, mean ± sd over seeds):"]
    for a, b, label in [("round1", "round1-control", "round 1 - control 1"),
                        ("round2", "round2-control", "round 2 - control 2"),
                        ("round1-oracle", "round1-control", "oracle 1 - control 1"),
                        ("round1", "round0", "round 1 - round 0"),
                        ("round1-control", "round0", "control 1 - round 0"),
                        ("round2", "round1", "round 2 - round 1"),
                        ("strict", "round1-control", "target 0.8, unweighted - control 1"),
                        ("lenient", "round1-control", "target 0.3 - control 1"),
                        ("unweighted", "round1-control", "unweighted - control 1"),
                        ("scratch", "scratch-control", "scratch - its control"),
                        ("final-labelled", "final-labelled-control", "final-labelled - its control")]:
        d = diff(a, b)
        if d:
            lines.append(f"  {label:<32}{_ms(d):>22}  (per seed: {', '.join(f'{v:+.4f}' for v in d)})")
    gaps = []
    for s in seeds:
        r = per_seed[s]
        if {"round1", "round1-control", "round1-oracle"} <= set(r):
            span = r["round1-oracle"]["dsc"] - r["round1-control"]["dsc"]
            gaps.append((r["round1"]["dsc"] - r["round1-control"]["dsc"]) / span if span > 0 else float("nan"))
    if gaps:
        lines.append(f"  gap closed by round 1 = (round 1 - control) / (oracle - control): {_ms(gaps)} "
                     f"(per seed: {', '.join(f'{g:.0%}' for g in gaps)})")
    for rnd in ("round1", "round2"):
        lines += ["", f"pseudo-labels of round {rnd[-1]} against the hidden truth (mean ± sd over seeds):"]
        lines += _pseudo_lines([per_seed[s][rnd] for s in seeds if rnd in per_seed[s]])
    return "\n".join(lines)


def _pseudo_lines(rows: list[dict]) -> list[str]:
    lines = []
    for key, label in [("pseudo/n_selected", "selected (of the unlabelled scans)"),
                       ("pseudo/n_candidates", "candidates"),
                       ("pseudo/true_dice_selected", "true Dice of the selected"),
                       ("pseudo/true_dice_rejected", "true Dice of the rejected"),
                       ("pseudo/mean_predicted_dice_selected", "predicted Dice of the selected"),
                       ("pseudo/spearman_agreement", "Spearman(agreement, true Dice)"),
                       ("pseudo/spearman_union_agreement", "Spearman(union agreement, true Dice)"),
                       ("pseudo/spearman_mean_max_probability", "Spearman(mean max-probability, true Dice)"),
                       ("pseudo/spearman_predicted_dice", "Spearman(predicted Dice, true Dice)"),
                       ("pseudo/calibration_points", "calibration points")]:
        vals = [r.get(key) for r in rows]
        if any(v is not None for v in vals):
            lines.append(f"  {label:<44}{_ms(vals):>22}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working folder (data roots, MLflow store, results)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2026, 2027, 2028])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--labelled", type=int, default=4)
    ap.add_argument("--unlabelled", type=int, default=16)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--options", action="store_true", help="also the options from the literature")
    ap.add_argument("--report", action="store_true", help="only print the table of what has run")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        from flows.cli import _setup

        _setup(flows=True)
        (out / "mlruns").mkdir(exist_ok=True)
        uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
        for stage in ("core", "options") if args.options else ("core",):
            for seed in args.seeds:  # every seed's core arms first: the headline numbers come early
                run_seed(out, seed, args.profile, uri, stage, (args.labelled, args.unlabelled, args.test))
                (out / "report.txt").write_text(report(out) + "\n")
    text = report(out)
    (out / "report.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
