"""The viola attention module (paper section 2.1, Fig. 3; behaviour as in the authors' published
code, checked against their tiny reference model in ``tests/test_networks.py``).

For a feature volume ``x`` of shape (B, C, H, W, D) the module

1. average-pools ``x`` to one descriptor per axis: (B, C, H), (B, C, W), (B, C, D);
2. runs each descriptor through its own branch: a LayerNorm over the channel axis, then a DDCM
   (dense dilated convolutions' merging) block whose convolutions slide along the *channel* axis
   only, producing one map ``v`` of shape (B, C, L) per axis;
3. turns ``v`` into a sigmoid gate ``s`` and a tanh gate ``t = 0.5 * (tanh(GroupNorm(v)) + s)``;
4. fuses the gates into a full-size attention volume
   ``A = s_h s_w + s_w s_d + s_d s_h + s_h s_w s_d + ReLU(t_h + t_w + t_d)``,
   ``A' = 0.1 A + 0.3``, ``A'' = A' + A' / ||A'||_2`` and returns ``x * A''``.

Implementation notes (the arithmetic is the authors'; the evaluation order is ours):

* Every DDCM operation before its SiLU acts on each column (one position along H, W or D)
  independently and linearly along the channel axis. A (k, 1) convolution with stride and dilation
  is computed as a gather of its k taps (im2col along C) and one matrix product; the bilinear
  resize back to C rows is a fixed (C, C') matrix; the three axis branches share shapes and run as
  one batched product (``torch.bmm``), instead of twelve tiny dilated convolutions and twelve
  resizes per module.
* In evaluation without gradients the DDCM dropout is the identity and the whole pre-SiLU stack is
  linear, so it folds into one (4e+2)C x C matrix per branch (the stack applied to the identity),
  cached until the weights change: the DDCM then costs one batched matrix product.
* The three axes share every small step (pooling layout, LayerNorm, sigmoid, GroupNorm, tanh)
  on tensors laid end to end, and the full-size fusion is regrouped so that it costs four
  full-size passes plus the L2 norm and the final product, instead of about fifteen: a few dozen
  kernel launches per module in all.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ViolaAttention", "ddcm_geometry"]

_DDCM_STRIDES = (2, 2, 4, 4)


def ddcm_geometry(channels: int) -> tuple[int, int, tuple[int, ...]]:
    """Kernel size ``k``, maps per layer ``e`` and the four dilations of the DDCM for ``channels``.

    k = 3 + 2 * floor(C / 32); e = floor(max(C // 16, 4) / 4) + 1; dilations [1, k, 2(k-1)+1, 3(k-1)+1].
    """
    k = 3 + 2 * (channels // 32)
    e = max(channels // 16, 4) // 4 + 1
    dilations = (1, k, 2 * (k - 1) + 1, 3 * (k - 1) + 1)
    return k, e, dilations


@lru_cache(maxsize=512)
def _tap_rows(length: int, kernel: int, stride: int, dilation: int, device: torch.device) -> torch.Tensor:
    """(kernel * L_out,) input rows read by tap t of output row u (t-major); ``length`` marks padding.

    A (k, 1) convolution along rows with this stride, dilation and padding dilation*(k-1)/2 reads
    row u*stride + t*dilation - pad for its tap t; rows outside [0, length) read the zero row.
    """
    pad = dilation * (kernel - 1) // 2
    out_len = (length + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    src = torch.arange(out_len).view(1, -1) * stride + torch.arange(kernel).view(-1, 1) * dilation - pad
    src[(src < 0) | (src >= length)] = length
    return src.reshape(-1).to(device)


@lru_cache(maxsize=512)
def _resize_matrix(out_len: int, in_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(out_len, in_len) matrix of 1-D linear resizing with align_corners=False (as F.interpolate)."""
    eye = torch.eye(in_len).view(1, 1, in_len, in_len)
    mat = F.interpolate(eye, size=(out_len, in_len), mode="bilinear", align_corners=False)[0, 0]
    return mat.to(device=device, dtype=dtype)


class ViolaAttention(nn.Module):
    """Viola attention on a (B, C, H, W, D) tensor; returns a tensor of the same shape.

    Args:
        channels: C, the channel count of the input (the concatenated skip and upsampled maps).
        ddcm_dropout: dropout after each DDCM convolution (0.1 in the authors' network).
        eps: epsilon of the per-position LayerNorm over channels.

    Parameters (three axis branches H, W, D stacked on the first axis):
        ``axis_gain`` (3, C): LayerNorm gains; ``ddcm_weights[i]`` (3, e, 1 + i*e, k): the DDCM
        convolution kernels along the channel axis; ``merge_weight`` (3, 4e + 2): the 1x1 merge
        convolution after SiLU; ``group_norm``: GroupNorm(2, C) of the tanh gate.
    """

    #: training: recompute the full-size fusion in the backward (``_AttentionFusion``) rather than let
    #: autograd store it. None: on CUDA only (GPU memory traffic is its cost there; on a CPU, under
    #: bf16 autocast, the stored path is faster); True / False force it (tests, benchmarks)
    recompute_fusion: bool | None = None

    def __init__(self, channels: int, ddcm_dropout: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(
                f"ViolaAttention needs an even channel count >= 2 (GroupNorm with 2 groups), got {channels}"
            )
        self.channels = channels
        self.eps = eps
        self.ddcm_dropout = ddcm_dropout
        self.kernel, self.maps_per_layer, self.dilations = ddcm_geometry(channels)
        k, e = self.kernel, self.maps_per_layer
        self.axis_gain = nn.Parameter(torch.ones(3, channels))
        self.ddcm_weights = nn.ParameterList(
            [nn.Parameter(torch.empty(3, e, 1 + i * e, k)) for i in range(len(_DDCM_STRIDES))]
        )
        self.merge_weight = nn.Parameter(torch.empty(3, 4 * e + 2))
        self.group_norm = nn.GroupNorm(2, channels)
        self.reset_parameters()
        self._folded: tuple[tuple, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """Kaiming-normal (a=0.01, fan_in) kernels, as DynUNet initialises every convolution."""
        gain = math.sqrt(2.0 / (1 + 0.01**2))
        with torch.no_grad():
            for w in self.ddcm_weights:
                w.normal_(0.0, gain / math.sqrt(w.shape[2] * w.shape[3]))
            self.merge_weight.normal_(0.0, gain / math.sqrt(self.merge_weight.shape[1]))
            self.axis_gain.fill_(1.0)

    # ------------------------------------------------------------------------------ DDCM
    def _ddcm_stack(self, z: torch.Tensor, dropout: bool) -> torch.Tensor:
        """The linear part of the three DDCMs on columns z (3, C, N); returns (3, J, C, N), J = 4e+2.

        Each convolution gathers its taps (im2col along the channel axis) and contracts them with
        the kernels in one batched matrix product over the three axes; its maps are resized back to
        C rows and put in front of the running stack; the result is [input, running stack].
        """
        g, c, n_cols = z.shape
        k = self.kernel
        running = z.unsqueeze(1)  # (3, 1, C, N)
        for w, stride, dil in zip(self.ddcm_weights, _DDCM_STRIDES, self.dilations):
            rows = _tap_rows(c, k, stride, dil, z.device)  # cached per device: no host copy per call
            c_out = rows.numel() // k
            n_maps, e = running.shape[1], w.shape[1]
            padded = F.pad(running, (0, 0, 0, 1))  # zero row at index C: (3, n, C+1, N)
            taps = padded.index_select(2, rows).view(g, n_maps * k, c_out * n_cols)  # (3, n*k, C'*N)
            y = torch.bmm(w.to(z.dtype).reshape(g, e, n_maps * k), taps).view(g, e, c_out, n_cols)
            if dropout:
                y = F.dropout(y, self.ddcm_dropout, training=True)
            resize = _resize_matrix(c, c_out, z.device, z.dtype)  # (C, C')
            y = torch.matmul(resize, y)  # (3, e, C, N)
            running = torch.cat([y, running], dim=1)  # new maps in front
        return torch.cat([z.unsqueeze(1), running], dim=1)

    def _folded_matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The LayerNorm gain and pre-SiLU DDCM of each branch as one (3, C, (4e+2)*C) matrix that
        right-multiplies row vectors; for evaluation without gradients (dropout off, everything
        linear). Cached until the weights change."""
        params = (self.axis_gain, *self.ddcm_weights)
        key = (device, dtype, *((w._version, w.data_ptr()) for w in params))
        if self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        c = self.channels
        eye = torch.eye(c, device=device, dtype=torch.float32).expand(3, c, c)
        chunk = 64  # columns of the identity per pass: bounds the im2col buffer of wide layers
        stack = torch.cat([self._ddcm_stack(eye[..., j : j + chunk], dropout=False) for j in range(0, c, chunk)], -1)
        # stack[g, j, r, col]: map j, row r, for a unit input at row col; as rows: (3, col, j*C + r)
        folded = stack.reshape(3, -1, c).transpose(1, 2) * self.axis_gain.detach().view(3, c, 1)
        self._folded = (key, folded.to(dtype).contiguous())
        return self._folded[1]

    def _axis_maps(self, x: torch.Tensor) -> torch.Tensor:
        """DDCM outputs of the three axes laid end to end: (B, C, H + W + D) = [v_h, v_w, v_d], float32."""
        b, c, h, w, d = x.shape
        lengths = (h, w, d)
        l_max = max(lengths)
        mean_d = x.mean(dim=4, dtype=torch.float32)  # (B, C, H, W)
        pooled = (mean_d.mean(dim=3), mean_d.mean(dim=2), x.mean(dim=(2, 3), dtype=torch.float32))  # (B, C, L)
        # rows = positions, channels last: (3, B, Lmax, C), the axes zero-padded to one length
        desc = torch.stack([F.pad(p.transpose(1, 2), (0, 0, 0, l_max - n)) for p, n in zip(pooled, lengths)])
        desc = F.layer_norm(desc, (c,), eps=self.eps)  # over channels, per position; gain below
        rows = desc.view(3, b * l_max, c)
        if self.training or torch.is_grad_enabled():
            cols = (rows * self.axis_gain.view(3, 1, c)).transpose(1, 2)  # (3, C, N)
            stack = self._ddcm_stack(cols, dropout=self.training and self.ddcm_dropout > 0)  # (3, J, C, N)
            stack = stack.permute(0, 3, 1, 2)  # (3, N, J, C)
        else:
            folded = self._folded_matrix(x.device, torch.float32)  # (3, C, J*C), gain included
            stack = torch.bmm(rows, folded).view(3, b * l_max, -1, c)  # (3, N, J, C)
        # SiLU then the 1x1 merge over the J = 4e+2 maps: (3, N, 1, J) @ (3, N, J, C) -> (3, N, 1, C)
        v = torch.matmul(self.merge_weight.to(stack.dtype).view(3, 1, 1, -1), F.silu(stack))
        v = v.view(3, b, l_max, c)
        return torch.cat([v[i, :, : lengths[i]] for i in range(3)], dim=1).transpose(1, 2)  # (B, C, H+W+D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"ViolaAttention built for {self.channels} channels got an input with {x.shape[1]}")
        if torch.is_autocast_enabled(x.device.type):
            # the small per-axis work runs in float32 and the full-size fusion in the input's dtype, chosen
            # here rather than by autocast (whose per-op casts would double this module's launch count)
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        v = self._axis_maps(x)  # (B, C, H+W+D), float32
        s = torch.sigmoid(v)
        # tanh gate: GroupNorm over the three maps end to end; t = 0.5 (tanh + s), pre-scaled by 0.1
        gn = self.group_norm
        t = (torch.tanh(F.group_norm(v, 2, gn.weight.float(), gn.bias.float(), gn.eps)) + s) * 0.05
        s_h, s_w, s_d = torch.split(s, (h, w, d), dim=2)
        t_h, t_w, t_d = torch.split(t, (h, w, d), dim=2)
        # broadcastable views: (B, C, H, 1, 1), (B, C, 1, W, 1), (B, C, 1, 1, D)
        s_h, t_h = s_h.reshape(b, c, h, 1, 1), t_h.reshape(b, c, h, 1, 1)
        s_w, t_w = s_w.reshape(b, c, 1, w, 1), t_w.reshape(b, c, 1, w, 1)
        s_d, t_d = s_d.reshape(b, c, 1, 1, d), t_d.reshape(b, c, 1, 1, d)
        # A' = 0.1 A + 0.3 = ReLU(0.1 (t_h + t_w + t_d)) + 0.1 (P + Q) s_d + 0.1 P + 0.3 with
        # P = s_h s_w and Q = s_h + s_w (the 0.1 enters the ReLU by positive homogeneity); all
        # terms but the three full-size ones live on (B, C, H, W, 1).
        # small terms in float32, cast once to the input's dtype for the full-size passes
        dt = x.dtype
        u = (t_h + t_w).to(dt)
        p = s_h * s_w
        q = ((p + s_h + s_w) * 0.1).to(dt)
        base = (p * 0.1 + 0.3).to(dt)
        t_d, s_d = t_d.to(dt), s_d.to(dt)
        if torch.is_grad_enabled():
            recompute = x.is_cuda if self.recompute_fusion is None else self.recompute_fusion
            if recompute:  # the full-size A' is recomputed in the backward instead of stored
                return _AttentionFusion.apply(x, u, t_d, q, s_d, base)
            att = torch.relu(u + t_d) + torch.addcmul(base, q, s_d)
            norm = torch.linalg.vector_norm(att.flatten(1), dim=1, dtype=_acc(att)).view(b, 1, 1, 1, 1)
            return x * att * (1.0 + 1.0 / norm).to(dt)
        att = torch.add(u, t_d).relu_().addcmul_(q, s_d).add_(base)  # one full-size allocation, in place
        norm = torch.linalg.vector_norm(att.view(b, -1), dim=1, dtype=torch.float32).view(b, 1, 1, 1, 1)
        # A'' = A' + A' / ||A'||; A' >= 0.3 everywhere, so the norm is never zero
        scale = (1.0 + 1.0 / norm).to(dt)
        return att.mul_(x).mul_(scale)


def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of reductions over ``t``: float32, or float64 for float64 input."""
    return torch.promote_types(t.dtype, torch.float32)


def _sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the axes where ``like`` broadcasts (size 1), accumulated in float32 at least."""
    dims = tuple(i for i, n in enumerate(like.shape) if n == 1 and t.shape[i] != 1)
    return (t.sum(dims, keepdim=True, dtype=_acc(t)) if dims else t).to(like.dtype)


def _fuse(u, t_d, q, s_d, base) -> tuple[torch.Tensor, torch.Tensor]:
    """A' = ReLU(u + t_d) + q s_d + base (full size) and its L2 norm per sample, (B, 1, 1, 1, 1), float32 at least."""
    att = torch.add(u, t_d).relu_().addcmul_(q, s_d).add_(base)
    norm = torch.linalg.vector_norm(att.flatten(1), dim=1, dtype=_acc(att))
    return att, norm.view(-1, *([1] * (att.dim() - 1)))


class _AttentionFusion(torch.autograd.Function):
    """y = x * A' * (1 + 1 / ||A'||) with A' = ReLU(u + t_d) + q s_d + base, where only ``x`` is
    full size and the other inputs broadcast against it ((B, C, H, W, 1) and (B, C, 1, 1, D)).

    Autograd would keep A', the ReLU mask and the products (several full-size tensors per module);
    this saves ``x`` and the small inputs and recomputes A' in the backward (a few elementwise
    passes), with its gradient:

        dA' = g x s - (sum(g x A') / ||A'||^3) A',   s = 1 + 1 / ||A'||
        dx = g A' s;   du, dt_d = dA' [u + t_d > 0] (summed to their shapes);
        dq = dA' s_d;  ds_d = dA' q;  dbase = dA'
    """

    @staticmethod
    def forward(ctx, x, u, t_d, q, s_d, base):
        att, norm = _fuse(u, t_d, q, s_d, base)
        ctx.save_for_backward(x, u, t_d, q, s_d, base)
        return att.mul_(x).mul_((1.0 + 1.0 / norm).to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        x, u, t_d, q, s_d, base = ctx.saved_tensors
        att, norm = _fuse(u, t_d, q, s_d, base)
        scale = (1.0 + 1.0 / norm).to(x.dtype)
        gx = g * x  # g x: both the A' gradient's first term and the norm term's sum need it
        total = (gx * att).flatten(1).sum(1, dtype=norm.dtype).view_as(norm)
        d_att = (gx * scale).sub_(att * (total / norm.pow(3)).to(att.dtype))
        grad_x = (g * att).mul_(scale) if ctx.needs_input_grad[0] else None
        active = (u + t_d) > 0
        d_relu = d_att * active
        return (grad_x, _sum_to(d_relu, u), _sum_to(d_relu, t_d), _sum_to(d_att * s_d, q),
                _sum_to(d_att * q, s_d), _sum_to(d_att, base))
