"""Rounds and their arms: where each lives, what it starts from, whether it runs, and its MLflow run.

A round ``r`` of the self-training arm lives in ``WORK/rounds/round_NNN/``; its siblings, run on
request, in ``round_NNN-control/`` (the same round without pseudo-labels: equal compute) and
``round_NNN-oracle/`` (the unlabelled scans with their hidden truth as labels, for phantoms).
Each arm is a chain that branches at round 0: its members start from the same arm's previous
round when that exists, else from the self-training arm's. ``state.json`` in each folder says
how far it got; a rerun resumes the first unfinished self-training round.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import filelock
from prefect import task
from prefect.runtime import flow_run

from data_catalog.scans import atomic_write
from tasks import tracking

__all__ = [
    "ARMS",
    "CallConflict",
    "RoundPlan",
    "RunBusyError",
    "arm_dir",
    "begin_invocation",
    "close_round_run",
    "crash_abandoned_runs",
    "decide_call",
    "describe_call",
    "end_invocation",
    "exclusive",
    "latest_finished_round",
    "mark_stopped",
    "next_round",
    "open_round_run",
    "plan_round",
    "read_state",
    "recover_crashed",
    "requested_call",
    "round_guard",
    "teacher_for",
    "write_state",
]

log = logging.getLogger(__name__)

ARMS = ("self-training", "control", "oracle")


def arm_dir(work_dir: Path, round_: int, arm: str = "self-training") -> Path:
    suffix = "" if arm == "self-training" else f"-{arm}"
    return Path(work_dir) / "rounds" / f"round_{round_:03d}{suffix}"


def read_state(folder: Path) -> dict:
    path = Path(folder) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(folder: Path, state: dict) -> None:
    text = json.dumps(state, indent=1, default=str)
    atomic_write(Path(folder) / "state.json", lambda tmp: tmp.write_text(text))


def _finished(folder: Path) -> bool:
    return read_state(folder).get("status") == "finished"


def next_round(work_dir: Path) -> int:
    """The first self-training round that is not finished."""
    r = 0
    while _finished(arm_dir(work_dir, r)):
        r += 1
    return r


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunBusyError(RuntimeError):
    """Another run holds the data root (one-line reason)."""


def _lock(work_dir: Path) -> filelock.FileLock:
    # one instance per path and process, counted: the command line holds the data root before
    # Prefect starts, and the flow it runs takes the same lock again without a conflict
    return filelock.FileLock(str(Path(work_dir) / ".run.lock"), is_singleton=True, thread_local=False)


@contextmanager
def exclusive(work_dir: Path, create_root: bool = False) -> Iterator[None]:
    """Hold the data root for one run: a second `viola run` (or deployment run) on the same data
    root exits with a one-line reason naming the holder instead of interleaving with it. The lock
    is the operating system's (released when the holder dies, even by kill -9), and re-entrant
    within a process. A data root that does not exist is an error unless ``create_root`` (the
    demo's phantoms go there)."""
    work_dir = Path(work_dir)
    if not work_dir.parent.is_dir() and not create_root:
        raise FileNotFoundError(f"data root {work_dir.parent} does not exist")
    work_dir.mkdir(parents=True, exist_ok=True)
    lock, owner = _lock(work_dir), work_dir / ".run.owner"
    outermost = not lock.is_locked
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = owner.read_text().strip() if owner.exists() else "unknown process"
        raise RunBusyError(f"another run is working on {work_dir.parent} ({holder}); wait for it to finish "
                           "or stop it") from None
    try:
        if outermost:
            text = f"pid {os.getpid()} on {socket.gethostname()}, since {_now()}"
            atomic_write(owner, lambda tmp: tmp.write_text(text))
        yield
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()


@task(name="recover-crashed")
def recover_crashed(work_dir: Path, tracking_uri: str) -> list[str]:
    """With the data root held, every arm still marked running was left by a process that died:
    its Prefect flow run is set Crashed, its MLflow run and unfinished member runs FAILED (a resume
    sets them running again). Returns the arms it found."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.states import Crashed

    found = []
    client = None
    for state_file in sorted((Path(work_dir) / "rounds").glob("*/state.json")):
        state = json.loads(state_file.read_text())
        if state.get("status") != "running":
            continue
        found.append(state_file.parent.name)
        dead_flow = state.get("flow_run_id")
        if dead_flow and dead_flow != (flow_run.get_id() or ""):
            try:
                with get_client(sync_client=True) as prefect:
                    # the flow run and its subflows (the members' fan-out) died with the process
                    children = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
                        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[dead_flow])))
                    for run_id_ in [dead_flow, *(c.id for c in children)]:
                        if prefect.read_flow_run(run_id_).state.is_running():
                            prefect.set_flow_run_state(run_id_, Crashed(
                                message=f"the process running it died; found by flow run {flow_run.get_id()}"),
                                force=True)
            except Exception as e:  # another Prefect API than the one that ran it: nothing to mark there
                log.info("flow run %s of %s not marked crashed (%s)", dead_flow, state_file.parent.name,
                         type(e).__name__)
        client = client or tracking.client_for(tracking_uri)
        _end_mlflow_runs(client, state, "FAILED", {"viola.crashed": f"found at {_now()}"})
        log.warning("%s was left running by a process that died: marked crashed, and resumed now",
                    state_file.parent.name)
    return found


def _end_mlflow_runs(client, state: dict, status: str, tags: dict) -> int:
    """An arm's MLflow run and its members' runs still RUNNING set to ``status``; how many."""
    run_id = state.get("run_id")
    if not tracking.run_exists(client, run_id):
        return 0
    children = client.search_runs([state["experiment_id"]], f"tags.`mlflow.parentRunId` = '{run_id}' and "
                                  "attributes.status = 'RUNNING'") if state.get("experiment_id") else []
    ended = 0
    for run in [client.get_run(run_id), *children]:
        if run.info.status == "RUNNING":
            tracking.set_tags(client, run.info.run_id, tags)
            client.set_terminated(run.info.run_id, status)
            ended += 1
    return ended


def mark_stopped(work_dir: Path, tracking_uri: str, signal_name: str, held: bool = False) -> int:
    """After a run was stopped by a signal: the MLflow runs of the arms it left running are set
    KILLED, so that the UI does not show them running until the next call. The arms stay "running"
    in their state, which the same command continues. ``held``: the caller still holds the data root
    (else it is taken here). Returns how many runs."""
    ended = 0
    with contextlib.nullcontext() if held else exclusive(work_dir):
        client = None
        for state_file in sorted((Path(work_dir) / "rounds").glob("*/state.json")):
            state = json.loads(state_file.read_text())
            if state.get("status") == "running":
                client = client or tracking.client_for(tracking_uri)
                ended += _end_mlflow_runs(client, state, "KILLED", {"viola.stopped": f"{signal_name} at {_now()}"})
    return ended


def crash_abandoned_runs(work_dir: Path, deployment: str, data_root: str) -> list[str]:
    """Before serving: the flow runs of ``deployment`` ("flow/name") for ``data_root`` that a killed
    server left RUNNING (or CANCELLING) are set Crashed. Such a run holds the deployment's one
    concurrency slot, and every later run, scheduled or triggered, would wait for it forever. Done
    only while this process can hold the data root (no round of it runs anywhere); returns the
    runs' names. The next round finds the round they left and continues it (``recover_crashed``)."""
    try:
        with exclusive(work_dir):
            return _crash_running(deployment, data_root)
    except RunBusyError as e:
        log.info("abandoned flow runs not looked for: %s", e)
        return []


def _crash_running(deployment: str, data_root: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    flow_name, _, name = deployment.partition("/")
    found = []
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.CANCELLING]))))
        for run in runs:
            if str((run.parameters or {}).get("data_root")) != str(data_root):
                continue
            prefect.set_flow_run_state(run.id, Crashed(
                message="left running by a server that was killed; found when `viola serve` started"), force=True)
            found.append(run.name)
            log.warning("flow run %s of %s was left running by a server that was killed: marked crashed (the next "
                        "run continues its round)", run.name, deployment)
    return found


class CallConflict(ValueError):
    """A call that differs from the interrupted call it would continue (one-line reason and the ways on)."""


def requested_call(profile: str, rounds: int, control: bool, oracle: bool, force: bool,
                   overrides: dict | None) -> dict:
    """What one call of the flow asks for, as recorded beside its rounds (plain JSON data); ``arms``:
    the sibling arms each round gets."""
    arms = [a for a, on in (("control", control), ("oracle", oracle)) if on]
    return {"profile": str(profile), "rounds": int(rounds), "arms": arms, "force": bool(force),
            "overrides": json.loads(json.dumps(overrides or {}, sort_keys=True, default=str))}


def describe_call(call: dict) -> str:
    """The command line of a recorded call: ``viola run --profile demo --rounds 2 --control``."""
    words = ["viola run", f"--profile {call['profile']}", f"--rounds {call['rounds']}"]
    words += [f"--{a}" for a in call.get("arms", [])] + ["--force"] * bool(call.get("force"))

    def flat(prefix: str, value) -> list[str]:
        if isinstance(value, dict):
            return [w for k, v in value.items() for w in flat(f"{prefix}{k}.", v)]
        return [f"--set {prefix[:-1]}={json.dumps(value)}"]
    return " ".join(words + flat("", call.get("overrides") or {}))


def _interrupted(work_dir: Path) -> dict | None:
    """The record of a call that started and never ended (None: none)."""
    path = Path(work_dir) / "invocation.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("status") != "running":
        return None
    if "call" not in record:  # written before calls were recorded whole: its rounds and arms
        arms = record.get("arms", [])
        record["call"] = requested_call("?", record.get("rounds", 1), "control" in arms, "oracle" in arms, False, None)
    return record


def _what(call: dict) -> dict:
    """What a call computes: all of it but ``compute`` settings (where it runs, how often a task is
    retried), which the same call may change when it is run again (e.g. without Ray after a crash)."""
    return {**call, "overrides": {k: v for k, v in (call.get("overrides") or {}).items() if k != "compute"}}


def _same(a: dict, b: dict) -> bool:
    if "?" in (a["profile"], b["profile"]):  # a record from before calls were recorded whole
        return all(a.get(k) == b.get(k) for k in ("rounds", "arms"))
    return _what(a) == _what(b)


def decide_call(work_dir: Path, call: dict, resume: bool = False, abandon: bool = False) -> dict:
    """The call to run on ``work_dir`` (whose lock the caller holds): ``call``, or the interrupted call
    it continues. The same command continues an interrupted call; ``resume`` continues it whatever
    was asked (its own rounds, arms and settings); ``abandon`` leaves it and runs ``call`` from the next
    round; any other call is a CallConflict naming the interrupted call and the two ways on."""
    if resume and abandon:
        raise CallConflict("--resume and --abandon exclude each other: finish the interrupted call, or start anew")
    previous = _interrupted(work_dir)
    if previous is None:
        if resume:
            raise CallConflict(f"--resume: no interrupted call on {Path(work_dir).parent} to resume")
        return call
    before = previous["call"]
    if abandon or _same(before, call):
        return call
    if resume:
        if before["profile"] == "?":
            raise CallConflict(f"--resume: the interrupted call on {Path(work_dir).parent} was recorded without its "
                               "profile and settings; run its command again, or --abandon it")
        return before
    first, started = previous["first_round"], previous.get("started")
    raise CallConflict(f"{Path(work_dir).parent}: the call '{describe_call(before)}' (started {started}, rounds "
                       f"{first}..{first + before['rounds'] - 1}) was interrupted; run it again or add --resume to "
                       "finish it as it was, or add --abandon to start this call instead")


@task(name="begin-invocation")
def begin_invocation(work_dir: Path, call: dict, abandon: bool = False) -> int:
    """The first round of this call (from ``decide_call``). ``--rounds N`` means N rounds in all: the
    interrupted call continued runs from its own first round, so it completes the rounds that call
    asked for and no more; a new call (or one that abandons the interrupted call) starts at the next
    round. The record holds the call's arguments."""
    path = Path(work_dir) / "invocation.json"
    decide_call(work_dir, call, abandon=abandon)  # a different call than the interrupted one: CallConflict
    previous = _interrupted(work_dir)
    same = previous is not None and not abandon
    first = previous["first_round"] if same else next_round(Path(work_dir))
    record = {"call": call, "command": describe_call(call), "first_round": first, "rounds": call["rounds"],
              "arms": call["arms"], "status": "running", "started": previous.get("started") if same else _now(),
              "flow_run_id": flow_run.get_id() or ""}
    text = json.dumps(record, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    if same:
        log.info("continuing the interrupted call '%s' for rounds %d..%d", describe_call(call), first,
                 first + call["rounds"] - 1)
    elif previous is not None:
        log.warning("abandoned the interrupted call '%s'; this call runs rounds %d..%d",
                    describe_call(previous["call"]), first, first + call["rounds"] - 1)
    return first


@task(name="end-invocation")
def end_invocation(work_dir: Path) -> None:
    path = Path(work_dir) / "invocation.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    text = json.dumps({**record, "status": "done", "finished": _now()}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class RoundPlan:
    """What one arm of one round does; plain data (paths as strings) so it travels between tasks."""

    round: int
    arm: str
    dir: str
    state: dict = field(default_factory=dict)
    teacher_dir: str = ""  # the previous self-training round's ensemble: it makes the pseudo-labels
    teacher_run_id: str = ""
    teacher_round: int = -1
    teacher_val_dice: float | None = None  # its members' mean validation Dice, for the round guard
    init_ensemble_dir: str = ""  # the ensemble whose members the students start from
    previous_run_id: str = ""
    self_training_run_id: str = ""  # for sibling arms: the round they are the control/oracle of
    skip_reason: str = ""
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@task(name="plan-round")
def plan_round(work_dir: Path, arm: str, round_: int | None, inputs: tuple[str, str], skip_unchanged: bool = True,
               force: bool = False) -> RoundPlan:
    """Decide what ``arm`` of round ``round_`` (None: the next self-training round) starts from,
    and whether it runs at all.

    A self-training round r >= 2 that has not started is skipped when nothing changed since round
    r-1 made its pseudo-labels: the same ``inputs`` (catalog hash, profile hash: so no new
    unlabelled scan and the same settings). ``force`` runs it anyway. A sibling arm needs its
    self-training round finished.
    """
    catalog_hash, profile_hash = inputs
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    work_dir = Path(work_dir)
    round_ = next_round(work_dir) if round_ is None else round_
    folder = arm_dir(work_dir, round_, arm)
    state = read_state(folder)
    name = f"round {round_}" if arm == "self-training" else f"round {round_} ({arm})"
    plan = RoundPlan(round=round_, arm=arm, dir=str(folder), state=state, name=name)
    if round_ > 0:
        prev_st = arm_dir(work_dir, round_ - 1)
        prev_state = read_state(prev_st)
        if prev_state.get("status") != "finished":
            raise ValueError(f"{name} needs round {round_ - 1} finished first ({prev_st / 'state.json'})")
        plan.teacher_round = teacher_for(work_dir, round_)
        teacher = arm_dir(work_dir, plan.teacher_round)
        plan.teacher_dir = str(teacher / "ensemble")
        teacher_state = read_state(teacher)
        plan.teacher_run_id = teacher_state.get("run_id", "")
        plan.teacher_val_dice = teacher_state.get("val_dice")
        same_arm_prev = arm_dir(work_dir, round_ - 1, arm)
        init_from = same_arm_prev if arm != "self-training" and _finished(same_arm_prev) else teacher
        plan.init_ensemble_dir = str(init_from / "ensemble")
        plan.previous_run_id = read_state(init_from).get("run_id", "")
    if arm != "self-training":
        st = read_state(arm_dir(work_dir, round_))
        if round_ == 0:
            plan.skip_reason = f"round 0 has no {arm}: it has no pseudo-labels to compare with"
        elif st.get("status") != "finished":
            plan.skip_reason = f"round {round_} is not finished: its {arm} waits for it"
        plan.self_training_run_id = st.get("run_id", "")
        return plan
    resuming = bool(state) and state.get("status") != "finished"
    if round_ >= 2 and not resuming and skip_unchanged and not force:
        prev = read_state(arm_dir(work_dir, round_ - 1))
        if prev.get("catalog_hash") == catalog_hash and prev.get("profile_hash") == profile_hash:
            plan.skip_reason = (f"round {round_} skipped: nothing new since round {round_ - 1}'s pseudo-labels "
                                f"(catalog {catalog_hash} and profile unchanged); --force runs it anyway")
    return plan


def teacher_for(work_dir: Path, round_: int) -> int:
    """The self-training round whose ensemble teaches round ``round_`` (>= 1): round - 1, unless
    the round guard kept that round from teaching (then the teacher it had itself)."""
    state = read_state(arm_dir(work_dir, round_ - 1))
    if state.get("teaches", True) is False and "teacher_round" in state:
        return int(state["teacher_round"])
    return round_ - 1


def round_guard(round_: int, val_dice: float, teacher_round: int, teacher_val_dice: float | None,
                enabled: bool = True) -> dict:
    """Whether a finished self-training round teaches the next one: not when its members' mean
    out-of-fold validation Dice is below its teacher's (validation scans only: the same folds, so
    the same scans). Returns what ``state.json`` records: val_dice, teacher_round, teaches, guard
    (the reason, in words)."""
    out = {"val_dice": val_dice, "teacher_round": teacher_round, "teaches": True, "guard": ""}
    if round_ < 1:
        return out
    known = teacher_val_dice is not None and not math.isnan(teacher_val_dice) and not math.isnan(val_dice)
    if not known:
        out["guard"] = "no validation Dice to compare with the teacher's: this round teaches the next"
    elif val_dice < teacher_val_dice and enabled:
        out |= {"teaches": False, "guard": (f"validation Dice {val_dice:.4f} below its teacher's (round "
                                            f"{teacher_round}: {teacher_val_dice:.4f}): round {teacher_round} "
                                            "stays the teacher of the next round")}
    else:
        out["guard"] = (f"validation Dice {val_dice:.4f} {'>=' if val_dice >= teacher_val_dice else '<'} its "
                        f"teacher's (round {teacher_round}: {teacher_val_dice:.4f})"
                        + ("" if enabled else "; the guard is off: this round teaches the next"))
    return out


@task(name="latest-finished-round")
def latest_finished_round(work_dir: Path) -> int:
    """The last finished self-training round (-1 when none is)."""
    return next_round(Path(work_dir)) - 1


@task(name="open-round-run")
def open_round_run(plan: RoundPlan, tracking_uri: str, experiment: str, tags: dict, params: dict) -> RoundPlan:
    """Create the arm's MLflow run, or continue the one a crashed attempt left; record it in
    ``state.json``. ``tags`` (catalog, profile and test-set hashes, ...) are set on either, so a
    resumed round and its run agree on what it now trains on."""
    client = tracking.client_for(tracking_uri)
    exp_id = tracking.experiment_id(client, experiment)
    state = dict(plan.state)
    run_id = state.get("run_id")
    all_tags = {"viola.kind": "round", "viola.round": plan.round, "viola.arm": plan.arm,
                "viola.previous_round_run_id": plan.previous_run_id,
                "viola.self_training_run_id": plan.self_training_run_id,
                "viola.code_version": tracking.code_version(), **tags}
    if tracking.run_exists(client, run_id):
        tracking.set_tags(client, run_id, {**all_tags, "viola.resumed_by_flow_run_id": flow_run.get_id() or ""})
        client.update_run(run_id, status="RUNNING")
        log.info("%s resumed (MLflow run %s)", plan.name, run_id)
    else:
        run_id = tracking.create_run(client, exp_id, plan.name, tags={
            **all_tags, "viola.prefect_flow_run_id": flow_run.get_id() or ""})
        tracking.log_params(client, run_id, params)
        log.info("%s started (MLflow run %s)", plan.name, run_id)
    state.update({"round": plan.round, "arm": plan.arm, "status": "running", "run_id": run_id,
                  "started": state.get("started") or _now(), "experiment_id": exp_id,
                  "flow_run_id": flow_run.get_id() or "",
                  **{k.removeprefix("viola."): v for k, v in tags.items()
                     if k in ("viola.catalog_hash", "viola.profile_hash", "viola.test_set_hash")}})
    write_state(Path(plan.dir), state)
    return RoundPlan(**{**plan.to_dict(), "state": state})


@task(name="close-round-run")
def close_round_run(plan: RoundPlan, tracking_uri: str, metrics: dict, summary: dict,
                    pseudo_items: list[dict] | None = None) -> dict:
    """Log the round's closing metrics and the content hash of the pseudo-labels it trained on
    (``pseudo_items``: preprocessed cases, named by content), end its MLflow run, and mark it
    finished in ``state.json``."""
    client = tracking.client_for(tracking_uri)
    run_id = plan.state["run_id"]
    names = sorted(Path(item["cache"]).name for item in pseudo_items or [])
    pseudo_hash = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    tags = {"viola.pseudo_label_set_hash": pseudo_hash, "viola.n_pseudo_labels": len(names)}
    if summary.get("guard"):
        tags |= {"viola.teaches_next_round": str(summary.get("teaches", True)).lower(),
                 "viola.round_guard": summary["guard"]}
    tracking.set_tags(client, run_id, tags)
    tracking.log_metrics(client, run_id, metrics, plan.round)
    client.set_terminated(run_id, "FINISHED")
    state = {**plan.state, "status": "finished", "finished": _now(), **summary}
    write_state(Path(plan.dir), state)
    return state
