"""Where a round's members train: the sequential runner against Ray, and the paper round on N GPUs.

    python benchmarks/bench_rounds.py --out bench_rounds [--profile tiny] [--steps 300] [--skip-measure]
                                      [--gpu-share 0.25] [--viola-ms 83] [--nnunet-ms 41]

1. Measured on this machine: round 0 of a profile (tiny by default, members trained ``--steps``
   steps; 0 keeps the profile's) run by the real flow, each arm in a fresh data root of the same
   phantoms. On a CPU: sequential with torch's default threads, sequential with one thread, and
   Ray with one worker per core, one thread each. With ``--gpu-share S`` (a GPU machine):
   sequential on the GPU against Ray with ``gpus_per_member = S`` (1/S members per GPU). It
   prints the round's wall time, the members' own training time, the speed-up over sequential and
   Ray's overhead (the fan-out's wall time minus the longest queue of member time per slot: Ray's
   start, the tracking server's start and the hand-offs).
2. On paper: the paper profile's round time on 1, 2, 5 and 10 GPUs (one member per GPU), from the
   train-step times of ``bench_models.py`` on one GPU (defaults: the H100 bf16 figures recorded
   in the README's benchmark notes) times the steps, plus the measured overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _round0(out: Path, name: str, compute: dict, steps: int, profile: str) -> dict:
    from data_catalog.phantoms import write_phantom_dataset
    from flows.profiles import load_profile
    from flows.self_training import self_training

    folder = out / name
    root = folder / "data"
    synth = load_profile(profile).data.synth
    if not (root / "train").exists():
        write_phantom_dataset(root, labelled=synth.labelled, unlabelled=synth.unlabelled, test=synth.test,
                              seed=synth.seed, size=synth.size)
    (folder / "mlruns").mkdir(parents=True, exist_ok=True)
    overrides = {"compute": compute}
    if steps:
        overrides["train"] = {"max_steps": steps, "val_every": steps // 2, "log_every": steps}
    t0 = time.perf_counter()
    summary = self_training(profile=profile, data_root=str(root), rounds=1, force=True,
                            tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}", overrides=overrides)[0]
    wall = time.perf_counter() - t0
    members = [m["seconds"] for m in summary.get("members", [])]
    return {"wall_s": wall, "members_s": members, "test_dsc": summary.get("test", {}).get("test/dsc")}


def measure(out: Path, steps: int, profile: str, gpu_share: float | None) -> list[tuple[str, dict, int]]:
    cores = os.cpu_count() or 1
    if gpu_share:
        per_gpu = round(1 / gpu_share)
        arms = [("sequential, one GPU", {"runner": "sequential"}, 1),
                (f"ray, {per_gpu} members per GPU", {"runner": "ray", "gpus_per_member": gpu_share,
                                                    "cpus_per_member": max(1, cores // per_gpu)}, per_gpu)]
    else:
        arms = [("sequential, torch default threads", {"runner": "sequential"}, 1),
                ("sequential, 1 thread", {"runner": "sequential", "torch_threads": 1}, 1),
                (f"ray, {cores} workers x 1 thread", {"runner": "ray", "torch_threads": 1, "cpus_per_member": 1},
                 cores)]
    rows = []
    for i, (name, compute, slots) in enumerate(arms):
        result = _round0(out, f"arm{i}", compute, steps, profile)
        rows.append((name, result, slots))
        members = ", ".join(f"{s:.1f}" for s in result["members_s"])
        print(f"  {name}: round {result['wall_s']:.1f} s, members {members} s", flush=True)
    return rows


def paper_table(viola_ms: float, nnunet_ms: float, overhead_s: float) -> str:
    from flows.profiles import load_profile

    p = load_profile("paper", data_root="/nonexistent")
    folds = p.data.n_folds if p.members.folds is None else len(p.members.folds)
    per_member_h = {"viola_l": viola_ms * p.train.max_steps / 3.6e6, "nnunet_r": nnunet_ms * p.train.max_steps / 3.6e6}
    members = sorted([per_member_h[a] for a in p.members.architectures for _ in range(folds)], reverse=True)
    lines = [f"paper round 0 ({len(members)} members x {p.train.max_steps} steps; train step viola_l {viola_ms} ms, "
             f"nnunet_r {nnunet_ms} ms on one GPU; scheduling overhead {overhead_s:.0f} s):",
             f"  {'GPUs':>5}  {'round (h)':>10}  {'speed-up':>9}"]
    one = None
    for gpus in (1, 2, 5, 10):
        slots = [0.0] * gpus  # longest member first onto the least-loaded GPU (Ray queues in submit order)
        for m in members:
            slots[slots.index(min(slots))] += m
        hours = max(slots) + overhead_s / 3600
        one = one or hours
        lines.append(f"  {gpus:>5}  {hours:>10.2f}  {one / hours:>8.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--steps", type=int, default=300, help="training steps per member (0: the profile's)")
    ap.add_argument("--gpu-share", type=float, default=None, help="GPU machine: Ray's gpus_per_member")
    ap.add_argument("--skip-measure", action="store_true", help="only the paper table")
    ap.add_argument("--viola-ms", type=float, default=83.0, help="viola_l train step on one GPU (ms)")
    ap.add_argument("--nnunet-ms", type=float, default=41.0, help="nnunet_r train step on one GPU (ms)")
    ap.add_argument("--overhead-s", type=float, default=None, help="scheduling overhead (default: measured)")
    args = ap.parse_args()
    from flows.cli import _setup

    _setup(flows=True)
    steps = f"{args.steps} steps per member" if args.steps else "the profile's steps"
    print(f"bench_rounds: {platform.node()} ({os.cpu_count()} CPU), {args.profile} profile round 0, {steps}")
    overhead = args.overhead_s
    if not args.skip_measure:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # the temporary Prefect API starts before any timing
            client.api_healthcheck()
        rows = measure(args.out.resolve(), args.steps, args.profile, args.gpu_share)
        base = rows[0][1]["wall_s"]
        print(f"\n  {'runner':<34}{'round (s)':>10}{'members (s)':>12}{'speed-up':>9}{'overhead (s)':>13}")
        for name, r, slots in rows:
            busy = sorted(r["members_s"], reverse=True)
            queues = [0.0] * slots
            for s in busy:
                queues[queues.index(min(queues))] += s
            extra = r["wall_s"] - max(queues) if name.startswith("ray") else float("nan")
            print(f"  {name:<34}{r['wall_s']:>10.1f}{sum(busy):>12.1f}{base / r['wall_s']:>8.2f}x"
                  f"{'' if math.isnan(extra) else f'{extra:.1f}':>13}")
            if name.startswith("ray") and overhead is None:
                seq1 = rows[-2][1]  # the sequential arm with the same threads per member
                overhead = r["wall_s"] - (seq1["wall_s"] - sum(seq1["members_s"])) - max(queues)
        (args.out / "bench_rounds.json").write_text(json.dumps([{"runner": n, **r} for n, r, _ in rows], indent=1))
        print(f"\n  Ray's own overhead (round on Ray - the rest of a sequential round - longest member queue): "
              f"{overhead:.1f} s")
    print()
    print(paper_table(args.viola_ms, args.nnunet_ms, overhead or 60.0))


if __name__ == "__main__":
    main()
