"""Sinusoid regression (Finn, Abbeel, Levine 2017) and shifted function families for drift.

A family draws a function's parameters, then ``k_shot`` support and ``k_query`` query inputs,
and returns a regression :class:`~agent.algorithms.base.TaskTensors` with ``x`` and ``y`` of
shape ``(n, 1)``. The MAML protocol is amplitude ~ U[0.1, 5], phase ~ U[0, π], x ~ U[-5, 5],
mean squared error. Shifted families change one ingredient (frequency, input range, noise,
amplitude or phase range) or the function class (linear, quadratic, a·|x - c| + b, tanh, sums
of two sinusoids, in the spirit of MMAML, Vuorio et al. 2019) so that a stream can switch
between in-distribution and out-of-distribution tasks.

Everything is a pure function of the ``numpy.random.Generator`` passed in: the same generator
state gives the same task.

Examples
--------
>>> import numpy as np
>>> fam = make_family("sinusoid", k_shot=5, k_query=10)
>>> task = fam.sample(np.random.default_rng(0))
>>> tuple(task.support_x.shape), tuple(task.query_y.shape), task.kind
((5, 1), (10, 1), 'regression')
>>> again = fam.sample(np.random.default_rng(0))
>>> bool((again.query_y == task.query_y).all())
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Mapping

import numpy as np
import torch

from agent.algorithms.base import REGRESSION, TaskTensors

__all__ = [
    "FunctionFamily", "SinusoidFamily", "HarmonicFamily", "LinearFamily", "QuadraticFamily",
    "AbsFamily", "TanhFamily", "FAMILIES", "make_family", "fixed_test_set",
]

Range = tuple[float, float]


@dataclass(frozen=True)
class FunctionFamily:
    """A distribution over 1-D regression tasks ``y = f_θ(x) + ε``.

    Subclasses declare ``param_names`` (each a dataclass field holding a ``(low, high)`` range
    sampled uniformly, in that order) and implement :meth:`function`.

    Parameters
    ----------
    k_shot, k_query
        Support and query points per task.
    x_range
        Inputs are drawn uniformly from this interval.
    query_range
        Interval for query inputs (default: ``x_range``); differs for extrapolation tasks.
    noise
        Standard deviation of Gaussian noise added to the observed targets.
    noisy_query
        Whether query targets are noisy too (the default: they are observations like the
        support); set ``False`` to score against the clean function.
    """

    k_shot: int = 10
    k_query: int = 10
    x_range: Range = (-5.0, 5.0)
    query_range: Range | None = None
    noise: float = 0.0
    noisy_query: bool = True
    name: str = "function"

    kind: ClassVar[str] = REGRESSION
    param_names: ClassVar[tuple[str, ...]] = ()

    def sample_params(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw the function parameters θ."""
        return {p: float(rng.uniform(*getattr(self, p))) for p in self.param_names}

    def function(self, x: np.ndarray, **params: float) -> np.ndarray:
        """``f_θ(x)`` without noise."""
        raise NotImplementedError

    def task(self, params: Mapping[str, float], rng: np.random.Generator,
             query_x: np.ndarray | None = None) -> TaskTensors:
        """A task for given parameters; ``query_x`` fixes the query inputs (an evaluation grid)."""
        sx = rng.uniform(*self.x_range, size=self.k_shot)
        qx = rng.uniform(*(self.query_range or self.x_range), size=self.k_query) if query_x is None \
            else np.asarray(query_x, dtype=np.float64).reshape(-1)
        sy, qy = self.function(sx, **params), self.function(qx, **params)
        if self.noise > 0:
            sy = sy + rng.normal(0.0, self.noise, size=sy.shape)
            if self.noisy_query:
                qy = qy + rng.normal(0.0, self.noise, size=qy.shape)
        col = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32).reshape(-1, 1))  # noqa: E731
        return TaskTensors(col(sx), col(sy), col(qx), col(qy), kind=REGRESSION)

    def sample(self, rng: np.random.Generator) -> TaskTensors:
        """Draw a task: parameters, then support inputs, query inputs, noise."""
        return self.task(self.sample_params(rng), rng)

    def sample_many(self, rng: np.random.Generator, n: int) -> list[TaskTensors]:
        """``n`` tasks in sequence from one generator."""
        return [self.sample(rng) for _ in range(n)]

    def with_(self, **changes) -> "FunctionFamily":
        """A copy with some fields changed (e.g. ``k_shot``)."""
        return replace(self, **changes)


@dataclass(frozen=True)
class SinusoidFamily(FunctionFamily):
    """``y = a · sin(ω·x + φ)``; the defaults are the MAML protocol (ω = 1).

    >>> fam = SinusoidFamily(amplitude=(2.0, 2.0), phase=(0.0, 0.0))
    >>> float(fam.function(np.array([np.pi / 2]), amplitude=2.0, phase=0.0, frequency=1.0)[0])
    2.0
    """

    amplitude: Range = (0.1, 5.0)
    phase: Range = (0.0, math.pi)
    frequency: Range = (1.0, 1.0)
    name: str = "sinusoid"
    param_names: ClassVar[tuple[str, ...]] = ("amplitude", "phase", "frequency")

    def function(self, x, amplitude, phase, frequency):
        return amplitude * np.sin(frequency * x + phase)


@dataclass(frozen=True)
class HarmonicFamily(FunctionFamily):
    """Sum of two sinusoids ``a1·sin(ω·x + φ1) + a2·sin(2ω·x + φ2)`` (OSAKA's "harmonics")."""

    amplitude: Range = (0.1, 2.5)
    amplitude2: Range = (0.1, 2.5)
    phase: Range = (0.0, math.pi)
    phase2: Range = (0.0, math.pi)
    frequency: Range = (0.5, 1.0)
    name: str = "harmonic"
    param_names: ClassVar[tuple[str, ...]] = ("amplitude", "amplitude2", "phase", "phase2", "frequency")

    def function(self, x, amplitude, amplitude2, phase, phase2, frequency):
        return amplitude * np.sin(frequency * x + phase) + amplitude2 * np.sin(2 * frequency * x + phase2)


@dataclass(frozen=True)
class LinearFamily(FunctionFamily):
    """``y = a·x + b``."""

    slope: Range = (-1.0, 1.0)
    intercept: Range = (-3.0, 3.0)
    name: str = "linear"
    param_names: ClassVar[tuple[str, ...]] = ("slope", "intercept")

    def function(self, x, slope, intercept):
        return slope * x + intercept


@dataclass(frozen=True)
class QuadraticFamily(FunctionFamily):
    """``y = a·(x - c)² + b`` (outputs of the same order as the sinusoid's)."""

    curvature: Range = (-0.2, 0.2)
    center: Range = (-2.0, 2.0)
    offset: Range = (-3.0, 3.0)
    name: str = "quadratic"
    param_names: ClassVar[tuple[str, ...]] = ("curvature", "center", "offset")

    def function(self, x, curvature, center, offset):
        return curvature * (x - center) ** 2 + offset


@dataclass(frozen=True)
class AbsFamily(FunctionFamily):
    """``y = a·|x - c| + b`` (MMAML's ℓ1-norm family)."""

    scale: Range = (-1.0, 1.0)
    center: Range = (-2.0, 2.0)
    offset: Range = (-3.0, 3.0)
    name: str = "abs"
    param_names: ClassVar[tuple[str, ...]] = ("scale", "center", "offset")

    def function(self, x, scale, center, offset):
        return scale * np.abs(x - center) + offset


@dataclass(frozen=True)
class TanhFamily(FunctionFamily):
    """``y = a·tanh(x - c) + b``."""

    scale: Range = (-3.0, 3.0)
    center: Range = (-2.0, 2.0)
    offset: Range = (-3.0, 3.0)
    name: str = "tanh"
    param_names: ClassVar[tuple[str, ...]] = ("scale", "center", "offset")

    def function(self, x, scale, center, offset):
        return scale * np.tanh(x - center) + offset


# Each entry: the class and the fields that make it a shifted variant. Keyword arguments given
# to ``make_family`` override these.
FAMILIES: dict[str, tuple[type[FunctionFamily], dict]] = {
    "sinusoid": (SinusoidFamily, {}),
    "sinusoid-frequency": (SinusoidFamily, {"frequency": (0.5, 2.0)}),
    "sinusoid-extrapolate": (SinusoidFamily, {"x_range": (5.0, 10.0)}),
    "sinusoid-noise": (SinusoidFamily, {"noise": 0.1}),
    "sinusoid-noise-large": (SinusoidFamily, {"noise": 0.5}),
    "sinusoid-amplitude": (SinusoidFamily, {"amplitude": (5.0, 10.0)}),
    "sinusoid-phase": (SinusoidFamily, {"phase": (math.pi, 2 * math.pi)}),
    "harmonic": (HarmonicFamily, {}),
    "linear": (LinearFamily, {}),
    "quadratic": (QuadraticFamily, {}),
    "abs": (AbsFamily, {}),
    "tanh": (TanhFamily, {}),
}


def make_family(name: str, **kwargs) -> FunctionFamily:
    """A registered family by name, with fields overridden by ``kwargs``.

    >>> make_family("sinusoid-frequency", k_shot=5).frequency
    (0.5, 2.0)
    >>> sorted(FAMILIES)[:3]
    ['abs', 'harmonic', 'linear']
    """
    try:
        cls, preset = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown function family {name!r}; known: {sorted(FAMILIES)}") from None
    fields = {**preset, **kwargs}
    fields.setdefault("name", name)
    for key, value in list(fields.items()):
        if isinstance(value, list):
            fields[key] = tuple(value)
    return cls(**fields)


def fixed_test_set(family: FunctionFamily | str = "sinusoid", n_tasks: int = 1000, seed: int = 12345,
                   grid: int = 100, **kwargs) -> list[TaskTensors]:
    """The evaluation protocol: ``n_tasks`` tasks from ``seed``, query on a ``grid``-point grid.

    The query grid spans ``query_range`` (default ``x_range``), i.e. 100 points on [-5, 5] for
    the MAML sinusoid, as in the peers' evaluation. ``kwargs`` build the family from a name.

    >>> tasks = fixed_test_set("sinusoid", n_tasks=3, k_shot=10)
    >>> len(tasks), tuple(tasks[0].query_x.shape), float(tasks[0].query_x[0, 0])
    (3, (100, 1), -5.0)
    """
    fam = make_family(family, **kwargs) if isinstance(family, str) else family.with_(**kwargs) if kwargs else family
    rng = np.random.default_rng(seed)
    qx = np.linspace(*(fam.query_range or fam.x_range), int(grid))
    return [fam.task(fam.sample_params(rng), rng, query_x=qx) for _ in range(int(n_tasks))]
