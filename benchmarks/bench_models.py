"""Model benchmark: parameters, eval forward time, train-step time and peak memory.

    python benchmarks/bench_models.py [--device cpu|cuda|all] [--models viola_l,viola_s,nnunet_r]
        [--shape 160,160,16] [--repeats 7] [--precisions fp32,bf16] [--spec] [--variants]

Prints one row per (model, device, precision): trainable parameters, median eval forward time of
one 1x3xHxWxD patch after warm-up and its ratio to nnunet_r, eager ("fwd") and as the predictor
runs it ("fast": batch norm folded into the convolutions, and on CUDA replayed as a CUDA graph),
median train step (batch 2: forward, Dice+focal loss over the deep-supervision outputs, backward,
SGD step), and peak memory (CUDA: max allocated; CPU: peak resident set of a fresh process per
model). ``--spec`` adds viola_l with its attention replaced by the literal, operation-by-operation
transcription of the spec (tests/spec_attention.py), i.e. the authors' way of computing it.
``--variants`` adds the training paths of viola_l side by side: ``+stored`` (plain autograd keeps
the attention's full-size fusion: the old path), the default (on CUDA recomputed in the backward), and
``+compile`` / ``+graphs`` (``TrainSettings.compile`` "default" / "reduce-overhead").
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.losses import DiceFocalLoss  # noqa: E402

from viola_models import ViolaAttention  # noqa: E402
from viola_models.inference.predictors import as_predictor  # noqa: E402
from viola_models.nets.configs import build_model, count_parameters  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _with_spec_attention(model: torch.nn.Module) -> torch.nn.Module:
    from tests.spec_attention import SpecAttention

    for module in model.modules():
        if hasattr(module, "attention") and isinstance(module.attention, ViolaAttention):
            module.attention = SpecAttention(module.attention)  # holds the original as a child
    return model


def bench_one(name: str, device: str, precision: str, shape: tuple[int, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    base_name, _, variant = name.partition("+")
    model = build_model(base_name)
    if variant == "spec":
        model = _with_spec_attention(model)
    ViolaAttention.recompute_fusion = False if variant == "stored" else None  # None: recomputed on CUDA
    model = model.to(device)
    step_model = model
    if variant in ("compile", "graphs"):
        step_model = torch.compile(model, mode="default" if variant == "compile" else "reduce-overhead")
    params = count_parameters(model)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    x1 = torch.randn(1, 3, *shape, device=device)
    x2 = torch.randn(2, 3, *shape, device=device)
    y2 = (torch.rand(2, 1, *shape, device=device) > 0.9).float()
    loss_fn = DiceFocalLoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(x1)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = step_model(x2)
            heads = torch.unbind(out, dim=1) if out.dim() == 6 else (out,)
            weights = [0.5**i for i in range(len(heads))]
            loss = sum(w * loss_fn(h.float(), y2) for w, h in zip(weights, heads)) / sum(weights)
        loss.backward()
        opt.step()

    warm = (3 if device == "cuda" else 1) + (2 if step_model is not model else 0)  # compilation
    model.eval()
    fwd = _timed(forward, device, repeats, warm)
    # the predictor's path: batch norm folded, and on CUDA replayed as a CUDA graph
    fast = as_predictor(model, torch.device(device), torch.bfloat16 if precision == "bf16" else None)
    fwd_fast = _timed(lambda: fast(x1), device, repeats, warm)
    model.train()
    step = _timed(train_step, device, max(3, repeats // 2), warm)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "device": device, "precision": precision, "params": params,
            "forward_ms": fwd * 1e3, "fast_forward_ms": fwd_fast * 1e3, "train_step_ms": step * 1e3,
            "peak_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--models", default="nnunet_r,viola_l,viola_s")
    ap.add_argument("--shape", default="160,160,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--spec", action="store_true", help="add viola_l with the literal spec attention")
    ap.add_argument("--variants", action="store_true",
                    help="add viola_l+stored (autograd keeps the attention's full-size fusion: the old training "
                         "path), viola_l+compile (torch.compile) and viola_l+graphs (compiled, CUDA graphs)")
    ap.add_argument("--precisions", default="fp32", help="CPU precisions, e.g. fp32,bf16 (CUDA runs both)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.one:  # child process: one CPU measurement, JSON on stdout
        dev, prec, name = args.one.split(":", 2)
        print(json.dumps(bench_one(name, dev, prec, shape, args.repeats)))
        return

    models = args.models.split(",")
    if args.spec:
        models.append("viola_l+spec")
    if args.variants:
        models += ["viola_l+stored", "viola_l+compile"] + (["viola_l+graphs"] if args.device != "cpu" else [])
    runs: list[tuple[str, str]] = []
    if args.device in ("cpu", "all"):
        runs += [("cpu", p) for p in args.precisions.split(",")]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        runs += [("cuda", "fp32"), ("cuda", "bf16")]
    print(f"# torch {torch.__version__}, input 1x3x{'x'.join(map(str, shape))} (train step: batch 2)")
    if torch.cuda.is_available():
        print(f"# cuda device: {torch.cuda.get_device_name()}")
    print(f"# cpu threads: {torch.get_num_threads()}")
    header = f"{'model':<14}{'device':<7}{'prec':<6}{'params':>12}{'fwd ms':>10}{'x nnunet_r':>11}" \
             f"{'fast ms':>10}{'x nnunet_r':>11}{'step ms':>10}{'peak MiB':>10}"
    print(header)
    for device, precision in runs:
        rows = []
        for name in models:
            if device == "cpu":
                cmd = [sys.executable, __file__, "--one", f"cpu:{precision}:{name}", "--shape", args.shape,
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
            else:
                rows.append(bench_one(name, device, precision, shape, args.repeats))
                torch.cuda.empty_cache()
        base = next((r for r in rows if r["model"] == "nnunet_r"), None)
        for r in rows:
            ratio = f"{r['forward_ms'] / base['forward_ms']:.2f}" if base else "-"
            ratio_fast = f"{r['fast_forward_ms'] / base['fast_forward_ms']:.2f}" if base else "-"
            print(f"{r['model']:<14}{r['device']:<7}{r['precision']:<6}{r['params']:>12,}{r['forward_ms']:>10.1f}"
                  f"{ratio:>11}{r['fast_forward_ms']:>10.1f}{ratio_fast:>11}{r['train_step_ms']:>10.1f}"
                  f"{r['peak_mb']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
