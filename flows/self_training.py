"""The self-training flow: one call runs the next round (round 0 if none exists), and on request
its equal-compute control and its oracle.

A round: ingest -> cached preprocessing -> (round >= 1: pseudo-labels by the previous round's
ensemble, kept by the calibrated rule) -> every member (architecture x fold) trained or fine-tuned
-> the members' out-of-fold predictions calibrate the confidence score -> the ensemble evaluated
on the test scans -> registered in MLflow. The control arm is the same round without
pseudo-labels; the oracle arm uses the hidden truth of the unlabelled scans (phantoms). Where
each arm lives and what it starts from: ``tasks.rounds``.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed

from flows.profiles import PipelineSettings, load_profile
from tasks import tracking
from tasks.calibration import calibrate
from tasks.compute import check_cluster, cluster, member_options, task_runner, worker_device
from tasks.context import RoundContext
from tasks.data import oracle_pairs, prepare_data, preprocess_catalog, preprocess_pairs
from tasks.evaluation import evaluate_round, score_chunk
from tasks.models import assemble_ensemble
from tasks.pseudo import chunks, label_chunk, pseudo_label
from tasks.registry import register_ensemble
from tasks.rounds import (
    begin_invocation,
    close_round_run,
    decide_call,
    end_invocation,
    exclusive,
    latest_finished_round,
    open_round_run,
    plan_round,
    recover_crashed,
    requested_call,
    round_guard,
)
from tasks.tracking import shared_tracking
from tasks.training import fold_groups, plan_members, train_member, worth_retrying

__all__ = ["compare_arms", "label_unlabelled", "run_arm", "score_test_scans", "self_training", "train_members"]


def _summary_table(name: str, members: list[dict], n_sel: int, n_cand: int, test: dict, seconds: float,
                   guard: dict | None = None, calibration: dict | None = None) -> str:
    """The round's summary: members, pseudo-labels (selected, candidates), round guard, test metrics."""
    lines = [f"{name} summary ({seconds / 60:.1f} min)", f"  {'member':<22}{'val Dice':>10}{'best step':>11}"]
    lines += [f"  {m['name']:<22}{m['val_dice']:>10.4f}{m['best_step']:>11d}" for m in members]
    for m in members:  # a fold too small to choose a step by says so
        if "validation case(s)" in m.get("selection", ""):
            lines.append(f"  {m['name']}: {m['selection']}")
    if calibration and calibration.get("n_points", 0) < 3:
        lines.append(f"  calibration: {calibration.get('n_points', 0)} out-of-fold point(s), too few to fit: the "
                     "prior (predicted Dice = score) decides")
    if n_cand:
        lines.append(f"  pseudo-labels selected: {n_sel} of {n_cand}")
    if guard and guard.get("guard"):
        lines.append(f"  round guard: {guard['guard']}")
    if test:
        lines.append("  test: " + ", ".join(f"{k.split('/')[1].upper()} {v:.4f}" for k, v in test.items()
                                            if k in ("test/dsc", "test/hd", "test/nsd", "test/rvd")))
    return "\n".join(lines)


def _mean_val_dice(members: list[dict]) -> float:
    """The members' mean validation Dice, over those that have one (NaN when none has)."""
    dice = [m["val_dice"] for m in members if m["val_dice"] == m["val_dice"]]
    return sum(dice) / len(dice) if dice else float("nan")


def compare_arms(results: list[dict]) -> str:
    """Each self-training round of ``results`` (one call's arms) beside the round before it and
    its own control and oracle, where the call ran them: test DSC and mean validation Dice."""
    def val(res: dict) -> float:
        return _mean_val_dice(res.get("members", []))

    ran = {(r["round"], r["arm"]): r for r in results if not r.get("skipped") and r.get("test")}
    lines = []
    for (r, arm), res in sorted(ran.items()):
        if arm != "self-training" or r == 0:
            continue
        dsc = res["test"].get("test/dsc", float("nan"))
        for label, other in ((f"round {r - 1}", ran.get((r - 1, "self-training"))),
                             (f"round {r} (control)", ran.get((r, "control"))),
                             (f"round {r} (oracle)", ran.get((r, "oracle")))):
            if other is None:
                continue
            d = dsc - other["test"].get("test/dsc", float("nan"))
            lines.append(f"  round {r} vs {label:<20} test DSC {dsc:.4f} vs {other['test'].get('test/dsc'):.4f} "
                         f"({d:+.4f}), validation Dice {val(res):.4f} vs {val(other):.4f}")
    return "\n".join(["does the round help?", *lines]) if lines else ""


def _pseudo_labels(ctx: RoundContext, unlabelled: dict[str, dict]) -> list[dict]:
    """The training pairs the arm adds to the labelled scans: the teacher's selected pseudo-labels
    (self-training, round >= 1), the hidden truth (oracle) or none (control, round 0)."""
    settings = ctx.settings
    if ctx.arm == "self-training" and ctx.round > 0 and unlabelled:
        if settings.compute.runner == "ray":  # the masks made side by side; selected and tracked below
            label_unlabelled.with_options(task_runner=task_runner(settings.compute, ctx.tracking_uri))(ctx, unlabelled)
        return preprocess_pairs(pseudo_label(ctx, unlabelled), ctx.cache, settings.preprocess)
    if ctx.arm == "oracle":
        return preprocess_pairs(oracle_pairs(ctx.data_root), ctx.cache, settings.preprocess, label_source="oracle")
    return []


def _open_arm(settings: PipelineSettings, tracking_uri: str, data: dict, arm: str, round_: int | None,
              force: bool) -> RoundContext | dict:
    """The arm's context with its MLflow run open, or its summary when it does not run (skipped:
    nothing changed; or finished before)."""
    # this process predicts too (calibration, and the rest when sequential): with the workers' threads,
    # since OpenVINO's results depend on its thread count
    device = worker_device(settings.device, settings.compute.torch_threads)
    plan = plan_round(settings.work_dir, arm, round_, (data["catalog_hash"], settings.digest()),
                      settings.round.skip_unchanged, force)
    if plan.skip_reason:
        get_run_logger().info("%s", plan.skip_reason)
        return {"round": plan.round, "arm": arm, "skipped": plan.skip_reason, "summary": plan.skip_reason}
    if plan.state.get("status") == "finished":
        test = plan.state.get("test", {})
        return {"round": plan.round, "arm": arm, "run_id": plan.state["run_id"], "test": test,
                "summary": f"{plan.name}: already finished (test DSC {test.get('test/dsc')})"}
    plan = open_round_run(plan, tracking_uri, settings.tracking.experiment, {
        "viola.profile": settings.name, "viola.profile_hash": settings.digest(),
        "viola.data_root": str(settings.data.root), "viola.catalog_hash": data["catalog_hash"],
        "viola.test_set_hash": data["test_set_hash"], "viola.device": device}, settings.model_dump(mode="json"))
    return RoundContext(settings, plan, tracking_uri, device)


def _ensemble(ctx: RoundContext, jobs: list[dict], members: list[dict]) -> tuple[Path, dict, dict]:
    """The round's ensemble folder, its calibration and the round guard's verdict (the last two for
    the self-training arm only: its ensemble alone teaches the next round, if its validation scans
    say so)."""
    settings, r = ctx.settings, ctx.round
    calib, guard = {"calibration": None, "points": ""}, {}
    if ctx.arm == "self-training":
        calib = calibrate(ctx, fold_groups(jobs, members))
        guard = round_guard(r, _mean_val_dice(members), ctx.plan.teacher_round, ctx.plan.teacher_val_dice,
                            settings.round.guard)
    patch = list(settings.train_settings(r, settings.members.architectures[0], 0).patch_size)
    folder = assemble_ensemble(ctx.dir / "ensemble", members, settings.preprocess, calib["calibration"],
                               calib["points"], round=r, arm=ctx.arm, profile=settings.name, patch_size=patch)
    return Path(folder), calib, guard


def _test(ctx: RoundContext, ensemble_dir: Path, scans: dict[str, dict]) -> dict:
    """The ensemble's test metrics, scored side by side on Ray or here, tracked here."""
    rows = None
    if ctx.settings.compute.runner == "ray" and scans:
        rows = score_test_scans.with_options(task_runner=task_runner(ctx.settings.compute, ctx.tracking_uri))(
            ctx, ensemble_dir, scans)
    return evaluate_round(ctx, ensemble_dir, scans, rows)


def run_arm(settings: PipelineSettings, tracking_uri: str, data: dict, arm: str = "self-training",
            round_: int | None = None, force: bool = False) -> dict:
    """Compose one arm of one round from the tasks, as the paper's steps; returns its summary (also
    logged to MLflow)."""
    t_start = time.perf_counter()
    ctx = _open_arm(settings, tracking_uri, data, arm, round_, force)
    if isinstance(ctx, dict):
        return ctx
    cases = preprocess_catalog(ctx.data_root, ctx.cache, settings.preprocess)
    by_role = {role: {s: c for s, c in cases.items() if c["role"] == role}
               for role in ("labelled", "unlabelled", "test")}
    pseudo = _pseudo_labels(ctx, by_role["unlabelled"])
    labelled = {s: c["cache"] for s, c in by_role["labelled"].items()}
    jobs = plan_members(ctx, labelled, data["folds"], pseudo, by_role["labelled"])
    members = train_members.with_options(task_runner=task_runner(settings.compute, tracking_uri))(ctx, jobs)
    ens_dir, calib, guard = _ensemble(ctx, jobs, members)
    test = _test(ctx, ens_dir, by_role["test"])
    reg = None
    if arm == "self-training":  # only this arm is registered
        reg = register_ensemble(ctx, ens_dir, test.get("test/dsc"), data["test_set_hash"], by_role["test"], labelled)
    seconds = time.perf_counter() - t_start
    metrics = {"members/mean_val_dice": sum(m["val_dice"] for m in members) / len(members), "round/seconds": seconds,
               "round/n_members": len(members), "round/n_train_labelled": len(labelled),
               "round/n_pseudo_labels": len(pseudo)}
    n_candidates = len(by_role["unlabelled"]) if arm == "self-training" and ctx.round > 0 else 0
    table = _summary_table(ctx.name, members, len(pseudo), n_candidates, test, seconds, guard, calib["calibration"])
    get_run_logger().info("%s", table)
    close_round_run(ctx.plan, tracking_uri, metrics, {"test": test, "model_version": reg["version"] if reg else None,
                                                      "n_pseudo_labels": len(pseudo), **guard}, pseudo)
    return {"round": ctx.round, "arm": arm, "run_id": ctx.run_id, "members": members, "test": test,
            "n_pseudo_selected": len(pseudo), "registered": reg, "seconds": seconds, "summary": table, **guard}


@flow(name="train-members")
def train_members(ctx: RoundContext, jobs: list[dict]) -> list[dict]:
    """Every member of a round, submitted at once to this flow's task runner (``[compute]``): one
    after another here, or side by side on Ray; the members' results in the order of ``jobs``."""
    compute = ctx.settings.compute
    check_cluster(compute)
    train = train_member.with_options(retries=compute.retries, retry_condition_fn=worth_retrying)
    with shared_tracking(ctx.tracking_uri, compute.runner == "ray") as uri, member_options(compute):
        futures = [train.submit(ctx.with_tracking(uri), job, threads=compute.torch_threads) for job in jobs]
        return [f.result() for f in futures]  # inside: the store stays served until the last member ends


def _per_share(task, ctx: RoundContext, scans: dict[str, dict], **kwargs) -> list:
    """``task`` on one share of ``scans`` per slot of the cluster, side by side; its results in order."""
    compute = ctx.settings.compute
    slots = check_cluster(compute).get("slots", 1)
    with member_options(compute):
        futures = [task.submit(ctx, scans=share, threads=compute.torch_threads, **kwargs)
                   for share in chunks(scans, slots)]
        return [f.result() for f in futures]


@flow(name="label-unlabelled")
def label_unlabelled(ctx: RoundContext, scans: dict[str, dict]) -> int:
    """The teacher's masks of the unlabelled scans, in one share per slot of the cluster (the
    members' resources each), side by side; the pseudo-label task then selects from them."""
    return sum(_per_share(label_chunk, ctx, scans))


@flow(name="score-test-scans")
def score_test_scans(ctx: RoundContext, ensemble_dir: Path, scans: dict[str, dict]) -> list[dict]:
    """The ensemble's per-scan test rows, in one share per slot of the cluster, side by side."""
    return [row for rows in _per_share(score_chunk, ctx, scans, ensemble_dir=ensemble_dir) for row in rows]


@flow(name="self-training", log_prints=True)
def self_training(profile: str = "demo", data_root: str | None = None, rounds: int = 1,
                  tracking_uri: str | None = None, control: bool | None = None, oracle: bool = False,
                  force: bool = False, overrides: dict | None = None, resume: bool = False,
                  abandon: bool = False) -> list[dict]:
    """Run the next ``rounds`` self-training round(s) of the data root named by the profile.

    ``control`` (default: the profile's ``[round] control``) also runs each round's equal-compute
    control, ``oracle`` its oracle (phantoms only); both first catch up on the last finished round
    if it lacks them. ``force`` runs a round even when nothing changed since the previous one.
    ``overrides``: profile settings changed for this call (``{"student": {"init": "scratch"}}``).
    After an interrupted call the same call continues it; ``resume`` finishes it as it was asked,
    ``abandon`` starts this call instead; any other call is refused (``tasks.rounds.decide_call``).
    """
    settings = load_profile(profile, data_root, overrides)
    uri = tracking_uri or tracking.default_tracking_uri()
    call = requested_call(profile, rounds, settings.round.control if control is None else control, oracle, force,
                          overrides)
    synth = settings.data.synth is not None and data_root is None
    # one run per data root at a time; one Ray for the whole call when the members fan out on it
    with exclusive(settings.work_dir, create_root=synth), ExitStack() as held:
        decided = decide_call(settings.work_dir, call, resume, abandon)
        if decided != call:  # --resume: the interrupted call, with its own profile and settings
            call = decided
            settings = load_profile(call["profile"], data_root, call["overrides"] or None)
        rounds, extra, force = call["rounds"], call["arms"], call["force"]
        held.enter_context(cluster(settings.compute, uri))
        s = settings.data
        recover_crashed(settings.work_dir, uri)
        # phantoms are generated only into the profile's own data root (the demo), never into a user's
        data = prepare_data(s.root, s.n_folds, s.fold_seed, s.binarize_labels,
                            s.synth.model_dump() if s.synth and data_root is None else None)
        first = begin_invocation(settings.work_dir, call, abandon)
        results = []
        last = latest_finished_round(settings.work_dir)
        if first == last + 1:  # a new call: the last finished round gets the arms it lacks
            results += [run_arm(settings, uri, data, arm, last, force) for arm in (extra if last >= 1 else [])]
        for r in range(first, first + rounds):
            result = run_arm(settings, uri, data, "self-training", r, force)
            results.append(result)
            if result.get("skipped"):
                break
            results += [run_arm(settings, uri, data, arm, r, force) for arm in extra]
        end_invocation(settings.work_dir)
    comparison = compare_arms(results)
    if comparison:
        get_run_logger().info("%s", comparison)
    ran = [f"{r['arm']} round {r['round']}" for r in results if not r.get("skipped")]
    skipped = [r["skipped"] for r in results if r.get("skipped") and r["arm"] == "self-training"]
    # the flow run ends Completed either way; its message says what ran and why a round did not
    return Completed(message="; ".join([f"ran {', '.join(ran)}"] * bool(ran) + skipped) or "nothing to run",
                     data=results)
