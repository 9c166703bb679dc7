"""ResNet-12 features (Oreshkin et al. 2018; Lee et al. 2019, MetaOptNet), without DropBlock.

Four residual blocks, each three conv 3×3 → norm (leaky ReLU 0.1 between them) plus a 1×1 conv
→ norm shortcut, then leaky ReLU and max-pool 2; global average pooling at the end, so the
feature width is the last block's width whatever the input size (28×28, 84×84, ...).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from agent.nn.norm import Norm

WIDTHS = (64, 160, 320, 640)


def widths_for(base: int) -> tuple[int, int, int, int]:
    """The standard width ratios 1 : 2.5 : 5 : 10 from a base width (``64`` gives :data:`WIDTHS`).

    >>> widths_for(16)
    (16, 40, 80, 160)
    """
    return (base, base * 5 // 2, base * 5, base * 10)


class ResBlock(nn.Module):
    """Three conv 3×3 + norm with a 1×1 conv + norm shortcut, then max-pool 2."""

    def __init__(self, c_in: int, c_out: int, norm: str, steps: int):
        super().__init__()
        bias = norm == "none"  # a normalisation's shift makes a conv bias redundant
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
        self.norm1 = Norm(c_out, norm, steps=steps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = Norm(c_out, norm, steps=steps)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias)
        self.norm3 = Norm(c_out, norm, steps=steps)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=bias)
        self.shortcut_norm = Norm(c_out, norm, steps=steps)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        out = F.leaky_relu(self.norm1(self.conv1(x), step), 0.1)
        out = F.leaky_relu(self.norm2(self.conv2(out), step), 0.1)
        out = self.norm3(self.conv3(out), step) + self.shortcut_norm(self.shortcut(x), step)
        return F.max_pool2d(F.leaky_relu(out, 0.1), 2)


class ResNet12Features(nn.Module):
    """ResNet-12 feature extractor.

    Parameters
    ----------
    in_shape
        ``(channels, height, width)`` of one input (at least 16×16); flat inputs are reshaped.
    widths
        Output channels of the four blocks; :func:`widths_for` gives slimmer standard ones.
    norm
        Normalisation policy, one of :data:`agent.nn.norm.NORMS`.
    steps
        Inner steps with their own affine under ``norm="per_step"``.

    Examples
    --------
    >>> import torch
    >>> net = ResNet12Features((3, 84, 84), widths_for(4), norm="group")
    >>> net.out_dim, net(torch.zeros(2, 3, 84, 84)).shape
    (40, torch.Size([2, 40]))
    """

    def __init__(self, in_shape: Sequence[int], widths: Sequence[int] = WIDTHS, *, norm: str = "batch", steps: int = 1):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        if min(h, w) < 2 ** len(widths):
            raise ValueError(f"in_shape {(c, h, w)} is too small for {len(widths)} pooling blocks")
        self.in_shape = (c, h, w)
        dims = [c, *(int(v) for v in widths)]
        self.blocks = nn.ModuleList(ResBlock(a, b, norm, steps) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        for block in self.blocks:
            x = block(x, step)
        return x.mean(dim=(2, 3))
