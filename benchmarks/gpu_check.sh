#!/usr/bin/env bash
# The GPU figures in one prepared run (under 8 minutes on one GPU), printed and kept in $OUT.
#
#   benchmarks/gpu_check.sh wheels   # on a machine with pip and the package index: the pure-Python
#                                    # packages a bare PyTorch image lacks, as wheels in .whl/
#   benchmarks/gpu_check.sh run      # on the GPU machine (python3 with a CUDA PyTorch)
#   GPU_CHECK_DRY=1 benchmarks/gpu_check.sh run   # the same steps, tiny and on the CPU: checks the script
#
# What it prints, each step bounded by its own timeout so that one slow step cannot eat the rest:
#   1. the device (nvidia-smi, torch, CUDA);
#   2. viola_l against nnunet_r: forward fp32 and bf16, the predictor's path (batch norm folded,
#      CUDA-graph replay) and the train step of each training path (stored, recomputed, compiled,
#      CUDA graphs) -- benchmarks/bench_models.py;
#   3. the paper's 10-member ensemble (5 x viola_l + 5 x nnunet_r) per full-size scan -- bench_predict.py;
#   4. the tests marked gpu (CUDA graphs and bf16 against the eager fp32 output);
#   5. a round with its members as fractional GPU tasks on Ray against one after another -- bench_rounds.py,
#      where Prefect, MLflow and Ray are installed (Ray's wheel is larger than what travels to a bare
#      machine; without them the step says so and is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
WHEELS=(monai==1.6.1 nibabel==5.4.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5)

step() {  # step NAME SECONDS COMMAND...: one step, its output on the terminal and in $OUT/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds} s)"
    local t0=$SECONDS
    timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}

case "${1:-run}" in
wheels)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ;;
run)
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true
    if [ -n "${GPU_CHECK_DRY:-}" ]; then  # tiny sizes on the CPU: every step runs, no figure means anything
        DEV=cpu MODELS=(--models nnunet_tiny,viola_tiny --shape 32,32,8 --repeats 1 --device cpu)
        PREDICT=(--device cpu --scans 1 --members 1 --backends torch:fp32 --overlap 0.25)
        ROUNDS=(--profile tiny --steps 4)
    else
        DEV=cuda MODELS=(--models nnunet_r,viola_l --repeats 7 --device cuda --variants)
        PREDICT=(--device cuda --scans 2 --members 1,10 --overlap 0.5)
        ROUNDS=(--profile tiny --steps 300 --gpu-share 0.25)
    fi
    step device 60 bash -c "nvidia-smi || true; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'"
    step models 240 "$PY" benchmarks/bench_models.py "${MODELS[@]}"
    step ensemble 180 "$PY" benchmarks/bench_predict.py "${PREDICT[@]}"
    if [ "$DEV" = cuda ]; then
        step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_networks.py
    fi
    if "$PY" -c 'import prefect, mlflow, ray' 2>/dev/null; then
        step rounds 240 "$PY" benchmarks/bench_rounds.py --out "$OUT/rounds" "${ROUNDS[@]}"
    else
        echo "=== rounds: skipped (Prefect, MLflow or Ray is not installed here: run bench_rounds.py --gpu-share" \
             "0.25 on a GPU machine with the project installed)" | tee "$OUT/rounds.txt"
    fi
    ;;
*)
    echo "usage: $0 wheels|run" >&2
    exit 2
    ;;
esac
