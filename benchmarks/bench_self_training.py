"""Does a pseudo-label round beat the labels alone? Self-training against its controls, on phantoms.

For each phantom seed (a fresh data root: labelled, unlabelled and test phantoms, with the hidden
truth of the unlabelled ones), through the real pipeline (the `self-training` flow), with the
``bench`` profile by default (many test phantoms, short rounds):

* round 0, then round 1 with its two siblings: the control (the same round without pseudo-labels:
  same steps, schedule, seeds and initial weights) and the oracle (the unlabelled scans with their
  true labels instead of pseudo-labels);
* round 2 (forced: the data did not change) with its control, which continues the control chain,
  so that control 2 has had exactly the compute of round 2;
* with ``--options``, round 1 again in a copy of the data root after round 0, once per variant
  (``OPTIONS``: the paper's student, a stricter or a lenient rule, no rank selection, no strong
  noise, no balanced batches, a student from scratch, a longer fine-tune, uncertain voxels left out
  of the loss), each with its own control where the option
  changes what the control does.

What it reports (``report.txt``):

* per arm, test DSC and NSD, mean ± sd over the seeds; the members' out-of-fold validation Dice;
  the transductive Dice (the ensemble on the unlabelled scans against their hidden truth, the
  paper's own setting) of round 0, control 1, round 1 and round 2's teacher;
* for the key differences (round 1 - control 1, round 1 - round 0, round 2 - round 1, ...) the
  primary statistic, fixed before the runs: the mean paired per-case difference of test DSC at the
  round's final ensemble, with its 95 % interval from a two-level bootstrap (seeds, then test cases
  within a seed, the same cases for both arms: ``viola_models.evaluation.scoring.two_level_bootstrap``), and
  the share of seeds where the first arm wins; gap closed = (round 1 - control 1) / (oracle 1 -
  control 1) with its interval;
* the quality of the selected pseudo-labels against the hidden truth, and the rank correlation of
  confidence and true Dice.

Nothing here looks at a test scan to choose anything: the profile's settings are used as they
are, and were chosen on validation scans and the unlabelled scans' hidden truth of other seeds.

    python benchmarks/bench_self_training.py --out bench_out [--seeds 2026 ...] [--options]
    python benchmarks/bench_self_training.py --out bench_out --report     # the table of what has run

Each step is resumable: run the same command again after an interruption. The core arms of every
seed run before any option. One seed of the core takes about 19 minutes on 2 CPU cores; two seeds
side by side (two processes, ``OMP_NUM_THREADS=1``, their own ``--out`` and ``PREFECT_HOME``) finish
sooner, and ``--report`` reads every ``seed_*.json`` and ``seed_*_cases.csv`` of one ``--out``.
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
    "paper-student": ({"pseudo": {"rule": {"min_predicted_dice": 0.8, "rank_fraction": 0.0}},
                       "student": {"pseudo_weight": "uniform", "batch_pseudo_fraction": 0.0, "pseudo_augment": "same",
                                   "pseudo_rampup_steps": 0}}, False),
    "no-rank": ({"pseudo": {"rule": {"rank_fraction": 0.0}}}, False),
    "same-noise": ({"student": {"pseudo_augment": "same"}}, False),
    "one-pool": ({"student": {"batch_pseudo_fraction": 0.0}}, False),
    "lenient": ({"pseudo": {"rule": {"min_predicted_dice": 0.3}}}, False),
    "scratch": ({"student": {"init": "scratch"}}, True),
    "finetune-600": ({"finetune": {"max_steps": 600}}, True),  # both arms three times longer
    # voxel-level confidence: the voxels the teacher is unsure of (probability 0.3-0.7) carry no loss
    "ignore-band": ({"pseudo": {"ignore_band": [0.3, 0.7]}}, False),
}

CORE = ("round0", "round1", "round1-control", "round1-oracle", "round2", "round2-control")


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

    own = ("invocation.json", ".run.lock", ".run.owner", "prefect")  # a call in progress, its Prefect database

    def skip(folder: str, names: list[str]) -> list[str]:  # round 0 only
        return [n for n in names if (Path(folder).name == "rounds" and n != "round_000")
                or (Path(folder).name == "viola_work" and n in own)]

    shutil.copytree(src, tmp, ignore=skip, copy_function=os.link)
    tmp.rename(dst)


def _record(results: dict, key: str, summary: dict, client) -> None:
    if summary.get("skipped"):
        return
    run = client.get_run(summary["run_id"])
    m = run.data.metrics
    results[key] = {"dsc": summary["test"].get("test/dsc"), "nsd": summary["test"].get("test/nsd"),
                    "val_dice": m.get("members/mean_val_dice"), "seconds": m.get("round/seconds"),
                    "n_pseudo": m.get("round/n_pseudo_labels"), "teaches": summary.get("teaches"),
                    "guard": summary.get("guard", ""),
                    **{k: v for k, v in m.items() if k.startswith("pseudo/")}}


ARM_DIRS = {"round0": "round_000", "round1": "round_001", "round1-control": "round_001-control",
            "round1-oracle": "round_001-oracle", "round2": "round_002", "round2-control": "round_002-control"}


def _per_case(root: Path, out_csv: Path) -> None:
    """The test scans' DSC and NSD of every arm of one seed that has run (the core's, and each
    option's round 1 and its control), one row per (arm, scan)."""
    import pandas as pd

    frames = []
    arms = {key: root / "viola_work" / "rounds" / folder for key, folder in ARM_DIRS.items()}
    for name in OPTIONS:
        rounds = root.parent / f"option-{name}" / "viola_work" / "rounds"
        arms |= {name: rounds / "round_001", f"{name}-control": rounds / "round_001-control"}
    for key, folder in arms.items():
        csv = folder / "test_metrics.csv"
        if csv.exists():
            t = pd.read_csv(csv)
            frames.append(t.loc[t["status"] == "ok", ["scan_id", "dsc", "nsd"]].assign(arm=key))
    if frames:
        pd.concat(frames).to_csv(out_csv, index=False)


def _transductive(root: Path, out: Path, profile: str) -> dict[str, float]:
    """Mean Dice on the unlabelled scans against their hidden truth (the paper's own setting) of the
    ensembles of round 0 (its masks are round 1's pseudo-labels), round 1 (round 2's), and of
    control 1 and oracle 1, which label the same scans here."""
    import pandas as pd

    from data_catalog.catalog import TRUTH_DIR
    from flows.profiles import load_profile
    from viola_models.inference.ensemble import load_ensemble
    from viola_models.inference.pseudo_labels import label_scans, with_true_dice

    settings = load_profile(profile, root)
    rounds = root / "viola_work" / "rounds"
    records = sorted((rounds / "round_001" / "pseudo").glob("*.json"))
    scans = {}
    for rec in records:
        row = json.loads(rec.read_text())
        scans[row["scan_id"]] = {"image": row["image"], "image_hash": row["image_hash"]}
    result = {}
    for key, folder in (("round0", rounds / "round_001" / "pseudo"), ("round1", rounds / "round_002" / "pseudo")):
        rows = [json.loads(r.read_text()) for r in sorted(folder.glob("*.json"))]
        if rows:
            table = with_true_dice(pd.DataFrame(rows), root / TRUTH_DIR)
            result[key] = float(table["true_dice"].mean())
    for key in ("round1-control", "round1-oracle"):
        ens = rounds / ARM_DIRS[key] / "ensemble"
        if not ens.exists() or not scans:
            continue
        table = label_scans(lambda ens=ens: load_ensemble(ens, device="cpu"), scans, out / key, key,
                            cache_dir=settings.work_dir / "cache", overlap=settings.pseudo.overlap,
                            tta=settings.pseudo.tta)
        result[key] = float(with_true_dice(table, root / TRUTH_DIR)["true_dice"].mean())
    return result


def run_seed(out: Path, seed: int, profile: str, uri: str, stage: str, counts: tuple[int, int, int],
             short: bool = False, options: list[str] | None = None, base: dict | None = None) -> dict:
    """``stage``: "core" (rounds 0-2 with controls and the oracle; ``short``: round 0, round 1 and
    control 1 only) or "options" (``options``, default all: each needs the core's round 0).
    ``base``: settings changed for every arm, round 0 included (``--set``)."""
    from mlflow.tracking import MlflowClient

    from flows.profiles import merge_settings
    from flows.self_training import self_training

    client = MlflowClient(uri)
    results_file = out / f"seed_{seed}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    root = out / f"seed_{seed}" / "data"
    _write_data(root, seed, *counts)
    common = {"experiment": "bench-self-training"}

    def run(data_root: Path, name: str, **kw) -> list[dict]:
        t0 = time.perf_counter()
        over = merge_settings(merge_settings(base or {}, kw.pop("overrides", {})),
                              {"tracking": {**common, "registered_model": f"bench-{name}"}})
        out_ = self_training(profile=profile, data_root=str(data_root), tracking_uri=uri, overrides=over, **kw)
        logging.getLogger("bench").warning("seed %d %s: %.1f min", seed, name, (time.perf_counter() - t0) / 60)
        return out_

    if stage == "core":
        # each call once: a restarted benchmark must not run a finished call again (the flow would
        # take it for a new call and run the next rounds)
        if short and not {"round1", "round1-control"} <= set(results):
            for s in run(root, "core", rounds=2, control=True):
                key = f"round{s['round']}" + ("" if s["arm"] == "self-training" else f"-{s['arm']}")
                _record(results, key, s, client)
            results_file.write_text(json.dumps(results, indent=1))
        if not short and not {"round1", "round1-control", "round1-oracle"} <= set(results):
            for s in run(root, "core", rounds=2, control=True, oracle=True):
                key = f"round{s['round']}" + ("" if s["arm"] == "self-training" else f"-{s['arm']}")
                _record(results, key, s, client)
            results_file.write_text(json.dumps(results, indent=1))
        if not short and not {"round2", "round2-control"} <= set(results):
            for s in run(root, "core", rounds=1, control=True, force=True):
                if s["round"] == 2:
                    _record(results, "round2" + ("" if s["arm"] == "self-training" else f"-{s['arm']}"), s, client)
            results_file.write_text(json.dumps(results, indent=1))
        if "transductive" not in results:
            _per_case(root, out / f"seed_{seed}_cases.csv")
            results["transductive"] = _transductive(root, out / f"seed_{seed}" / "transductive", profile)
            results_file.write_text(json.dumps(results, indent=1))
    else:
        for name, (over, with_control) in OPTIONS.items():
            if (options and name not in options) or name in results:
                continue
            vroot = out / f"seed_{seed}" / f"option-{name}"
            _branch(root, vroot)
            for s in run(vroot, name, rounds=1, control=with_control, overrides=over):
                if s["round"] == 1:
                    _record(results, f"{name}" + ("" if s["arm"] == "self-training" else f"-{s['arm']}"), s, client)
            results_file.write_text(json.dumps(results, indent=1))
        _per_case(root, out / f"seed_{seed}_cases.csv")
    return results


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def _case_tables(out: Path, seeds: list[int], arms: tuple[str, ...], metric: str = "dsc") -> list:
    """Per seed, the (n_cases, len(arms)) table of ``metric`` on the test scans every arm scored."""
    import pandas as pd

    tables = []
    for seed in seeds:
        csv = out / f"seed_{seed}_cases.csv"
        if not csv.exists():
            continue
        wide = pd.read_csv(csv).pivot_table(index="scan_id", columns="arm", values=metric)
        if set(arms) <= set(wide.columns):
            tables.append(wide[list(arms)].dropna().to_numpy())
    return tables


DIFFERENCES = [("round1", "round1-control", "round 1 - control 1"),
               ("round1", "round0", "round 1 - round 0"),
               ("round2", "round1", "round 2 - round 1"),
               ("round2", "round2-control", "round 2 - control 2"),
               ("round1-oracle", "round1-control", "oracle 1 - control 1"),
               ("round1-control", "round0", "control 1 - round 0")]


def _load_seeds(out: Path) -> dict[int, dict]:
    """Every seed's results of ``out``; round 0 finished by an earlier call read from its state."""
    per_seed = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in sorted(out.glob("seed_*.json"))}
    for seed, results in per_seed.items():
        state = out / f"seed_{seed}" / "data" / "viola_work" / "rounds" / "round_000" / "state.json"
        if "round0" not in results and state.exists():
            st = json.loads(state.read_text())
            results["round0"] = {"dsc": st.get("test", {}).get("test/dsc"), "nsd": st.get("test", {}).get("test/nsd"),
                                 "val_dice": st.get("val_dice"), "seconds": None}
    return per_seed


def _arm_lines(per_seed: dict[int, dict], seeds: list[int], trans: dict) -> list[str]:
    """Per arm: test DSC and NSD, validation and unlabelled Dice (mean ± sd over seeds), minutes per run."""
    arms = [("round0", "round 0 (labelled only)"), ("round1-control", "control 1 (labelled only, equal compute)"),
            ("round1", "self-training round 1"), ("round1-oracle", "oracle 1 (true labels)"),
            ("round2-control", "control 2"), ("round2", "self-training round 2"),
            *[(k, f"option {k}") for k in OPTIONS], *[(f"{k}-control", f"option {k}: its control") for k in OPTIONS]]
    lines = [f"{'arm':<42}{'n':>3}  {'test DSC':>17}  {'test NSD':>17}  {'val Dice':>17}  {'unlabelled Dice':>17}"
             f"  {'min/run':>7}"]
    for key, label in arms:
        rows = [per_seed[s][key] for s in seeds if key in per_seed[s]]
        if rows:
            mins = [r["seconds"] / 60 for r in rows if r.get("seconds")]
            lines.append(f"{label:<42}{len(rows):>3}  {_ms([r['dsc'] for r in rows]):>17}  "
                         f"{_ms([r['nsd'] for r in rows]):>17}  {_ms([r.get('val_dice') for r in rows]):>17}  "
                         f"{_ms([trans[s].get(key) for s in seeds]):>17}  "
                         f"{f'{statistics.mean(mins):.1f}' if mins else '-':>7}")
    return lines


def _difference_lines(out: Path, seeds: list[int]) -> list[str]:
    """The primary statistic of each key difference, and the gap closed by round 1."""
    from viola_models.evaluation.scoring import paired_difference, two_level_bootstrap

    lines = []
    lines += ["paired differences of test DSC per case at the final ensembles, mean over seeds [95% CI, "
              "two-level bootstrap: seeds, then cases], share of seeds won:"]
    # an option that leaves the control as it is (OPTIONS' flag) is compared with control 1
    options = [(k, f"{k}-control", f"{k} - its control") if own else (k, "round1-control", f"{k} - control 1")
               for k, (_, own) in OPTIONS.items()]
    for a, b, label in DIFFERENCES + options:
        tables = _case_tables(out, seeds, (a, b))
        if tables:
            res = paired_difference([(t[:, 0], t[:, 1]) for t in tables])
            per = [float(t[:, 0].mean() - t[:, 1].mean()) for t in tables]
            won = sum(v > 0 for v in per) / len(per)
            lines.append(f"  {label:<24}{res.describe()}; won {won:.0%} (per seed: "
                         f"{', '.join(f'{v:+.4f}' for v in per)})")
    tables = _case_tables(out, seeds, ("round1", "round1-control", "round1-oracle"))
    if tables:
        def gap(m):
            span = m[2] - m[1]
            return (m[0] - m[1]) / span if span > 0 else float("nan")
        res = two_level_bootstrap(tables, gap)
        lines.append(f"  gap closed by round 1 = (round 1 - control 1) / (oracle 1 - control 1): "
                     f"{res.estimate:.0%} [{res.low:.0%}, {res.high:.0%}]")
    return lines


def _side_lines(per_seed: dict[int, dict], seeds: list[int], trans: dict) -> list[str]:
    """Round 1 against control 1 and round 0 on the validation scans and the unlabelled scans' truth."""
    lines = []
    for a, b, label in [("round1", "round1-control", "round 1 - control 1"), ("round1", "round0", "round 1 - round 0")]:
        for kind, field in (("validation", "val_dice"),):
            d = [per_seed[s][a].get(field) - per_seed[s][b].get(field) for s in seeds
                 if a in per_seed[s] and b in per_seed[s] and per_seed[s][a].get(field) is not None
                 and per_seed[s][b].get(field) is not None]
            if d:
                lines.append(f"  {kind} Dice, {label:<22}{_ms(d):>17}  (per seed: {', '.join(f'{v:+.4f}' for v in d)})")
        d = [trans[s][a] - trans[s][b] for s in seeds if a in trans[s] and b in trans[s]]
        if d:
            lines.append(f"  unlabelled Dice, {label:<17}{_ms(d):>17}  (per seed: {', '.join(f'{v:+.4f}' for v in d)})")
    return lines


def report(out: Path) -> str:
    per_seed = _load_seeds(out)
    if not per_seed:
        return f"no results in {out}"
    seeds = sorted(per_seed)
    trans = {s: per_seed[s].get("transductive", {}) for s in seeds}
    setting = json.loads((out / "setting.json").read_text()) if (out / "setting.json").exists() else {}
    lines = [f"self-training benchmark: seeds {seeds}; {platform.node()} ({os.cpu_count()} CPU); profile "
             f"{setting.get('profile', '?')}, --set {' '.join(setting.get('set') or []) or 'none'}", "",
             *_arm_lines(per_seed, seeds, trans), "", *_difference_lines(out, seeds), *_side_lines(per_seed, seeds,
                                                                                                  trans)]
    guards = [f"seed {s}: {per_seed[s]['round1'].get('guard')}" for s in seeds
              if per_seed[s].get("round1", {}).get("teaches") is False]
    if guards:
        lines += ["", "round 1 kept from teaching round 2 by the round guard:", *[f"  {g}" for g in guards]]
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


def _same_setting(out: Path, profile: str, set_: list[str]) -> None:
    """One ``--out`` holds the arms of one setting: refuse to mix another profile or ``--set`` into it."""
    mine = {"profile": profile, "set": set_}
    path = out / "setting.json"
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            sys.exit(f"bench_self_training: {out} holds the benchmark of profile {theirs['profile']!r} with --set "
                     f"{theirs['set'] or 'none'}; this call asks for {profile!r} with {set_ or 'none'}: "
                     "use another --out")
    else:
        path.write_text(json.dumps(mine, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working folder (data roots, MLflow store, results)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2026, 2027, 2028, 2029, 2030])
    ap.add_argument("--profile", default="bench")
    ap.add_argument("--labelled", type=int, help="labelled phantoms (default: the profile's [data.synth])")
    ap.add_argument("--unlabelled", type=int, help="unlabelled phantoms (default: the profile's)")
    ap.add_argument("--test", type=int, help="test phantoms (default: the profile's)")
    ap.add_argument("--options", action="store_true", help="also the options from the literature")
    ap.add_argument("--option", action="append", choices=sorted(OPTIONS), help="only this option (repeatable)")
    ap.add_argument("--short", action="store_true", help="core arms: round 0, round 1 and control 1 only "
                    "(for choosing settings on development seeds, whose test scans are their held-out split)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                    help="a profile setting for every arm, round 0 included (e.g. a teacher trained longer: "
                    "--set train.max_steps=600); one --out holds one such setting")
    ap.add_argument("--report", action="store_true", help="only print the table of what has run")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        from flows.cli import _setup
        from flows.profiles import ProfileError, load_profile, parse_overrides

        _setup(flows=True)
        try:
            base = parse_overrides(args.set_)
            synth = load_profile(args.profile, overrides=base).data.synth
        except ProfileError as e:
            sys.exit(f"bench_self_training: {e}")
        _same_setting(out, args.profile, sorted(args.set_))
        counts = (args.labelled if args.labelled is not None else synth.labelled if synth else 12,
                  args.unlabelled if args.unlabelled is not None else synth.unlabelled if synth else 32,
                  args.test if args.test is not None else synth.test if synth else 64)
        (out / "mlruns").mkdir(exist_ok=True)
        uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
        t0 = time.perf_counter()
        for stage in ("core", "options") if args.options or args.option else ("core",):
            for seed in args.seeds:  # every seed's core arms first: the headline numbers come early
                run_seed(out, seed, args.profile, uri, stage, counts, args.short, args.option, base)
                (out / "report.txt").write_text(report(out) + "\n")
        logging.getLogger("bench").warning("benchmark: %.1f min in all", (time.perf_counter() - t0) / 60)
    text = report(out)
    (out / "report.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
