"""viola_models.training: schedule, loss, checkpoints, resume after a kill, reuse of finished work."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_catalog.preprocessing import PreprocessSettings, cached_preprocess, load_preprocessed
from data_catalog.scans import file_sha256
from tests.helpers import head_volume, write_nifti
from viola_models.inference.ensemble import load_member
from viola_models.inference.quality import pairwise_dice
from viola_models.inference.sliding_window import sliding_window_probability
from viola_models.training import TrainCallbacks, TrainSettings, deep_supervision_loss, fit, lr_at


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("cases")
    settings = PreprocessSettings(target_spacing=(4.0, 4.0, 5.0))
    out = []
    for i in range(4):
        img, lab, aff = head_volume(seed=i, lesions=((10 - 6 * i, 6, 0, 12.0),))
        ip = write_nifti(tmp / f"i{i}.nii.gz", img, aff, np.int16)
        lp = write_nifti(tmp / f"l{i}.nii.gz", lab, aff, np.uint8)
        path, _ = cached_preprocess(tmp / "cache", ip, file_sha256(ip), settings, lp, file_sha256(lp))
        out.append(path)
    return out


def _settings(**kw) -> TrainSettings:
    base = dict(model="viola_tiny", patch_size=(32, 32, 8), max_steps=10, val_every=5, warmup_steps=3, lr=0.01,
                log_every=5)
    return TrainSettings(**(base | kw))


def test_learning_rate_warms_up_then_anneals():
    s = TrainSettings(lr=7e-3, warmup_steps=1000, max_steps=72_000)
    assert lr_at(0, s) == pytest.approx(7e-6)
    assert lr_at(499, s) == pytest.approx(3.5e-3)
    assert lr_at(999, s) == pytest.approx(7e-3)
    assert lr_at(1000, s) == pytest.approx(7e-3)
    assert lr_at(1000 + 35_500, s) == pytest.approx(3.5e-3)
    assert lr_at(72_000, s) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(a, s) >= lr_at(a + 1000, s) for a in range(1000, 71_000, 5000))


def test_deep_supervision_loss_weights_heads():
    loss_fn = lambda out, lab: out.mean() * 0 + out[0, 0, 0, 0, 0]  # noqa: E731 - a probe: returns one logit
    label = torch.zeros(1, 1, 2, 2, 2)
    out = torch.zeros(1, 3, 2, 2, 2, 2)
    out[0, 0, 0, 0, 0, 0], out[0, 1, 0, 0, 0, 0], out[0, 2, 0, 0, 0, 0] = 4.0, 2.0, 1.0
    # weights 1, 1/2, 1/4 normalised by 1.75
    assert deep_supervision_loss(out, label, loss_fn).item() == pytest.approx((4 + 1 + 0.25) / 1.75)
    assert deep_supervision_loss(out[:, 0], label, loss_fn).item() == pytest.approx(4.0)


def test_deep_supervision_loss_is_the_hand_written_weighting_on_a_real_loss():
    """MONAI's DeepSupervisionLoss with the explicit weights gives what the earlier hand-written sum
    gave: (L0 + L1/2 + L2/4) / 1.75 with the real Dice + focal loss, on a hand-made batch."""
    from monai.losses import DiceFocalLoss

    gen = torch.Generator().manual_seed(3)
    out = torch.randn(2, 3, 1, 8, 8, 4, generator=gen)
    label = (torch.rand(2, 1, 8, 8, 4, generator=gen) > 0.7).float()
    loss_fn = DiceFocalLoss(sigmoid=True)
    by_hand = sum(w * loss_fn(out[:, i], label) for i, w in enumerate((1.0, 0.5, 0.25))) / 1.75
    assert deep_supervision_loss(out, label, loss_fn).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert deep_supervision_loss(out[:, 0], label, loss_fn).item() == pytest.approx(loss_fn(out[:, 0], label).item())


def test_schedule_against_monai_warmup_cosine():
    """Why lr_at is not MONAI's WarmupCosineSchedule: the same cosine after the warm-up, but MONAI's
    warm-up starts at lr 0 and its cosine rises again past t_total, where lr_at stays at 0."""
    from monai.optimizers import WarmupCosineSchedule

    s = TrainSettings(lr=1e-2, warmup_steps=10, max_steps=100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)
    monai = WarmupCosineSchedule(opt, warmup_steps=s.warmup_steps, t_total=s.max_steps)
    at = [s.lr * monai.lr_lambdas[0](step) for step in range(130)]
    assert all(lr_at(step, s) == pytest.approx(at[step], abs=1e-12) for step in range(10, 101))
    assert at[0] == 0.0 and lr_at(0, s) == pytest.approx(1e-3)  # the first step learns with lr_at
    assert at[120] > 0.0 and lr_at(120, s) == 0.0


def test_fit_writes_a_loadable_best_checkpoint_and_logs(cases, tmp_path):
    logged, validations = [], []
    cb = TrainCallbacks(on_log=lambda s, m: logged.append((s, m)), on_validation=lambda s, d, b: validations.append(s))
    # one validation case, allowed to choose the step here (the default needs two: see the fallback test)
    result = fit(cases[:3], cases[3:], _settings(min_val_cases=1), tmp_path / "m", callbacks=cb,
                 meta={"member": "viola_tiny-f0"})
    assert result.steps == 10 and validations == [5, 10] and [s for s, _ in logged] == [5, 10]
    assert {"train/loss", "train/lr", "train/sec_per_step"} <= set(logged[0][1])
    val = {h["step"]: h["val/dice"] for h in result.history if "val/dice" in h}
    assert list(val) == [5, 10] and result.best_dice == max(val.values())  # best.pt is the best validation
    assert val[result.best_step] == result.best_dice
    model, meta = load_member(result.best_checkpoint)
    assert meta.name == "viola_tiny-f0" and meta.patch_size == (32, 32, 8) and meta.val_dice == result.best_dice
    image = torch.as_tensor(load_preprocessed(cases[3]).image)
    prob = sliding_window_probability(model, image, meta.patch_size)
    assert prob.shape == image.shape[1:] and float(prob.min()) >= 0 and float(prob.max()) <= 1


def test_finished_training_is_reused_and_killed_training_resumes(cases, tmp_path, caplog):
    class Killed(RuntimeError):
        pass

    def kill_at_7(step, metrics):
        if step >= 7:
            raise Killed

    s = _settings(log_every=1)
    with pytest.raises(Killed):
        fit(cases[:3], cases[3:], s, tmp_path / "m", callbacks=TrainCallbacks(on_log=kill_at_7))
    assert (tmp_path / "m" / "last.pt").exists() and not (tmp_path / "m" / "result.json").exists()
    with caplog.at_level(logging.INFO, logger="viola_models.training.loop"):
        resumed = fit(cases[:3], cases[3:], s, tmp_path / "m")
    assert resumed.resumed_from == 5 and resumed.steps == 10
    assert ", 10 steps on cpu, resuming after step 5" in caplog.text
    stamp = (tmp_path / "m" / "best.pt").stat().st_mtime_ns
    again = fit(cases[:3], cases[3:], s, tmp_path / "m")
    assert again.best_dice == resumed.best_dice and (tmp_path / "m" / "best.pt").stat().st_mtime_ns == stamp
    # other settings in the same folder: trained again from scratch
    other = fit(cases[:3], cases[3:], _settings(max_steps=6, val_every=3), tmp_path / "m")
    assert other.steps == 6 and other.resumed_from == 0


def test_fine_tuning_starts_from_given_weights(cases, tmp_path):
    first = fit(cases[:3], cases[3:], _settings(max_steps=5), tmp_path / "a")
    s = _settings(max_steps=0 + 1, val_every=1, lr=1e-9, warmup_steps=0)
    tuned = fit(cases[:3], cases[3:], s, tmp_path / "b", init_weights=first.best_checkpoint)
    a = torch.load(first.best_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(tuned.best_checkpoint, weights_only=True)["state_dict"]
    # one step at lr 1e-9 barely moves the weights away from the initial ones
    key = "output_block.conv.conv.weight"
    assert torch.allclose(a[key], b[key], atol=1e-6)


def test_pairwise_dice():
    m = torch.zeros(3, 4, 4, dtype=torch.bool)
    assert pairwise_dice(m) == 1.0
    m[0, :2] = True
    m[1, :2] = True
    m[2, :1] = True  # dice(0,1)=1, dice(0,2)=dice(1,2)=2*4/(8+4)=2/3
    assert pairwise_dice(m) == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert math.isnan(pairwise_dice(m[:1]))  # one member agrees with nobody


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(cases, tmp_path):
    """Batches and augmentations are a function of (seed, step): resuming continues the same stream."""
    class Killed(RuntimeError):
        pass

    def kill_at_8(step, metrics):
        if step >= 8:
            raise Killed

    s = _settings(max_steps=12, val_every=4, log_every=1)
    straight = fit(cases[:3], cases[3:], s, tmp_path / "straight")
    with pytest.raises(Killed):
        fit(cases[:3], cases[3:], s, tmp_path / "killed", callbacks=TrainCallbacks(on_log=kill_at_8))
    resumed = fit(cases[:3], cases[3:], s, tmp_path / "killed")
    assert resumed.resumed_from == 4 and resumed.best_dice == straight.best_dice  # last.pt of step 4
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_batches_are_a_function_of_the_step():
    from viola_models.training import StepBatches

    whole = list(StepBatches(5, 2, seed=3, start_step=0, max_steps=9))
    assert list(StepBatches(5, 2, seed=3, start_step=4, max_steps=9)) == whole[4:]
    # each epoch visits every item once: samples 0..4 and 5..9 are permutations of the 5 items
    flat = [i for batch in whole for i, _ in batch]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == list(range(5))
    assert len({seed for batch in whole for _, seed in batch}) == 18  # one augmentation seed per sample
    assert list(StepBatches(5, 2, seed=4, start_step=0, max_steps=9)) != whole


def test_the_reuse_key_covers_item_content_and_initial_weights(cases, tmp_path):
    from viola_models.training import fit_digest

    s = _settings()
    base = fit_digest(cases[:3], cases[3:], s)
    assert fit_digest(cases[:3], cases[3:], s) == base
    # a training item whose content changed has another cache name (content address)
    changed = [cases[0].with_name("0" * 32 + ".npz"), *cases[1:3]]
    assert fit_digest(changed, cases[3:], s) != base
    assert fit_digest(cases[:3], cases[2:], s) != base  # validation set
    assert fit_digest(cases[:3], cases[3:], s, item_weights=[1, 1, 0.5]) != base
    w1 = tmp_path / "a.pt"
    torch.save({"state_dict": {}}, w1)
    with_init = fit_digest(cases[:3], cases[3:], s, init_weights=w1)
    w2 = tmp_path / "b.pt"
    w2.write_bytes(w1.read_bytes())
    assert fit_digest(cases[:3], cases[3:], s, init_weights=w2) == with_init  # same content, other name
    torch.save({"state_dict": {"x": torch.ones(1)}}, w1)
    assert fit_digest(cases[:3], cases[3:], s, init_weights=w1) != with_init


def test_sample_weights_scale_each_cases_loss():
    loss_fn = lambda out, lab: out.float().mean()  # noqa: E731 - a probe: the mean logit of the sample(s)
    label = torch.zeros(2, 1, 2, 2, 2)
    out = torch.stack([torch.full((2, 2, 2, 2), 1.0), torch.full((2, 2, 2, 2), 3.0)])  # (B=2, C, X, Y, Z)
    plain = deep_supervision_loss(out, label, loss_fn)
    assert deep_supervision_loss(out, label, loss_fn, torch.ones(2)).item() == pytest.approx(plain.item())
    assert deep_supervision_loss(out, label, loss_fn, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert deep_supervision_loss(out, label, loss_fn, torch.tensor([0.5, 1.0])).item() == pytest.approx(1.75)


def test_a_planted_last_checkpoint_never_runs_code(cases, tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    out = tmp_path / "m"
    out.mkdir()
    (out / "last.pt").write_bytes(pickle.dumps({"digest": Payload()}))
    with pytest.raises(ValueError, match=r"last\.pt is not a resumable checkpoint"):
        fit(cases[:3], cases[3:], _settings(), out)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_compiled_training_follows_the_eager_one(cases, tmp_path):
    """``compile = "default"`` (torch.compile of forward and backward) trains the network eager
    trains: the same losses step by step, up to the attention's dropout masks, which the compiled
    graph draws with its own generator (eager and compiled differ by ~0.1 % there)."""
    eager = fit(cases[:3], [], _settings(max_steps=4, log_every=1, val_every=4, amp=False), tmp_path / "eager")
    compiled = fit(cases[:3], [], _settings(max_steps=4, log_every=1, val_every=4, amp=False, compile="default"),
                   tmp_path / "compiled")
    losses = [[h["train/loss"] for h in r.history if "train/loss" in h] for r in (eager, compiled)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert np.allclose(losses[0], losses[1], rtol=1e-2)
    assert load_member(compiled.best_checkpoint)[1].name == "compiled"  # a member checkpoint like any other


def test_a_fold_with_one_validation_case_keeps_the_last_step_and_says_so(cases, tmp_path):
    s = _settings(max_steps=10, val_every=5)
    one = fit(cases[:3], cases[3:], s, tmp_path / "one")
    assert one.best_step == 10 and "1 validation case(s), fewer than the 2" in one.selection
    last = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    best = torch.load(one.best_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(last[k], best[k]) for k in last)  # best.pt holds the last weights
    two = fit(cases[:2], cases[2:], s, tmp_path / "two")
    assert two.selection == "best validation Dice"
    val = {h["step"]: h["val/dice"] for h in two.history if "val/dice" in h}
    assert two.best_dice == max(val.values())
    forced = fit(cases[:2], cases[2:], _settings(max_steps=10, val_every=5, checkpoint="last"), tmp_path / "last")
    assert forced.best_step == 10 and forced.selection.startswith("last step's weights (checkpoint = last)")


def _plain(**kw) -> TrainSettings:
    from viola_models.training import AugmentSettings

    off = AugmentSettings(zoom_prob=0, noise_prob=0, smooth_prob=0, rotate90_prob=0, shift_prob=0, scale_prob=0,
                          flip_prob=0, contrast_prob=0)  # only the crop is random
    return _settings(augment=off, **kw)


def test_strong_noise_reaches_only_the_pseudo_labelled_samples(cases):
    from viola_models.training import AugmentSettings, make_loaders

    noisy = AugmentSettings(zoom_prob=0, noise_prob=1.0, noise_std=1.0, smooth_prob=0, rotate90_prob=0, shift_prob=0,
                            scale_prob=0, flip_prob=0, contrast_prob=0, cutout_prob=1.0)
    flags = [False, False, True, True]
    plain = list(make_loaders(cases, _plain(max_steps=6, pseudo_fraction=0.5), pseudo=flags))
    strong = list(make_loaders(cases, _plain(max_steps=6, pseudo_fraction=0.5, pseudo_augment=noisy), pseudo=flags))
    for a, b in zip(plain, strong, strict=True):
        assert a["pseudo"].tolist() == b["pseudo"].tolist() == [0.0, 1.0]  # one labelled, one pseudo per batch
        assert torch.equal(a["label"], b["label"])  # the same crops
        assert torch.equal(a["image"][0], b["image"][0])  # the labelled sample: untouched
        assert (a["image"][1] - b["image"][1]).abs().mean() > 0.01  # the pseudo-labelled one: noise and cut-outs


def test_balanced_batches_keep_their_ratio_and_a_pseudo_ramp_starts_near_zero(cases):
    from viola_models.training import StepBatches, make_loaders, pseudo_per_batch, pseudo_ramp

    s = _plain(max_steps=8, batch_size=4, pseudo_fraction=0.5)
    batches = list(make_loaders(cases[:1] + cases[1:], s, pseudo=[False, True, True, True]))
    assert all(b["pseudo"].tolist() == [0.0, 0.0, 1.0, 1.0] for b in batches)  # 1 labelled scan, still half
    one_pool = list(make_loaders(cases, _plain(max_steps=8, batch_size=4), pseudo=[False, True, True, True]))
    assert sum(b["pseudo"].sum().item() for b in one_pool) == 24  # 3 of 4 items: 3/4 of 32 samples
    assert pseudo_per_batch(s, 1, 0) == 0 and pseudo_per_batch(s, 0, 3) == 0 and pseudo_per_batch(s, 2, 3) == 2
    assert pseudo_per_batch(_settings(batch_size=2, pseudo_fraction=0.9), 2, 3) == 1  # never the whole batch
    # the second group's sampling is a function of the step too
    whole = list(StepBatches(3, 2, seed=1, start_step=0, max_steps=9, n_second_items=5, n_second=1))
    assert list(StepBatches(3, 2, seed=1, start_step=4, max_steps=9, n_second_items=5, n_second=1)) == whole[4:]
    assert {i for b in whole for i, _ in b[1:]} == {3, 4, 5, 6, 7} and {b[0][0] for b in whole} == {0, 1, 2}
    ramp = _settings(pseudo_rampup_steps=100)
    assert pseudo_ramp(0, ramp) == pytest.approx(math.exp(-5)) and pseudo_ramp(50, ramp) == pytest.approx(
        math.exp(-1.25))
    assert pseudo_ramp(100, ramp) == 1.0 and pseudo_ramp(0, _settings()) == 1.0


def test_pseudo_flags_are_part_of_the_reuse_key(cases):
    from viola_models.training import fit_digest

    s = _settings()
    assert fit_digest(cases[:3], cases[3:], s) == fit_digest(cases[:3], cases[3:], s, pseudo=[False] * 3)
    assert fit_digest(cases[:3], cases[3:], s, pseudo=[False, False, True]) != fit_digest(cases[:3], cases[3:], s)


def test_ignored_voxels_carry_no_loss_and_no_gradient():
    from monai.losses import DiceFocalLoss

    from viola_models.training import DiceFocalIgnoring

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 6, 4, requires_grad=True)
    label = (torch.rand(2, 1, 6, 6, 4) > 0.7).float()
    loss_fn = DiceFocalIgnoring()
    # no ignored voxel: MONAI's DiceFocalLoss itself
    plain = DiceFocalLoss(to_onehot_y=True, softmax=True)(logits, label)
    assert loss_fn(logits, label).item() == pytest.approx(plain.item(), rel=1e-6)
    ignored = label.clone()
    ignored[:, :, :3] = 2.0  # half of every patch uncertain
    loss = loss_fn(logits, ignored)
    loss.backward()
    assert float(logits.grad[:, :, :3].abs().max()) == 0.0  # no gradient where the label is uncertain
    assert float(logits.grad[:, :, 3:].abs().max()) > 0.0
    # whatever the network says there, the loss is the same ...
    other = logits.detach().clone()
    other[:, :, :3] = torch.randn_like(other[:, :, :3]) * 10
    assert loss_fn(other, ignored).item() == pytest.approx(loss.item(), rel=1e-5)
    # ... and it is the loss of the other half alone
    half = loss_fn(logits.detach()[:, :, 3:].contiguous(), label[:, :, 3:].contiguous())
    assert loss.item() == pytest.approx(half.item(), rel=1e-4)


def test_an_ignore_map_becomes_the_ignore_label_of_a_preprocessed_case():
    from data_catalog.preprocessing import IGNORE_LABEL, PreprocessSettings, preprocess_arrays

    img, lab, aff = head_volume(seed=0, lesions=((10, 6, 0, 12.0),))
    ignore = np.zeros_like(lab)
    ignore[: lab.shape[0] // 2] = 1
    s = PreprocessSettings(target_spacing=(4.0, 4.0, 5.0))
    plain, marked = preprocess_arrays(img, aff, lab, s), preprocess_arrays(img, aff, lab, s, ignore)
    assert set(np.unique(marked.label)) <= {0, 1, IGNORE_LABEL} and (marked.label == IGNORE_LABEL).any()
    keep = marked.label != IGNORE_LABEL
    assert np.array_equal(marked.label[keep], plain.label[keep])  # elsewhere the label is untouched
