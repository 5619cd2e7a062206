"""viola_models networks: shapes, gradients, size checks, parameter counts, equivalence with the authors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DynUNet

from tests.spec_attention import SpecAttention
from viola_models import (
    ViolaAttention,
    ViolaUNet,
    convert_reference_state_dict,
    from_reference_config,
    to_reference_state_dict,
)
from viola_models.nets.configs import MODEL_CONFIGS, build_from_config, build_model, count_parameters

FIXTURES = Path(__file__).parent / "fixtures" / "reference_viola"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURES / "tiny_viola.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_shapes() -> dict:
    return json.loads((FIXTURES / "state_dict_shapes.json").read_text())


# (config, overrides, input shape, eval output shape, train output shape)
SHAPE_CASES = [
    ("viola_tiny", {}, (2, 3, 32, 32, 8), (2, 2, 32, 32, 8), (2, 3, 2, 32, 32, 8)),
    ("viola_tiny", {"deep_supervision": False}, (1, 3, 16, 24, 4), (1, 2, 16, 24, 4), (1, 2, 16, 24, 4)),
    ("viola_tiny", {"out_channels": 3, "in_channels": 1}, (2, 1, 16, 16, 2), (2, 3, 16, 16, 2), (2, 3, 3, 16, 16, 2)),
    ("viola_tiny", {"res_block": False, "viola_att": False}, (2, 3, 16, 8, 4), (2, 2, 16, 8, 4), (2, 3, 2, 16, 8, 4)),
    ("nnunet_tiny", {}, (2, 3, 32, 32, 8), (2, 2, 32, 32, 8), (2, 3, 2, 32, 32, 8)),
    ("viola_small", {}, (2, 3, 32, 32, 4), (2, 2, 32, 32, 4), (2, 3, 2, 32, 32, 4)),
    ("viola_l", {}, (2, 3, 32, 32, 4), (2, 2, 32, 32, 4), (2, 5, 2, 32, 32, 4)),
    ("viola_s", {}, (2, 3, 32, 32, 16), (2, 2, 32, 32, 16), (2, 3, 2, 32, 32, 16)),
    ("nnunet_r", {}, (1, 3, 64, 64, 8), (1, 2, 64, 64, 8), (1, 5, 2, 64, 64, 8)),
]


@pytest.mark.parametrize(("name", "overrides", "in_shape", "eval_shape", "train_shape"), SHAPE_CASES)
def test_output_shapes_in_train_and_eval(name, overrides, in_shape, eval_shape, train_shape):
    torch.manual_seed(0)
    model = build_model(name, **overrides)
    x = torch.randn(in_shape)
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    assert isinstance(y_eval, torch.Tensor) and tuple(y_eval.shape) == eval_shape
    model.train()
    y_train = model(x)
    # documented difference: with deep supervision, train mode stacks [main, heads...] on dim 1
    assert isinstance(y_train, torch.Tensor) and tuple(y_train.shape) == train_shape
    assert torch.isfinite(y_eval).all() and torch.isfinite(y_train).all()


@pytest.mark.parametrize("name", ["viola_tiny", "nnunet_tiny", "viola_small", "viola_l", "viola_s"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(1)
    model = build_model(name, dropout=0.0).train()
    shape = {"viola_s": (2, 3, 32, 32, 16), "viola_l": (2, 3, 32, 32, 4)}.get(name, (2, 3, 32, 32, 8))
    out = model(torch.randn(shape))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert dead == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


@pytest.mark.parametrize(
    ("name", "bad_shape", "divisor"),
    [("viola_tiny", (1, 3, 30, 32, 8), "(8, 8, 2)"), ("viola_l", (1, 3, 160, 160, 18), "(32, 32, 4)"),
     ("nnunet_r", (1, 3, 64, 50, 8), "(32, 32, 4)"), ("viola_s", (1, 3, 32, 32, 8), "(32, 32, 16)")],
)
def test_indivisible_input_gives_clear_error(name, bad_shape, divisor):
    model = build_model(name).eval()
    with pytest.raises(ValueError, match="not divisible") as err:
        model(torch.zeros(bad_shape))
    assert divisor in str(err.value)


def test_indivisible_error_names_legal_sizes():
    model = build_model("viola_l").eval()
    with pytest.raises(ValueError) as err:
        model(torch.zeros(1, 3, 160, 160, 18))
    assert "(160, 160, 16)" in str(err.value) and "(160, 160, 20)" in str(err.value)


@pytest.mark.parametrize(
    ("name", "expected"), [("viola_l", 22_116_478), ("viola_s", 12_773_388), ("nnunet_r", 22_009_930)]
)
def test_parameter_counts_match_the_paper(name, expected, reference_shapes):
    assert count_parameters(build_model(name)) == expected
    key = {"viola_l": "viola_l_2022", "viola_s": "viola_s_2022"}.get(name, name)
    assert reference_shapes[key]["trainable_parameters"] == expected


def test_nnunet_r_is_monai_dynunet():
    model = build_model("nnunet_r")
    assert isinstance(model, DynUNet) and not isinstance(model, ViolaUNet)
    assert count_parameters(build_model("viola_l")) - count_parameters(model) == 106_548


def test_reproduces_the_authors_output(reference):
    model = from_reference_config(reference["config"])
    model.load_state_dict(convert_reference_state_dict(reference["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(reference["input"])
    assert out.shape == reference["output"].shape
    assert (out - reference["output"]).abs().max().item() < 1e-4
    # a second call reuses the folded DDCM matrices and must agree
    with torch.no_grad():
        assert torch.equal(model(reference["input"]), out)


def test_reference_output_with_grad_enabled_and_after_weight_change(reference):
    model = from_reference_config(reference["config"])
    model.load_state_dict(convert_reference_state_dict(reference["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        model(reference["input"])  # fill the fold cache
    out = model(reference["input"])  # grad enabled: fold recomputed inside the graph
    assert (out - reference["output"]).abs().max().item() < 1e-4
    att = next(m for m in model.modules() if isinstance(m, ViolaAttention))
    with torch.no_grad():
        att.ddcm_weights[0].mul_(3.0)  # in-place change must invalidate the cache
        changed = model(reference["input"])
    assert (changed - reference["output"]).abs().max().item() > 1e-3


@pytest.mark.parametrize("key", ["viola_l_2022", "viola_s_2022", "nnunet_r"])
def test_converter_maps_every_published_key(key, reference_shapes):
    name = {"viola_l_2022": "viola_l", "viola_s_2022": "viola_s"}.get(key, key)
    listing = reference_shapes[key]["state_dict"]
    fake = {k: torch.randn(v) if v else torch.tensor(3) for k, v in listing.items()}
    converted = convert_reference_state_dict(fake)
    model = build_model(name)
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(tuple(converted[k].shape) == tuple(own[k].shape) for k in own)
    model.load_state_dict(converted, strict=True)
    # and back to the authors' layout, losslessly
    back = to_reference_state_dict(converted)
    assert set(back) == set(listing)
    assert all(torch.equal(back[k], fake[k]) for k in listing)


def test_converter_accepts_wrapped_and_dataparallel_checkpoints(reference):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reference["state_dict"].items()}}
    direct = convert_reference_state_dict(reference["state_dict"])
    via_wrapped = convert_reference_state_dict(wrapped)
    assert set(direct) == set(via_wrapped) and all(torch.equal(direct[k], via_wrapped[k]) for k in direct)


def test_converter_rejects_incomplete_attention(reference):
    sd = {k: v for k, v in reference["state_dict"].items() if "upsamples.0.canc_att.yconv.0.gamma" not in k}
    with pytest.raises(ValueError, match="incomplete attention"):
        convert_reference_state_dict(sd)


@pytest.mark.parametrize(
    "change",
    [
        {"res_block": False},
        {"viola_att": False},
        {"deep_supervision": False},
        {"deep_supr_num": 3},
        {"filters": [6, 20, 34, 40, 66], "dec_filters": [10, 12, 30, 52]},
        {"kernel_size": [[3, 3, 3]] * 5, "norm_name": ["INSTANCE", {"affine": True}]},
    ],
)
def test_any_reference_configuration_builds_and_round_trips(change, reference):
    cfg = json.loads(reference["config"]) | change
    model = from_reference_config(cfg)
    authors_layout = to_reference_state_dict(model.state_dict())
    rebuilt = from_reference_config(cfg)
    rebuilt.load_state_dict(convert_reference_state_dict(authors_layout), strict=True)
    x = torch.randn(2, 3, 32, 32, 8)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_reference_config_rejects_unverifiable_options(reference):
    cfg = json.loads(reference["config"])
    for flag in ("gated_att", "sum_deep_supr"):
        with pytest.raises(ValueError, match=flag):
            from_reference_config(cfg | {flag: True})
    with pytest.raises(ValueError, match="unknown"):
        from_reference_config(cfg | {"colour": "violet"})


@pytest.mark.parametrize(
    ("channels", "spatial"),
    [(4, (5, 3, 2)), (16, (8, 8, 1)), (34, (7, 9, 3)), (96, (6, 4, 4)), (130, (3, 5, 2)), (384, (4, 4, 2))],
)
@pytest.mark.parametrize("recompute", [False, True])
def test_attention_matches_the_spec_transcription(channels, spatial, recompute, monkeypatch):
    monkeypatch.setattr(ViolaAttention, "recompute_fusion", recompute)  # both training paths of the fusion
    torch.manual_seed(channels)
    att = ViolaAttention(channels)
    with torch.no_grad():  # non-trivial gains and GroupNorm affine
        att.axis_gain.uniform_(0.5, 1.5)
        att.group_norm.weight.uniform_(0.5, 1.5)
        att.group_norm.bias.uniform_(-0.2, 0.2)
    spec = SpecAttention(att)
    x = torch.randn(2, channels, *spatial)
    att.eval()
    with torch.no_grad():
        assert torch.allclose(att(x), spec(x), atol=1e-5, rtol=1e-4)
    # train mode, dropout off: the layered (unfolded) path, values and gradients
    att.train()
    att.ddcm_dropout = 0.0
    xa = x.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    ya, ys = att(xa), spec(xs)
    assert torch.allclose(ya, ys, atol=1e-5, rtol=1e-4)
    params = [xa, *att.parameters()]
    ga = torch.autograd.grad(ya.square().sum(), params)
    gs = torch.autograd.grad(ys.square().sum(), [xs, *att.parameters()], allow_unused=True)
    for a, s in zip(ga, gs):
        assert torch.allclose(a, s, atol=1e-4, rtol=1e-3)


def test_attention_fusion_backward_is_the_exact_gradient():
    """The full-size fusion recomputes A' in its backward: its gradients are those of the formula."""
    from viola_models.nets.attention import _AttentionFusion

    torch.manual_seed(0)
    b, c, h, w, d = 2, 3, 4, 5, 3
    shapes = [(b, c, h, w, d), (b, c, h, w, 1), (b, c, 1, 1, d), (b, c, h, w, 1), (b, c, 1, 1, d), (b, c, h, w, 1)]
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(_AttentionFusion.apply, inputs)

    def formula(x, u, t_d, q, s_d, base):
        att = torch.relu(u + t_d) + q * s_d + base
        return x * att * (1 + 1 / att.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1))

    g = torch.randn(shapes[0], dtype=torch.float64)
    fused = torch.autograd.grad(_AttentionFusion.apply(*inputs), inputs, g)
    plain = torch.autograd.grad(formula(*inputs), inputs, g)
    for a, e in zip(fused, plain):
        assert torch.allclose(a, e, atol=1e-10)


def test_attention_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    att = ViolaAttention(32)
    x = torch.randn(1, 32, 6, 6, 3)
    att.train()
    assert not torch.equal(att(x), att(x))  # Dropout(0.1) after each DDCM convolution
    att.eval()
    with torch.no_grad():
        assert torch.equal(att(x), att(x))


def test_attention_rejects_odd_channels():
    with pytest.raises(ValueError, match="even channel count"):
        ViolaAttention(7)


def test_named_configs_are_data():
    for name, cfg in MODEL_CONFIGS.items():
        # a configuration written to JSON and read back builds the very same network
        again = build_from_config(json.loads(json.dumps(cfg)))
        assert count_parameters(again) == count_parameters(build_model(name)), name
    cfg = build_model("viola_tiny", dropout=0.3)
    assert cfg.dropout == 0.3 and MODEL_CONFIGS["viola_tiny"]["dropout"] == 0.0
    with pytest.raises(ValueError, match="unknown model"):
        build_model("viola_xl")
    with pytest.raises(ValueError, match="viola-UNet only"):
        build_model("nnunet_r", dec_filters=[1, 2, 3, 4, 5, 6])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reproduces_the_authors_output_on_cuda(reference, precision):
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions alone differ by ~1e-3
    torch.backends.cuda.matmul.allow_tf32 = False
    model = from_reference_config(reference["config"])
    model.load_state_dict(convert_reference_state_dict(reference["state_dict"]), strict=True)
    model = model.cuda().eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:
        out = model(reference["input"].cuda()).float().cpu()
    tol = 1e-4 if precision == "fp32" else 0.1 * reference["output"].abs().max().item()
    assert (out - reference["output"]).abs().max().item() < tol


@pytest.mark.gpu
def test_recomputed_fusion_gives_the_stored_gradients_on_cuda(reference, monkeypatch):
    """On CUDA the attention's fusion is recomputed in the backward by default: same loss gradients
    as plain autograd, in fp32 and under bf16 autocast."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = from_reference_config(reference["config"])
    model.load_state_dict(convert_reference_state_dict(reference["state_dict"]), strict=True)
    model = model.cuda().train()
    for m in model.modules():  # dropout off: both passes must see the same network
        if isinstance(m, ViolaAttention):
            m.ddcm_dropout = 0.0
    x = reference["input"].cuda()
    for dtype, tol in ((None, 1e-4), (torch.bfloat16, 2e-2)):
        grads = []
        for recompute in (False, None):
            monkeypatch.setattr(ViolaAttention, "recompute_fusion", recompute)
            model.zero_grad()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            out.float().square().mean().backward()
            grads.append([p.grad.detach().clone() for p in model.parameters()])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, atol=tol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("name", ["viola_tiny", "nnunet_tiny", "viola_small"])
def test_folded_batch_norm_gives_the_same_output(name):
    from viola_models.inference.predictors import fold_batch_norm

    torch.manual_seed(0)
    model = build_model(name)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32, 8) * 2 + 1)
    model.eval()
    x = torch.randn(1, 3, 32, 32, 8)
    folded = fold_batch_norm(model)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == name.startswith("viola")


@pytest.mark.gpu
def test_cuda_graph_predictor_matches_eager(reference):
    from viola_models.inference.predictors import as_predictor

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = from_reference_config(reference["config"])
    model.load_state_dict(convert_reference_state_dict(reference["state_dict"]), strict=True)
    predictor = as_predictor(model, torch.device("cuda"), None)
    x = reference["input"].cuda()
    for _ in range(2):  # capture, then replay
        out = predictor(x).cpu()
        assert (out - reference["output"]).abs().max().item() < 1e-4


def test_attention_under_autocast_keeps_dtype_and_values():
    torch.manual_seed(0)
    att = ViolaAttention(64).eval()
    x = torch.randn(1, 64, 8, 8, 4)
    with torch.no_grad():
        ref = att(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = att(x.bfloat16())
    assert low.dtype == torch.bfloat16  # the full-size fusion runs in the input's dtype
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
