"""Conv-4 features: the standard few-shot backbone of MAML and ProtoNet (Vinyals et al. 2016).

Four blocks of conv 3×3 (padding 1) → normalisation → ReLU → max-pool 2, then flattened:
64 features for 28×28 inputs with 64 filters, 1600 for 84×84.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from agent.nn.norm import Norm


class ConvBlock(nn.Module):
    """conv 3×3 → norm → ReLU → max-pool 2."""

    def __init__(self, c_in: int, c_out: int, norm: str, steps: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = Norm(c_out, norm, steps=steps)

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        return F.max_pool2d(F.relu(self.norm(self.conv(x), step)), 2)


class Conv4Features(nn.Module):
    """Conv-4 feature extractor.

    Parameters
    ----------
    in_shape
        ``(channels, height, width)`` of one input; flat inputs are reshaped to it.
    hidden
        Filters per block.
    norm
        Normalisation policy, one of :data:`agent.nn.norm.NORMS`.
    steps
        Inner steps with their own affine under ``norm="per_step"``.
    blocks
        Number of blocks.

    Examples
    --------
    >>> import torch
    >>> net = Conv4Features((1, 28, 28), hidden=8, norm="group")
    >>> net.out_dim, net(torch.zeros(2, 1, 28, 28)).shape
    (8, torch.Size([2, 8]))
    >>> Conv4Features((3, 84, 84)).out_dim
    1600
    """

    def __init__(self, in_shape: Sequence[int], hidden: int = 64, *, norm: str = "batch", steps: int = 1, blocks: int = 4):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        self.in_shape = (c, h, w)
        self.blocks = nn.ModuleList(ConvBlock(c if i == 0 else hidden, hidden, norm, steps) for i in range(blocks))
        h, w = h >> blocks, w >> blocks  # each pool floors the size
        if h == 0 or w == 0:
            raise ValueError(f"in_shape {self.in_shape} is too small for {blocks} pooling blocks")
        self.out_dim = hidden * h * w

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        for block in self.blocks:
            x = block(x, step)
        return x.flatten(1)
