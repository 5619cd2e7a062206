"""tasks.rounds: which round runs next, what each arm starts from, and when a round is skipped;
flows.profiles: the settings behind it."""

from __future__ import annotations

import json

import pytest

from flows.profiles import ProfileError, load_profile, parse_overrides
from tasks.rounds import arm_dir, next_round, plan_round, read_state, round_guard, teacher_for, write_state


def _finish(work, r, arm="self-training", catalog="c1", profile="p1"):
    write_state(arm_dir(work, r, arm), {"status": "finished", "run_id": f"run-{r}-{arm}", "catalog_hash": catalog,
                                        "profile_hash": profile})


def test_arms_branch_at_round_zero_and_continue_their_own_chain(tmp_path):
    work = tmp_path / "work"
    assert next_round(work) == 0
    _finish(work, 0)
    first = plan_round.fn(work, "self-training", None, ("c1", "p1"))
    assert first.round == 1 and first.teacher_dir.endswith("round_000/ensemble")
    assert first.teacher_run_id == "run-0-self-training"
    _finish(work, 1)
    control = plan_round.fn(work, "control", 1, ("c1", "p1"))
    # control 1 starts where round 1 started (round 0), and is tagged as round 1's sibling
    assert control.init_ensemble_dir.endswith("round_000/ensemble") and control.dir.endswith("round_001-control")
    assert control.self_training_run_id == "run-1-self-training" and not control.skip_reason
    _finish(work, 1, "control")
    _finish(work, 2)
    # control 2 continues the control chain: labelled-only training with the compute of rounds 1 and 2
    assert plan_round.fn(work, "control", 2, ("c1", "p1")).init_ensemble_dir.endswith("round_001-control/ensemble")
    # an oracle without its own round 1 starts from self-training round 1
    assert plan_round.fn(work, "oracle", 2, ("c1", "p1")).init_ensemble_dir.endswith("round_001/ensemble")
    assert "round 0 has no control" in plan_round.fn(work, "control", 0, ("c1", "p1")).skip_reason
    assert "not finished" in plan_round.fn(work, "control", 3, ("c1", "p1")).skip_reason
    with pytest.raises(ValueError, match="unknown arm"):
        plan_round.fn(work, "placebo", 1, ("c1", "p1"))


def test_an_idle_round_is_skipped_unless_forced_or_resumed(tmp_path):
    work = tmp_path / "work"
    _finish(work, 0)
    assert not plan_round.fn(work, "self-training", None, ("c1", "p1")).skip_reason  # round 1: the first pseudo-labels
    _finish(work, 1)
    idle = plan_round.fn(work, "self-training", None, ("c1", "p1"))
    assert idle.round == 2 and idle.skip_reason.startswith("round 2 skipped: nothing new since round 1")
    assert "--force" in idle.skip_reason
    assert not plan_round.fn(work, "self-training", None, ("c1", "p1"), force=True).skip_reason
    assert not plan_round.fn(work, "self-training", None, ("c2", "p1")).skip_reason  # new unlabelled scans
    assert not plan_round.fn(work, "self-training", None, ("c1", "p2")).skip_reason  # another profile
    assert not plan_round.fn(work, "self-training", None, ("c1", "p1"), skip_unchanged=False).skip_reason
    write_state(arm_dir(work, 2), {"status": "running", "run_id": "r2"})  # a crashed round 2 always resumes
    assert not plan_round.fn(work, "self-training", None, ("c1", "p1")).skip_reason
    assert read_state(arm_dir(work, 2))["run_id"] == "r2"


def test_profiles_validate_what_rounds_need_at_load(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[finetune]\nmax_stepz = 3\n')
    with pytest.raises(ProfileError, match=r"finetune\.max_stepz"):
        load_profile(bad)
    bad.write_text('[members]\narchitectures = ["viola_small"]\n[pseudo.rule]\nscore = "agreement"\n')
    with pytest.raises(ProfileError, match="needs at least two architectures"):
        load_profile(bad)
    with pytest.raises(ProfileError, match=r"student\.init"):
        load_profile("demo", overrides={"student": {"init": "random"}})
    settings = load_profile("demo", overrides=parse_overrides(["student.labelled_only_steps=50"]))
    final = settings.labelled_only_settings(1, "viola_small", 0)
    assert final.max_steps == 50 and final.lr == settings.finetune["lr"] and final.val_every <= 50
    assert load_profile("demo").labelled_only_settings(1, "viola_small", 0) is None
    scratch = load_profile("demo", overrides={"student": {"init": "scratch"}})
    assert scratch.train_settings(1, "viola_small", 0).max_steps == scratch.train.max_steps  # round-0 settings
    assert load_profile("demo").train_settings(1, "viola_small", 0).max_steps == 200  # the fine-tune
    # where a round runs and its schedule do not change what it computes; its settings do
    base = load_profile("demo").digest()
    assert load_profile("demo", tmp_path / "elsewhere").digest() == base
    assert load_profile("demo", overrides={"schedule": {"cron": "0 1 * * *"}}).digest() == base
    assert load_profile("demo", overrides={"train": {"lr": 1e-4}}).digest() != base
    with pytest.raises(ProfileError, match="expected KEY=VALUE"):
        parse_overrides(["student.init"])


def test_one_run_per_data_root_and_a_dead_holder_frees_it(tmp_path):
    import subprocess
    import sys
    import time

    from tasks.rounds import RunBusyError, exclusive

    work = tmp_path / "data" / "viola_work"
    with pytest.raises(FileNotFoundError, match="does not exist"), exclusive(work):
        pass  # a user's missing data root is an error, never created
    assert not (tmp_path / "data").exists()
    work.parent.mkdir()
    code = ("import sys, time; sys.path.insert(0, '.'); from tasks.rounds import exclusive\n"
            f"with exclusive({str(work)!r}):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusyError, match=rf"another run is working on .*data \(pid {holder.pid} on "), \
                exclusive(work):
            pass
    finally:
        holder.kill()  # kill -9: the operating system releases its lock
        holder.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with exclusive(work):
                break
        except RunBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def _call(rounds=1, control=False, oracle=False, force=False, overrides=None, profile="demo"):
    from tasks.rounds import requested_call

    return requested_call(profile, rounds, control, oracle, force, overrides)


def test_rounds_n_means_n_rounds_in_all_counting_the_resumed_one(tmp_path):
    from tasks.rounds import begin_invocation, end_invocation

    work = tmp_path / "work"
    assert begin_invocation.fn(work, _call(2)) == 0  # `--rounds 2` on a new root: rounds 0 and 1
    _finish(work, 0)
    write_state(arm_dir(work, 1), {"status": "running"})  # ... and it died in round 1
    assert begin_invocation.fn(work, _call(2)) == 0  # the same command continues it: round 1 only remains
    end_invocation.fn(work)
    _finish(work, 1)
    assert begin_invocation.fn(work, _call(2)) == 2  # a new call after a finished one: the next rounds
    end_invocation.fn(work)


def test_one_call_is_one_call_a_different_command_after_a_crash_is_refused(tmp_path):
    from tasks.rounds import CallConflict, begin_invocation, decide_call, end_invocation

    work = tmp_path / "work"
    _finish(work, 0)
    crashed = _call(1, control=True, force=True, overrides={"train": {"max_steps": 50}})
    assert begin_invocation.fn(work, crashed) == 1
    write_state(arm_dir(work, 1), {"status": "running"})  # it died in round 1
    record = json.loads((work / "invocation.json").read_text())
    assert record["call"] == crashed and record["command"] == (
        "viola run --profile demo --rounds 1 --control --force --set train.max_steps=50")

    other = _call(2, control=True, oracle=True)
    with pytest.raises(CallConflict) as err:
        decide_call(work, other)
    msg = str(err.value)
    assert "\n" not in msg and "'viola run --profile demo --rounds 1 --control --force --set train.max_steps=50'" in msg
    assert "rounds 1..1" in msg and "--resume" in msg and "--abandon" in msg
    with pytest.raises(CallConflict):  # the flow's own check, under the data root's lock
        begin_invocation.fn(work, other)
    assert json.loads((work / "invocation.json").read_text())["call"] == crashed  # the record is untouched

    assert decide_call(work, dict(crashed)) == crashed  # the same command continues it
    assert decide_call(work, other, resume=True) == crashed  # --resume: the interrupted call as it was asked
    assert decide_call(work, other, abandon=True) == other  # --abandon: the new call, from the next round
    assert begin_invocation.fn(work, other, abandon=True) == 1
    assert json.loads((work / "invocation.json").read_text())["call"] == other
    end_invocation.fn(work)
    with pytest.raises(CallConflict, match="no interrupted call"):
        decide_call(work, other, resume=True)
    with pytest.raises(CallConflict, match="exclude each other"):
        decide_call(work, other, resume=True, abandon=True)
    assert decide_call(work, _call(3)) == _call(3)  # nothing interrupted: any call runs


def test_an_interrupted_call_recorded_without_its_arguments_continues_by_rounds_and_arms(tmp_path):
    from tasks.rounds import CallConflict, begin_invocation, decide_call

    work = tmp_path / "work"
    work.mkdir()
    (work / "invocation.json").write_text(json.dumps({"first_round": 0, "rounds": 2, "arms": ["control"],
                                                      "status": "running", "started": "then"}))
    assert begin_invocation.fn(work, _call(2, control=True, profile="tiny")) == 0
    (work / "invocation.json").write_text(json.dumps({"first_round": 0, "rounds": 2, "arms": [],
                                                      "status": "running", "started": "then"}))
    with pytest.raises(CallConflict, match="recorded without its profile"):
        decide_call(work, _call(1), resume=True)


def test_the_round_guard_keeps_the_teacher_when_validation_falls(tmp_path):
    work = tmp_path / "work"
    _finish(work, 0)
    write_state(arm_dir(work, 0), {**read_state(arm_dir(work, 0)), **round_guard(0, 0.60, -1, None)})
    fell = round_guard(1, 0.55, 0, 0.60)
    assert fell["teaches"] is False and "below its teacher's (round 0: 0.6000)" in fell["guard"]
    write_state(arm_dir(work, 1), {"status": "finished", "run_id": "run-1-self-training", **fell})
    # round 2 learns from round 0's pseudo-labels and starts from round 0's members; its control
    # still continues the control chain
    two = plan_round.fn(work, "self-training", 2, ("c1", "p1"), force=True)
    assert two.teacher_round == 0 and two.teacher_dir.endswith("round_000/ensemble")
    assert two.teacher_run_id == "run-0-self-training" and two.init_ensemble_dir.endswith("round_000/ensemble")
    _finish(work, 1, "control")
    assert plan_round.fn(work, "control", 2, ("c1", "p1")).init_ensemble_dir.endswith("round_001-control/ensemble")
    # round 2 improves on its teacher (round 0): it teaches round 3
    rose = round_guard(2, 0.65, 0, 0.60)
    assert rose["teaches"] is True and rose["teacher_round"] == 0
    write_state(arm_dir(work, 2), {"status": "finished", "run_id": "run-2-self-training", **rose})
    assert teacher_for(work, 3) == 2
    # off, or without a teacher's Dice to compare with, a round always teaches
    assert round_guard(1, 0.5, 0, 0.6, enabled=False)["teaches"] is True
    assert round_guard(1, 0.5, 0, None)["teaches"] is True and "no validation Dice" in round_guard(1, 0.5, 0, None)[
        "guard"]
    assert round_guard(1, float("nan"), 0, 0.6)["teaches"] is True


def test_viola_run_refuses_a_different_command_after_a_crash_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from data_catalog.phantoms import write_phantom_dataset
    from flows.cli import app
    from tasks.rounds import begin_invocation

    root = tmp_path / "data"
    write_phantom_dataset(root, labelled=4, unlabelled=1, test=1, seed=7, size="small")
    work = root / "viola_work"
    begin_invocation.fn(work, _call(1, control=True, force=True, profile="tiny"))  # ... and then the call died
    res = CliRunner().invoke(app, ["run", "--profile", "tiny", "--data", str(root), "--rounds", "2", "--oracle",
                                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert res.exit_code == 2, res.output  # refused before Prefect starts
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {root}: the call 'viola run --profile tiny --rounds 1 --control --force' (started ")
    assert last.endswith("add --abandon to start this call instead") and "Traceback" not in res.output
    assert not (tmp_path / "mlflow.db").exists()


def test_the_same_call_may_run_elsewhere_when_continued(tmp_path):
    """``--set compute.*`` says where a call runs and how often a task is retried, not what it computes."""
    from tasks.rounds import CallConflict, begin_invocation, decide_call

    work = tmp_path / "work"
    begin_invocation.fn(work, _call(1, overrides={"compute": {"runner": "ray"}, "train": {"max_steps": 9}}))
    again = _call(1, overrides={"train": {"max_steps": 9}})
    assert decide_call(work, again) == again and begin_invocation.fn(work, again) == 0
    with pytest.raises(CallConflict):
        decide_call(work, _call(1, overrides={"train": {"max_steps": 10}}))
