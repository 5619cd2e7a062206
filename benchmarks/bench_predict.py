"""Prediction benchmark: seconds per full-size phantom scan (512 x 512 x N at ~0.45 mm) end to end,
for one network and for the paper's 10-member ensemble (5 x viola_l + 5 x nnunet_r), with where
the time goes (read, preprocess, networks, invert, post-processing).

    python benchmarks/bench_predict.py [--device cpu|cuda|all] [--scans 2] [--members 1,10] [--tta]

Members carry random weights: the networks' time does not depend on them, but their masks are noise,
which makes post-processing (connected lesions, ABC/2) slower than on real output; the script also
times that step on the phantoms' reference masks and prints the end-to-end time with it.
Preprocessing is the paper's (1 x 1 x 5 mm, three windows), windows 160 x 160 x 16, overlap 0.5,
Gaussian blending.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_catalog.phantoms import generate_phantom
from data_catalog.preprocessing import PreprocessSettings
from data_catalog.scans import save_nifti_like
from viola_models.configs import build_model, model_config
from viola_models.ensemble import load_ensemble, write_ensemble
from viola_models.segment import segment_scan


def make_ensemble(folder: Path, n: int) -> Path:
    names = [("viola_l" if i % 2 == 0 else "nnunet_r", i // 2) for i in range(n)]
    members = []
    for arch, fold in names:
        torch.manual_seed(fold)
        model = build_model(arch)
        name = f"{arch}-fold{fold}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        torch.save({"model_name": arch, "model_config": json.dumps(model_config(arch)),
                    "state_dict": model.state_dict(), "patch_size": [160, 160, 16], "member": name},
                   folder / name / "best.pt")
        members.append({"name": name, "checkpoint": folder / name / "best.pt"})
    write_ensemble(folder, members, PreprocessSettings())
    return folder


def write_scans(folder: Path, n: int) -> tuple[list[Path], float]:
    """Full-size phantoms; also the median post-processing time on their reference masks."""
    import nibabel as nib
    import numpy as np

    from viola_models.metrics import abc2_volume_ml
    from viola_models.segment import _components

    paths, post = [], []
    for i in range(n):
        ph = generate_phantom(seed=100 + i, size="full")
        ref = nib.Nifti1Image(ph.image, ph.affine)
        path = folder / f"full_{i}.nii.gz"
        save_nifti_like(np.asarray(ph.image, dtype=np.int16), ref, path)
        paths.append(path)
        t0 = time.perf_counter()
        _components(ph.label)
        abc2_volume_ml(ph.label, nib.affines.voxel_sizes(ph.affine))
        post.append(time.perf_counter() - t0)
    return paths, statistics.median(post)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--scans", type=int, default=2)
    ap.add_argument("--members", default="1,10")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--overlap", type=float, default=0.5)
    args = ap.parse_args()
    devices = (["cpu"] if args.device in ("cpu", "all") else []) + (
        ["cuda"] if args.device in ("cuda", "all") and torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans, post_real = write_scans(tmp / "scans", args.scans)
        import nibabel as nib

        shape = nib.load(scans[0]).shape
        print(f"# torch {torch.__version__}; {args.scans} full-size phantom scan(s), e.g. {shape}; "
              f"overlap {args.overlap}; cpu threads {torch.get_num_threads()}" +
              (f"; cuda {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
        print(f"# post-processing on the reference masks: {post_real:.3f} s per scan")
        print(f"{'device':<7}{'members':>8}{'s/scan':>9}{'realistic':>10}  breakdown (median s)")
        for n in (int(v) for v in args.members.split(",")):
            ens_dir = make_ensemble(tmp / f"ens{n}", n)
            for device in devices:
                ens = load_ensemble(ens_dir, device=device)
                segment_scan(scans[0], ens, overlap=args.overlap, tta=args.tta)  # warm-up: graph capture, caches
                totals, parts = [], []
                for path in scans:
                    t0 = time.perf_counter()
                    seg = segment_scan(path, ens, overlap=args.overlap, tta=args.tta)
                    totals.append(time.perf_counter() - t0)
                    parts.append(seg.timings)
                med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
                detail = ", ".join(f"{k} {v:.2f}" for k, v in med.items())
                real = statistics.median(totals) - med["post"] + post_real
                print(f"{device:<7}{n:>8}{statistics.median(totals):>9.2f}{real:>10.2f}  {detail}", flush=True)
                del ens
                if device == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
