"""Online intelligence: task features, failure prediction, algorithm selection, drift
detection, online A/B experiments and authenticated persistence of River state.

Each module is a small, pure building block with River-style ``learn``/``predict`` methods; the
agent wires them together. Submodules import lazily so that importing :mod:`agent.online` costs
nothing until a piece is used.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("features", "failure", "selector", "drift", "experiments", "persist")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"agent.online.{name}")
    raise AttributeError(f"module 'agent.online' has no attribute {name!r}")
