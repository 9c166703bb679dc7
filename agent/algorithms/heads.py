"""Fine-tune a fresh head on frozen features: "Baseline" and "Baseline++" (Chen, Liu, Kira, Wang
and Huang, "A Closer Look at Few-shot Classification", ICLR 2019).

Adaptation computes the support embeddings once and fits a freshly initialised head on them with
``inner_steps`` gradient steps of size ``inner_lr`` (the features do not move; at test time the
embeddings are detached, so a step costs a head-sized matrix product). The heads:

* :class:`FineTuneHead` ("Baseline"): a linear head ``W f + b`` initialised to zero (so the
  start is deterministic and predicts uniform classes / zero outputs). Classification or
  regression.
* :class:`BaselinePlusPlus` ("Baseline++"): a cosine-similarity head ``s * cos(f, w_c)``. Its
  weights cannot start at zero (the cosine is undefined there), so they start as the normalised
  class means of the support embeddings ("weight imprinting", Qi, Brown and Lowe, CVPR 2018):
  deterministic, and at step 0 it is a cosine prototype classifier. The scale ``s`` is fixed or
  learned (``log_scale``). Classification only.

Meta-objective (a choice: Chen et al. pre-train the features with a standard classifier over
all base classes instead): the query loss after fitting the fresh head differentiably on the
support set, i.e. ANIL (Raghu et al., ICLR 2020) with a head that is re-initialised per task
instead of meta-learned. This keeps training episodic like every other algorithm here; with
``first_order=True`` the head's inner gradients are treated as constants.

Examples
--------
>>> import torch
>>> from agent.nn.mlp import MLPFeatures
>>> from agent.nn.model import MetaModel
>>> from agent.algorithms.base import TaskTensors
>>> alg = BaselinePlusPlus(MetaModel(MLPFeatures(2, (8,)), 8, 0), inner_lr=0.5, inner_steps=5)
>>> meta = alg.init_meta(torch.Generator().manual_seed(0))
>>> x = torch.tensor([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0], [0.9, 0.1]])
>>> task = TaskTensors(x, torch.tensor([0, 0, 1, 1]), x, torch.tensor([0, 0, 1, 1]))
>>> state = alg.adapt(meta, task)
>>> state.step, state.params["head.weight"].shape
(5, torch.Size([2, 8]))
>>> loss, grads = alg.meta_gradient(meta, [task])
>>> sorted(k for k in grads if not k.startswith("params.features"))
['log_scale']
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from agent.algorithms.base import CLASSIFICATION, Adapted, Algorithm, GradFn, MetaState, TaskTensors, autograd_grad, task_loss
from agent.algorithms.protonet import class_means
from agent.nn.model import Params


class FineTuneHead(Algorithm):
    """Fit a zero-initialised linear head on the support embeddings ("Baseline").

    Parameters
    ----------
    model
        The feature extractor; its own head, if any, is ignored and left out of the meta state.
    inner_lr, inner_steps
        Step size and number of gradient steps on the head.
    first_order
        Treat the head's inner gradients as constants in the meta-gradient.

    The head has ``n_way`` outputs for classification and the target size for regression.
    ``Adapted.params`` holds the feature parameters plus ``head.*``; ``Adapted.extras`` the
    support embeddings (``support_emb``).
    """

    name = "finetune"
    needs_head: ClassVar[bool] = False  # build the model with out_dim=0: the head is our own
    head_names: tuple[str, ...] = ("head.weight", "head.bias")

    def __init__(self, model, *, inner_lr: float = 0.1, inner_steps: int = 10, first_order: bool = False):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order)

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        return {k: v for k, v in super().init_meta(generator, dtype).items() if not k.startswith("params.head.")}

    # -- the head ---------------------------------------------------------------------------
    def fresh_head(self, meta: MetaState, emb: Tensor, task: TaskTensors) -> Params:
        """Zero weights and bias, one output per class (or per target dimension)."""
        width = task.n_way if task.kind == CLASSIFICATION else task.support_y.reshape(task.support_y.shape[0], -1).shape[1]
        return {"head.weight": emb.new_zeros(width, emb.shape[-1]), "head.bias": emb.new_zeros(width)}

    def head_output(self, meta: MetaState, head: Params, emb: Tensor) -> Tensor:
        """Logits or regression outputs of the head on embeddings ``emb``."""
        return F.linear(emb, head["head.weight"], head["head.bias"])

    # -- adaptation -------------------------------------------------------------------------
    def start(self, meta: MetaState, task: TaskTensors) -> Adapted:
        """Support embeddings (computed once, cached in ``extras``) and the fresh head."""
        params = self.params_of(meta)
        emb = self.embed(meta, params, task.support_x)
        return Adapted({**params, **self.fresh_head(meta, emb, task)}, {"support_emb": emb}, 0)

    def inner_objective(self, meta: MetaState, state: Adapted, task: TaskTensors) -> tuple[Callable[[Params], Tensor], Params]:
        """The head's support loss on the cached embeddings, and the head."""
        emb = state.extras["support_emb"]
        return (lambda h: self._head_loss(meta, h, emb, task)), {n: state.params[n] for n in self.head_names}

    def step(self, meta: MetaState, state: Adapted, task: TaskTensors, *, lr_scale: float = 1.0,
             create_graph: bool = False, grad_fn: GradFn = autograd_grad) -> Adapted:
        """One gradient step on the head only; without ``create_graph`` the embeddings are detached."""
        new = super().step(meta, state, task, lr_scale=lr_scale, create_graph=create_graph, grad_fn=grad_fn)
        if not create_graph:
            new.extras = {k: v.detach() for k, v in new.extras.items()}
        return new

    def _head_loss(self, meta: MetaState, head: Params, emb: Tensor, task: TaskTensors) -> Tensor:
        return task_loss(task.kind, self.head_output(meta, head, emb), task.support_y, task.n_way)

    def predict(self, meta: MetaState, state: Adapted, x: Tensor) -> Tensor:
        features = {n: p for n, p in state.params.items() if n.startswith("features.")}
        return self.head_output(meta, state.params, self.embed(meta, features, x))

    def support_loss(self, meta: MetaState, state: Adapted, task: TaskTensors) -> Tensor:
        """Support loss from the cached support embeddings."""
        return self._head_loss(meta, state.params, state.extras["support_emb"], task)


class BaselinePlusPlus(FineTuneHead):
    """Cosine-similarity head ``scale * cos(f, w_c)`` fitted on the support set ("Baseline++").

    Parameters
    ----------
    model, inner_lr, inner_steps, first_order
        As for :class:`FineTuneHead`.
    scale
        Initial scale ``s`` of the cosine logits (``log_scale`` stores its log).
    learn_scale
        Whether ``log_scale`` is trainable.
    """

    name = "baselinepp"
    kinds = frozenset({CLASSIFICATION})
    head_names = ("head.weight",)

    def __init__(self, model, *, inner_lr: float = 0.1, inner_steps: int = 10, first_order: bool = False,
                 scale: float = 10.0, learn_scale: bool = True):
        super().__init__(model, inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale, self.learn_scale = float(scale), bool(learn_scale)

    def init_meta(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> MetaState:
        meta = super().init_meta(generator, dtype)
        meta["log_scale"] = torch.tensor(math.log(self.scale), dtype=dtype).requires_grad_(self.learn_scale)
        return meta

    def fresh_head(self, meta: MetaState, emb: Tensor, task: TaskTensors) -> Params:
        """Imprinted weights: the normalised support class means."""
        if task.kind != CLASSIFICATION:
            raise ValueError("Baseline++ supports classification tasks only")
        return {"head.weight": F.normalize(class_means(emb, task.support_y, task.n_way), dim=-1)}

    def head_output(self, meta: MetaState, head: Params, emb: Tensor) -> Tensor:
        cos = F.normalize(emb, dim=-1) @ F.normalize(head["head.weight"], dim=-1).transpose(-1, -2)
        return torch.exp(meta["log_scale"]) * cos
