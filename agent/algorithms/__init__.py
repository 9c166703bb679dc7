"""Adaptation algorithms, one module per family, all pure functions over parameter dicts.

Use :func:`build` to make one by name; :data:`NAMES` lists the names.

Examples
--------
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> alg = build("maml", MetaModel(MLPFeatures(1, (8,)), 8, 1), inner_lr=0.01, inner_steps=1)
>>> alg.name
'maml'
"""

from __future__ import annotations

import importlib

from agent.algorithms.base import Adapted, Algorithm, MetaState, TaskTensors

# name -> "module:Class"; modules import lazily so that one algorithm's import cost is not all's.
_REGISTRY = {
    "maml": "agent.algorithms.maml:MAML",
    "fomaml": "agent.algorithms.maml:FOMAML",
    "mamlpp": "agent.algorithms.mamlpp:MAMLPlusPlus",
    "metasgd": "agent.algorithms.metasgd:MetaSGD",
    "imaml": "agent.algorithms.imaml:IMAML",
    "anil": "agent.algorithms.anil:ANIL",
    "reptile": "agent.algorithms.reptile:Reptile",
    "protonet": "agent.algorithms.protonet:ProtoNet",
    "finetune": "agent.algorithms.heads:FineTuneHead",
    "baselinepp": "agent.algorithms.heads:BaselinePlusPlus",
    "ridge": "agent.algorithms.ridge:RidgeHead",
}
NAMES = tuple(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class registered under ``name``."""
    try:
        module, cls = _REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(NAMES)}") from None
    return getattr(importlib.import_module(module), cls)


def build(name: str, model, **hyper) -> Algorithm:
    """Instantiate algorithm ``name`` on ``model`` with hyperparameters ``hyper``."""
    return algorithm_class(name)(model, **hyper)


__all__ = ["Adapted", "Algorithm", "MetaState", "TaskTensors", "NAMES", "algorithm_class", "build"]
