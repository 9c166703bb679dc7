"""Multi-layer perceptron features (the sinusoid network of Finn et al. 2017 is ``MLPFeatures(1, (40, 40))``)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class MLPFeatures(nn.Module):
    """Linear + ReLU layers; no batch-dependent state, so it is safe under ``vmap``.

    Examples
    --------
    >>> import torch
    >>> MLPFeatures(3, (8, 8))(torch.zeros(2, 3)).shape
    torch.Size([2, 8])
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (40, 40)):
        super().__init__()
        dims = [int(in_dim), *[int(h) for h in hidden]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, x: Tensor, step: int = 0) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x
