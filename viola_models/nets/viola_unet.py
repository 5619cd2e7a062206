"""viola-UNet: MONAI's DynUNet with viola attention in every decoder stage (paper section 2.1).

The encoder, bottleneck, output block and deep-supervision heads are MONAI's DynUNet blocks; only
the up-block differs: transposed convolution, concatenation [skip, upsampled], viola attention, then
a plain conv-norm-act x2 block from (out + skip) to out channels, with decoder widths set
independently of the encoder (``dec_filters``).

Return types (documented difference between modes, inherited from DynUNet):

* eval mode: logits (B, out_channels, H, W, D);
* train mode with ``deep_supervision=True``: (B, 1 + deep_supr_num, out_channels, H, W, D), the main
  logits first, then the heads of decoder levels 1..n upsampled (nearest) to full size.

Dropout: MONAI >= 0.9.1 applies the configured ``dropout`` after every block convolution (and
after the transposed and output convolutions); MONAI 0.9.0, which the authors pinned, ignored it.
We keep MONAI's current behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, get_conv_layer
from monai.networks.nets import DynUNet
from torch import nn

from viola_models.nets.attention import ViolaAttention

__all__ = ["NNUNetR", "ViolaUNet", "ViolaUpBlock", "check_input_size", "stride_divisor"]


def stride_divisor(strides: Sequence[Sequence[int] | int], spatial_dims: int = 3) -> tuple[int, ...]:
    """The product of all strides per spatial axis: every input size must be a multiple of it."""
    prod = np.ones(spatial_dims, dtype=int)
    for s in strides:
        prod *= np.broadcast_to(np.atleast_1d(np.asarray(s, dtype=int)), (spatial_dims,))
    return tuple(int(v) for v in prod)


def check_input_size(shape: Sequence[int], divisor: Sequence[int]) -> None:
    """Raise a ValueError naming the legal sizes if a spatial shape is not a multiple of ``divisor``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(divisor):
        raise ValueError(f"expected {len(divisor)} spatial dimensions, got input spatial shape {shape}")
    if all(s > 0 and s % d == 0 for s, d in zip(shape, divisor)):
        return
    below = tuple(max(d, s // d * d) for s, d in zip(shape, divisor))
    above = tuple(math.ceil(s / d) * d for s, d in zip(shape, divisor))
    raise ValueError(
        f"input spatial size {shape} is not divisible by the product of the strides {tuple(divisor)}: "
        f"each size must be a multiple of it, e.g. {below} or {above} (pad or crop the input)"
    )


class ViolaUpBlock(nn.Module):
    """Decoder stage: transposed conv -> cat([skip, up]) -> viola attention -> conv-norm-act x2.

    Args:
        in_channels: channels of the deeper decoder level (or the bottleneck).
        skip_channels: channels of the encoder skip connection.
        out_channels: channels of this decoder level.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] | int,
        upsample_kernel_size: Sequence[int] | int,
        norm_name: tuple | str,
        act_name: tuple | str,
        dropout: tuple | str | float | None = None,
        trans_bias: bool = False,
        viola_att: bool = True,
    ) -> None:
        super().__init__()
        self.transp_conv = get_conv_layer(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=upsample_kernel_size,
            stride=upsample_kernel_size,
            dropout=dropout,
            bias=trans_bias,
            act=None,
            norm=None,
            conv_only=False,
            is_transposed=True,
        )
        self.attention = ViolaAttention(skip_channels + out_channels) if viola_att else None
        self.conv_block = UnetBasicBlock(
            spatial_dims,
            skip_channels + out_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=1,
            dropout=dropout,
            norm_name=norm_name,
            act_name=act_name,
        )

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = torch.cat([skip, self.transp_conv(inp)], dim=1)  # (B, skip + out, H, W, D): skip first
        if self.attention is not None:
            out = self.attention(out)
        return self.conv_block(out)


def _init_batch_norm(module: nn.Module) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ViolaUNet(DynUNet):
    """viola-UNet (keyword arguments as MONAI's DynUNet, plus ``dec_filters`` and ``viola_att``).

    Args:
        filters: encoder widths, one per entry of ``strides``.
        dec_filters: decoder widths, top level first, one per up-block (``len(strides) - 1``);
            defaults to ``filters[:-1]`` (a symmetric decoder).
        viola_att: put a ViolaAttention module in every decoder stage.
        Others: see ``monai.networks.nets.DynUNet``. ``norm_name`` defaults to batch norm.

    Input spatial sizes must be multiples of ``self.size_divisor`` (the product of the strides).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[Sequence[int] | int],
        strides: Sequence[Sequence[int] | int],
        upsample_kernel_size: Sequence[Sequence[int] | int],
        filters: Sequence[int],
        dec_filters: Sequence[int] | None = None,
        dropout: tuple | str | float | None = None,
        norm_name: tuple | str = ("BATCH", {"affine": True}),
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = False,
        trans_bias: bool = False,
        viola_att: bool = True,
    ) -> None:
        n_up = len(strides) - 1
        if len(filters) != len(strides):
            raise ValueError(f"filters needs one width per stride ({len(strides)}), got {len(filters)}")
        dec = list(filters[:-1]) if dec_filters is None else list(dec_filters)
        if len(dec) != n_up:
            raise ValueError(f"dec_filters needs one width per up-block ({n_up}), got {len(dec)}")
        if len(upsample_kernel_size) != n_up:
            raise ValueError(f"upsample_kernel_size needs {n_up} entries, got {len(upsample_kernel_size)}")
        # read by the overridden get_upsamples / get_output_block during DynUNet.__init__
        self.dec_filters = dec
        self.viola_att = viola_att
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=upsample_kernel_size,
            filters=filters,
            dropout=dropout,
            norm_name=norm_name,
            act_name=act_name,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
            trans_bias=trans_bias,
        )
        self.apply(_init_batch_norm)
        self.size_divisor = stride_divisor(strides, spatial_dims)

    def get_upsamples(self) -> nn.ModuleList:
        # bottom-up: the deepest up-block reads the bottleneck, each next one the previous block
        outs = self.dec_filters[::-1]
        ins = [self.filters[-1], *outs[:-1]]
        skips = list(self.filters[:-1])[::-1]
        kernels = list(self.kernel_size[1:])[::-1]
        up_kernels = list(self.upsample_kernel_size)[::-1]
        return nn.ModuleList(
            ViolaUpBlock(
                self.spatial_dims,
                in_c,
                skip_c,
                out_c,
                kernel_size=k,
                upsample_kernel_size=uk,
                norm_name=self.norm_name,
                act_name=self.act_name,
                dropout=self.dropout,
                trans_bias=self.trans_bias,
                viola_att=self.viola_att,
            )
            for in_c, skip_c, out_c, k, uk in zip(ins, skips, outs, kernels, up_kernels)
        )

    def get_output_block(self, idx: int) -> UnetOutBlock:
        return UnetOutBlock(self.spatial_dims, self.dec_filters[idx], self.out_channels, dropout=self.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[2:], self.size_divisor)
        return super().forward(x)


class NNUNetR(DynUNet):
    """MONAI's DynUNet unchanged, plus the input-size check of viola-UNet (the paper's nnU-Net-r)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.size_divisor = stride_divisor(self.strides, self.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[2:], self.size_divisor)
        return super().forward(x)
