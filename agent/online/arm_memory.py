"""Per-arm evidence from similar past tasks: the selector's arm memory.

:class:`ArmMemory` keeps, for each arm, the last ``capacity`` ``(task embedding, reward, time)``
rows it was given, and estimates an arm's reward on a new task from that arm's ``k`` most similar
rows (cosine similarity of the L2-normalised embeddings): a weighted mean with weights
``max(sim, 0) ** power * exp(-recency * age)`` (``age``: tasks since the row was learned), shrunk
towards the arm's mean reward over all its rows with the weight of ``prior`` rows:

    estimate = (sum_i w_i r_i + prior * mean_r) / (sum_i w_i + prior)

The summed weight ``W = sum_i w_i`` (the evidence) is returned too: the selector's exploration
bonus shrinks with it. Tasks of the same hidden task (or a recurring one) embed close together,
so this answers "which arm did well on tasks like this one, lately": the per-task variation
between arms that a regressor over global features averages away. The task embedding is
:func:`agent.memory.task_embedding` (support set only; no label of the task's family is read).

Rows come from the selector's own pulls (bandit feedback) and, when the agent evaluates the other
arms on a labelled task (``selector.counterfactual``), from those evaluations too.
Everything is numpy arrays and floats: the object pickles (the agent's River state file).

Examples
--------
>>> import numpy as np
>>> mem = ArmMemory(["a", "b"], k=3)
>>> e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
>>> for t in range(10):
...     for e, arm, r in ((e1, "a", 0.9), (e1, "b", 0.1), (e2, "a", 0.2), (e2, "b", 0.8)):
...         _ = mem.add(e, arm, r, t)  # near e1 "a" is better, near e2 "b"
>>> est = mem.estimate(np.array([0.9, 0.1]), 10)
>>> est["a"][0] > 0.8 > 0.2 > est["b"][0]
True
>>> est = mem.estimate(np.array([0.1, 0.9]), 10)
>>> est["b"][0] > est["a"][0]
True
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable

import numpy as np

__all__ = ["ArmMemory"]


class ArmMemory:
    """Bounded per-arm store of (embedding, reward, time) rows with a k-NN reward estimate.

    Parameters
    ----------
    arms
        The arms (any hashable keys, e.g. :class:`~agent.online.selector.Arm`).
    k
        Most similar rows per arm used by :meth:`estimate`.
    capacity
        Rows kept per arm (the oldest is overwritten).
    power
        Exponent of the (clipped) cosine similarity in the weights: larger trusts only very close tasks.
    recency
        Decay per task of age in the weights (0: none).
    prior
        Weight, in rows, of the arm's overall mean reward in the estimate.
    """

    def __init__(self, arms: Iterable[Hashable], *, k: int = 10, capacity: int = 2000, power: float = 4.0,
                 recency: float = 0.02, prior: float = 0.5):
        if k < 1 or capacity < 1:
            raise ValueError("k and capacity must be >= 1")
        if power < 0 or recency < 0 or prior <= 0:
            raise ValueError("power and recency must be >= 0 and prior > 0")
        self.arms = list(arms)
        self.k, self.capacity = int(k), int(capacity)
        self.power, self.recency, self.prior = float(power), float(recency), float(prior)
        self.dim: int | None = None
        self._emb: dict = {}
        self._reward = {a: np.zeros(self.capacity) for a in self.arms}
        self._time = {a: np.zeros(self.capacity) for a in self.arms}
        self._n = {a: 0 for a in self.arms}  # rows ever added per arm
        self._sum = {a: 0.0 for a in self.arms}  # over all rows ever added (the prior's mean)

    def __len__(self) -> int:
        return sum(min(n, self.capacity) for n in self._n.values())

    def __repr__(self) -> str:
        return f"ArmMemory(arms={len(self.arms)}, rows={len(self)}, k={self.k})"

    def _unit(self, embedding) -> np.ndarray | None:
        e = np.asarray(embedding, dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(e))
        if not np.isfinite(e).all() or norm == 0.0:
            return None
        if self.dim is None:
            self.dim = e.shape[0]
        elif e.shape[0] != self.dim:
            raise ValueError(f"embedding: expected dimension {self.dim}, got {e.shape[0]}")
        return e / norm

    def add(self, embedding, arm: Hashable, reward: float, t: float) -> bool:
        """Remember ``arm``'s ``reward`` on a task embedded as ``embedding``, learned at time ``t``.

        Returns False (nothing stored) for a zero or non-finite embedding or a non-finite reward.
        """
        if arm not in self._n:
            raise KeyError(f"unknown arm {arm}")
        e = self._unit(embedding)
        r = float(reward)
        if e is None or not math.isfinite(r):
            return False
        if arm not in self._emb:
            self._emb[arm] = np.zeros((self.capacity, self.dim))
        i = self._n[arm] % self.capacity
        self._emb[arm][i] = e
        self._reward[arm][i] = r
        self._time[arm][i] = float(t)
        self._n[arm] += 1
        self._sum[arm] += r
        return True

    def mean(self, arm: Hashable) -> float:
        """The arm's mean reward over every row it was given (NaN before the first)."""
        return self._sum[arm] / self._n[arm] if self._n[arm] else math.nan

    def estimate(self, embedding, t: float) -> dict[Hashable, tuple[float, float]]:
        """``{arm: (estimate, evidence)}`` for a task embedded as ``embedding`` at time ``t``.

        An arm without rows (or a zero / non-finite embedding) gives ``(NaN, 0.0)``; with rows
        but no similar one the estimate is its overall mean (evidence 0).
        """
        e = self._unit(embedding)
        out = {}
        for a in self.arms:
            n = min(self._n[a], self.capacity)
            if n == 0 or e is None:
                out[a] = (self.mean(a) if n else math.nan, 0.0)
                continue
            sims = self._emb[a][:n] @ e
            kk = min(self.k, n)
            idx = np.argpartition(-sims, kk - 1)[:kk] if kk < n else np.arange(n)
            w = np.maximum(sims[idx], 0.0) ** self.power
            if self.recency:
                w = w * np.exp(-self.recency * np.maximum(float(t) - self._time[a][idx], 0.0))
            W = float(w.sum())
            est = (float(w @ self._reward[a][idx]) + self.prior * self.mean(a)) / (W + self.prior)
            out[a] = (est, W)
        return out
