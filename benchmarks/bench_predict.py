"""Prediction benchmark: seconds per full-size phantom scan (512 x 512 x N at ~0.45 mm) end to end,
for one network and for the paper's 10-member ensemble (5 x viola_l + 5 x nnunet_r), per inference
backend side by side (the fp32 eager path first, then ratios to it), with where the time goes.

    python benchmarks/bench_predict.py [--device cpu|cuda|all] [--scans 2] [--members 1,10]
        [--backends torch:fp32,torch:bf16,openvino:fp32,openvino:bf16,openvino:int8] [--overlap 0.5] [--tta]
        [--ensemble DIR]

Members carry random weights: the networks' time does not depend on them, but their masks are noise,
which makes post-processing (connected lesions, ABC/2) slower than on real output; the script also
times that step on the phantoms' reference masks and prints the end-to-end time with it
("realistic"). Preprocessing is the paper's (1 x 1 x 5 mm, three windows, the head's bounding box),
windows 160 x 160 x 16, Gaussian blending. "first" is the first scan of a freshly loaded ensemble,
so it includes the OpenVINO conversion when its cache is cold (a fresh cache folder per run).
``openvino:int8`` networks are quantized beforehand (NNCF, calibrated on windows of another
phantom, as registration does on the labelled scans), and that time is printed apart: a load
never quantizes.

Accuracy guard (``--ensemble DIR``, a trained ensemble folder): every backend's mask on the same
full-size phantoms against the fp32 eager mask: Dice and volume ratio (the target is Dice >= 0.99
and volume within 1 %, judged on masks of at least 100 voxels; on smaller ones the script reports
how many voxels differ). Random members give noise masks, on which such a comparison means nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_catalog.phantoms import generate_phantom
from data_catalog.preprocessing import PreprocessSettings
from data_catalog.scans import save_nifti_like
from viola_models.inference.backends import (
    InferenceSettings,
    cpu_bf16_supported,
    nncf_available,
    openvino_available,
)
from viola_models.inference.ensemble import load_ensemble, prepare_cpu_networks, quantize_members, write_ensemble
from viola_models.inference.segment import segment_scan
from viola_models.nets.configs import build_model, model_config


def machine() -> str:
    """CPU model, cores, and the bf16 flags: benchmark numbers are only comparable on one machine."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name}, {os.cpu_count()} cores, native bf16: {'yes' if cpu_bf16_supported() else 'no'}{gpu}"


def make_ensemble(folder: Path, n: int, archs: tuple[str, str] = ("viola_l", "nnunet_r"),
                  patch_size: tuple[int, int, int] = (160, 160, 16),
                  preprocess: PreprocessSettings | None = None) -> Path:
    """``n`` members of random weights, the two architectures in turn (the paper's by default)."""
    names = [(archs[i % 2], i // 2) for i in range(n)]
    members = []
    for arch, fold in names:
        torch.manual_seed(fold)
        model = build_model(arch)
        name = f"{arch}-fold{fold}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        torch.save({"model_name": arch, "model_config": json.dumps(model_config(arch)),
                    "state_dict": model.state_dict(), "patch_size": list(patch_size), "member": name},
                   folder / name / "best.pt")
        members.append({"name": name, "checkpoint": folder / name / "best.pt"})
    write_ensemble(folder, members, preprocess or PreprocessSettings())
    return folder


def write_scans(folder: Path, n: int, first_seed: int = 100) -> tuple[list[Path], float]:
    """Full-size phantoms; also the median post-processing time on their reference masks."""
    import nibabel as nib

    from viola_models.evaluation.metrics import abc2_volume_ml
    from viola_models.inference.segment import _components

    paths, post = [], []
    for i in range(n):
        ph = generate_phantom(seed=first_seed + i, size="full")
        ref = nib.Nifti1Image(ph.image, ph.affine)
        path = folder / f"full_{i}.nii.gz"
        save_nifti_like(np.asarray(ph.image, dtype=np.int16), ref, path)
        paths.append(path)
        t0 = time.perf_counter()
        _components(ph.label)
        abc2_volume_ml(ph.label, nib.affines.voxel_sizes(ph.affine))
        post.append(time.perf_counter() - t0)
    return paths, statistics.median(post)


def _backends(spec: str, device: str) -> list[tuple[str, str]]:
    if device != "cpu":
        return [("torch", "auto")]
    out = []
    for item in spec.split(","):
        backend, _, precision = item.partition(":")
        if backend == "openvino" and not openvino_available():
            print(f"# {item}: skipped, OpenVINO is not installed (pip install 'viola-ich[openvino]')")
            continue
        if precision == "int8" and not nncf_available():
            print(f"# {item}: skipped, NNCF is not installed (pip install 'viola-ich[openvino]')")
            continue
        out.append((backend, precision or "fp32"))
    return out


def _starts(shape: tuple[int, ...], patch=(160, 160, 16), overlap: float = 0.5) -> list[list[int]]:
    """Per axis, where sliding windows start (MONAI's placement: every patch * (1 - overlap), the last flush)."""
    starts = []
    for size, p in zip(shape, patch):
        step = max(1, int(p * (1 - overlap)))
        starts.append(sorted({min(start, max(size - p, 0)) for start in range(0, max(size, p), step)}))
    return starts


def _windows(shape: tuple[int, ...], patch=(160, 160, 16), overlap: float = 0.5) -> int:
    """Sliding windows per scan."""
    return math.prod(len(s) for s in _starts(shape, patch, overlap))


def make_int8(ens_dir: Path, inference: InferenceSettings, windows_of: int = 900) -> float:
    """Quantize every member of ``ens_dir`` into ``inference.cache_dir``, calibrated on windows of
    phantom ``windows_of`` (not one that is scored); returns the seconds it took."""
    from data_catalog.preprocessing import preprocess_arrays

    t0 = time.perf_counter()
    ens = load_ensemble(ens_dir, inference=inference.model_copy(update={"precision": "fp32"}))
    ph = generate_phantom(seed=windows_of, size="full")
    quantize_members(ens, inference, [preprocess_arrays(ph.image, ph.affine, None, ens.preprocess).image])
    return time.perf_counter() - t0


def _constant_windows(image: np.ndarray, patch=(160, 160, 16), overlap: float = 0.5) -> int:
    """Windows (MONAI's placement) whose input is one value per channel: only those have an output
    that is provably the same without running the network on each."""
    count = 0
    for x, y, z in itertools.product(*_starts(image.shape[1:], patch, overlap)):
        w = image[:, x:x + patch[0], y:y + patch[1], z:z + patch[2]]
        count += all(np.ptp(w[c]) == 0 for c in range(w.shape[0]))
    return count


def speed(args, scans: list[Path], post_real: float, tmp: Path, devices: list[str]) -> None:
    from data_catalog.preprocessing import preprocess_arrays
    from data_catalog.scans import read_image

    image, info = read_image(scans[0])
    pre = preprocess_arrays(image, info.affine, None, PreprocessSettings()).image
    pre_shape = pre.shape[1:]
    n_win = _windows(pre_shape, overlap=args.overlap) * (4 if args.tta else 1)
    print(f"# preprocessed (head's bounding box) {tuple(pre_shape)}: {n_win} windows per member per scan, "
          f"{_constant_windows(pre, overlap=args.overlap)} of them constant (air only: one output would serve all)")
    print(f"{'device':<7}{'members':>8}{'backend':>16}{'first':>8}{'s/scan':>9}{'ratio':>7}{'realistic':>10}"
          f"{'s/window':>10}  breakdown (median s)")
    for n in (int(v) for v in args.members.split(",")):
        ens_dir = make_ensemble(tmp / f"ens{n}", n)
        for device in devices:
            base = None
            for backend, precision in _backends(args.backends, device):
                cache = Path(tempfile.mkdtemp(dir=tmp))  # cold conversion cache: "first" shows its cost
                inference = InferenceSettings(backend=backend, precision=precision, cache_dir=cache)
                if args.registered and device == "cpu":  # what registration leaves: the networks converted
                    prepare_cpu_networks(ens_dir, inference)
                if precision == "int8":
                    print(f"# {n} member(s) quantized to int8 in {make_int8(ens_dir, inference):.1f} s", flush=True)
                t0 = time.perf_counter()
                ens = load_ensemble(ens_dir, device=device, inference=inference)
                segment_scan(scans[0], ens, overlap=args.overlap, tta=args.tta)  # conversion, graph capture
                first = time.perf_counter() - t0
                totals, parts = [], []
                for path in scans:
                    t0 = time.perf_counter()
                    seg = segment_scan(path, ens, overlap=args.overlap, tta=args.tta)
                    totals.append(time.perf_counter() - t0)
                    parts.append(seg.timings)
                med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                total = statistics.median(totals)
                base = base or total
                detail = ", ".join(f"{k} {v:.2f}" for k, v in med.items())
                real = total - med["post"] + post_real
                per_window = med["networks"] / (n * n_win)
                print(f"{device:<7}{n:>8}{backend + ':' + precision:>16}{first:>8.1f}{total:>9.2f}{total / base:>7.2f}"
                      f"{real:>10.2f}{per_window:>10.3f}  {detail}", flush=True)
                del ens
                if device == "cuda":
                    torch.cuda.empty_cache()


MIN_GUARDED_VOXELS = 100  # a ratio on a handful of voxels says nothing: smaller masks report voxels that differ


def accuracy(args, tmp: Path) -> None:
    """Masks of every backend against the fp32 eager mask, with a trained ensemble."""
    from data_catalog.preprocessing import preprocess_arrays
    from viola_models.inference.sliding_window import FOREGROUND_THRESHOLD, predict_ensemble

    pairs = [("torch", "fp32")] + [b for b in _backends(args.backends, "cpu") if b != ("torch", "fp32")]
    settings = {b: InferenceSettings(backend=b[0], precision=b[1], cache_dir=tmp / "acc_cache") for b in pairs}
    for b in pairs:
        if b[1] == "int8":  # calibrated on a phantom that is not scored below
            make_int8(args.ensemble, settings[b], windows_of=800)
    loaded = {b: load_ensemble(args.ensemble, inference=settings[b]) for b in pairs}
    print(f"# accuracy guard: {args.ensemble} on {args.scans} full-size phantom(s), overlap {args.overlap}")
    print(f"{'phantom':>8}{'backend':>16}{'voxels':>9}{'dice':>8}{'volume':>8}{'voxels off':>11}")
    worst_dice, worst_vol, worst_small = {}, {}, {}
    for i in range(args.scans):
        ph = generate_phantom(seed=900 + i, size="full")
        case = preprocess_arrays(ph.image, ph.affine, None, loaded[pairs[0]].preprocess)
        ref = None
        for b, ens in loaded.items():
            out = predict_ensemble(ens.members, case.image, overlap=args.overlap, tta=args.tta,
                                   predictors=ens.predictors)
            mask = (out.mean_prob >= FOREGROUND_THRESHOLD).numpy()
            ref = mask if ref is None else ref
            both = int(mask.sum() + ref.sum())
            dice = 2.0 * int((mask & ref).sum()) / both if both else 1.0
            vol = mask.sum() / ref.sum() if ref.sum() else float(mask.sum() == 0)
            off = int((mask ^ ref).sum())
            if ref.sum() >= MIN_GUARDED_VOXELS:
                worst_dice[b] = min(worst_dice.get(b, 1.0), dice)
                worst_vol[b] = max(worst_vol.get(b, 0.0), abs(vol - 1.0))
            else:
                worst_small[b] = max(worst_small.get(b, 0), off)
            name = f"{b[0]}:{b[1]}"
            print(f"{900 + i:>8}{name:>16}{int(mask.sum()):>9}{dice:>8.4f}{vol:>8.4f}{off:>11}", flush=True)
    for b in pairs[1:]:
        ok = worst_dice.get(b, 1.0) >= 0.99 and worst_vol.get(b, 0.0) <= 0.01
        small = (f"; masks under {MIN_GUARDED_VOXELS} voxels: at most {worst_small[b]} voxel(s) differ"
                 if b in worst_small else "")
        print(f"# {b[0]}:{b[1]}: worst Dice {worst_dice.get(b, 1.0):.4f}, worst volume change "
              f"{100 * worst_vol.get(b, 0.0):.2f} % -> {'within' if ok else 'OUTSIDE'} the guard{small}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--scans", type=int, default=2)
    ap.add_argument("--members", default="1,10")
    ap.add_argument("--backends", default="torch:fp32,torch:bf16,openvino:fp32,openvino:bf16",
                    help="CPU backends as backend:precision, the first is the baseline of the ratios")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--ensemble", type=Path, default=None, help="a trained ensemble: accuracy guard only")
    ap.add_argument("--registered", action="store_true", help="'first' as for a registered model: its CPU "
                    "networks converted beforehand, as registration does (viola_models.inference.ensemble."
                    "prepare_cpu_networks)")
    args = ap.parse_args()
    print(f"# {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads; overlap {args.overlap}"
          f"{'; TTA' if args.tta else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.ensemble is not None:
            accuracy(args, tmp)
            return
        devices = (["cpu"] if args.device in ("cpu", "all") else []) + (
            ["cuda"] if args.device in ("cuda", "all") and torch.cuda.is_available() else [])
        scans, post_real = write_scans(tmp / "scans", args.scans)
        print(f"# {args.scans} full-size phantom scan(s); post-processing on the reference masks: {post_real:.3f} s")
        speed(args, scans, post_real, tmp, devices)


if __name__ == "__main__":
    main()
