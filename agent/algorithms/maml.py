"""MAML: model-agnostic meta-learning (Finn, Abbeel and Levine, ICML 2017).

The inner loop takes ``inner_steps`` gradient steps on the support loss from the meta-learned
initialisation; the outer loop differentiates the query loss through them (second order), or
treats the inner gradients as constants (first-order MAML, ``first_order=True``).

Reference: learn2learn's ``algorithms/maml.py`` and the functorch MAML example; this version is
purely functional (parameter dicts in, parameter dicts out).

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> model = MetaModel(MLPFeatures(1, (16,)), 16, 1, vmappable=True)
>>> maml = MAML(model, inner_lr=0.01, inner_steps=2)
>>> meta = maml.init_meta(torch.Generator().manual_seed(0))
>>> g = torch.Generator().manual_seed(1)
>>> x = torch.rand(10, 1, generator=g)
>>> task = TaskTensors(x, torch.sin(x), x, torch.sin(x), "regression")
>>> loss, grads = maml.meta_gradient(meta, [task])
>>> sorted(grads)[:2]
['params.features.layers.0.bias', 'params.features.layers.0.weight']
"""

from __future__ import annotations

from agent.algorithms.base import Algorithm


class MAML(Algorithm):
    """Second-order MAML with any number of inner steps."""

    name = "maml"


class FOMAML(Algorithm):
    """First-order MAML: the meta-gradient ignores second derivatives."""

    name = "fomaml"

    def __init__(self, model, *, inner_lr: float = 0.01, inner_steps: int = 1, first_order: bool = True):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=True)
