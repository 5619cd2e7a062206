set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, monai; print(torch.__version__, monai.__version__)"
python3 -m pytest -q -m gpu tests/test_networks.py -p no:cacheprovider 2>&1 | tail -3
python3 benchmarks/bench_models.py --device cuda --spec --repeats 20 2>&1 | tee $OUT/bench_models_cuda.txt
python3 - <<'PY' 2>&1 | tee $OUT/profile.txt
import torch
from torch.profiler import profile, ProfilerActivity
from viola_models.configs import build_model
from viola_models import ViolaAttention
x = torch.randn(1,3,160,160,16, device='cuda')
for name in ['viola_l', 'nnunet_r']:
    m = build_model(name).cuda().eval()
    with torch.no_grad():
        for _ in range(3): m(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            m(x); torch.cuda.synchronize()
    print(name)
    print(p.key_averages().table(sort_by='self_cuda_time_total', row_limit=18))
# attention modules alone (fp32, eval) per level
m = build_model('viola_l').cuda().eval()
times = {}
with torch.no_grad():
    for _ in range(3): m(x)
    for nm, mod in m.named_modules():
        if isinstance(mod, ViolaAttention) and not nm.startswith('skip_layers'):
            def pre(mod, inp, nm=nm): mod._inp = inp[0]
            mod.register_forward_pre_hook(pre)
    m(x)
    for nm, mod in m.named_modules():
        if isinstance(mod, ViolaAttention) and not nm.startswith('skip_layers'):
            xi = mod._inp
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3): mod(xi)
            st.record()
            for _ in range(20): mod(xi)
            en.record(); torch.cuda.synchronize()
            print(nm, tuple(xi.shape), f'{st.elapsed_time(en)/20:.3f} ms')
PY
