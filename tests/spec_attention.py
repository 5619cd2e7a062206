"""A literal, operation-by-operation transcription of the viola attention as the authors wrote it.

Used as the oracle in tests and as the "unfused" comparison in benchmarks/bench_models.py: one
Conv2d per DDCM layer and axis, F.interpolate after each, the fusion written as in the spec. It
reads the parameters of a ``viola_models.ViolaAttention`` so that both compute with the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from viola_models.nets.attention import ViolaAttention, ddcm_geometry

STRIDES = (2, 2, 4, 4)


class SpecAttention(nn.Module):
    def __init__(self, source: ViolaAttention) -> None:
        super().__init__()
        self.src = source
        self.c = source.channels
        self.k, self.e, self.dil = ddcm_geometry(self.c)

    def _ddcm(self, v: torch.Tensor, g: int) -> torch.Tensor:
        # v: (B, 1, C, L), a one-channel map; convolutions along C only
        c, length = v.shape[2], v.shape[3]
        running = v
        for i, (s, d) in enumerate(zip(STRIDES, self.dil)):
            w = self.src.ddcm_weights[i][g].unsqueeze(-1)  # (e, n, k, 1)
            y = F.conv2d(running, w, stride=(s, 1), dilation=(d, 1), padding=(d * (self.k - 1) // 2, 0))
            y = F.dropout(y, self.src.ddcm_dropout, training=self.src.training)
            y = F.interpolate(y, size=(c, length), mode="bilinear", align_corners=False)
            running = torch.cat([y, running], dim=1)
        stack = torch.cat([v, running], dim=1)
        w1 = self.src.merge_weight[g].view(1, -1, 1, 1)
        return F.conv2d(F.silu(stack), w1)  # (B, 1, C, L)

    def _branch(self, pooled: torch.Tensor, g: int) -> torch.Tensor:
        # pooled: (B, C, L); LayerNorm over C per position, gain only
        mu = pooled.mean(dim=1, keepdim=True)
        var = pooled.var(dim=1, keepdim=True, unbiased=False)
        normed = (pooled - mu) / torch.sqrt(var + self.src.eps) * self.src.axis_gain[g].view(1, -1, 1)
        return self._ddcm(normed.unsqueeze(1), g)[:, 0]  # (B, C, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w, d = x.shape
        v_h = self._branch(x.mean(dim=(3, 4)), 0)
        v_w = self._branch(x.mean(dim=(2, 4)), 1)
        v_d = self._branch(x.mean(dim=(2, 3)), 2)
        s_h, s_w, s_d = torch.sigmoid(v_h), torch.sigmoid(v_w), torch.sigmoid(v_d)
        tn = torch.tanh(self.src.group_norm(torch.cat([v_h, v_w, v_d], dim=2)))
        t_h, t_w, t_d = torch.split(tn, [h, w, d], dim=2)
        t_h, t_w, t_d = 0.5 * (t_h + s_h), 0.5 * (t_w + s_w), 0.5 * (t_d + s_d)
        sh, sw, sd = s_h.view(b, c, h, 1, 1), s_w.view(b, c, 1, w, 1), s_d.view(b, c, 1, 1, d)
        th, tw, td = t_h.view(b, c, h, 1, 1), t_w.view(b, c, 1, w, 1), t_d.view(b, c, 1, 1, d)
        a = sh * sw + sw * sd + sd * sh + sh * sw * sd + torch.relu(th + tw + td)
        a = 0.1 * a + 0.3
        a = a + F.normalize(a.reshape(b, -1), p=2, dim=1).view_as(a)
        return x * a
