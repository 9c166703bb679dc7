"""Plain-autograd reference implementations for the algorithm tests.

Written independently of ``agent``: explicit Python loops over inner steps and tasks, gradients
by ``torch.autograd.grad`` only, losses written out by hand. Parameters use the project's
naming (``features.*``, ``head.weight``, ``head.bias``) so results can be compared entry by
entry, but no code from ``agent`` is imported. Append new references at the end.
"""

from __future__ import annotations

import torch


# -- building blocks --------------------------------------------------------------------------

def mlp_forward(params, x, step=0):
    """The MLP of ``agent.nn.mlp`` written out: ReLU after every hidden layer, linear head."""
    h = x.reshape(x.shape[0], -1)
    i = 0
    while f"features.layers.{i}.weight" in params:
        h = torch.relu(h @ params[f"features.layers.{i}.weight"].t() + params[f"features.layers.{i}.bias"])
        i += 1
    return h @ params["head.weight"].t() + params["head.bias"]


def mlp_features(params, x, step=0):
    """The hidden representation of :func:`mlp_forward` (input of the head)."""
    h = x.reshape(x.shape[0], -1)
    i = 0
    while f"features.layers.{i}.weight" in params:
        h = torch.relu(h @ params[f"features.layers.{i}.weight"].t() + params[f"features.layers.{i}.bias"])
        i += 1
    return h


def module_forward(module):
    """A ``forward(params, x, step)`` for any ``nn.Module`` via ``torch.func.functional_call``."""
    def fwd(params, x, step=0):
        return torch.func.functional_call(module, params, (x,), {"step": step})
    return fwd


def loss_of(kind, out, y, n_way=None):
    """Mean cross-entropy over the first ``n_way`` logits (log-sum-exp by hand), or mean squared error."""
    if kind == "classification":
        logits = out[:, :n_way] if n_way is not None else out
        logz = torch.logsumexp(logits, dim=1)
        picked = logits.gather(1, y.view(-1, 1)).squeeze(1)
        return (logz - picked).mean()
    return ((out - y.reshape(out.shape)) ** 2).mean()


def mean_and_grad(loss_per_task, tasks, wrt):
    """Mean of ``loss_per_task(task)`` over ``tasks`` and its gradient w.r.t. the dict ``wrt``."""
    names = list(wrt)
    total = sum(loss_per_task(t) for t in tasks) / len(tasks)
    grads = torch.autograd.grad(total, [wrt[n] for n in names], allow_unused=True)
    return total.item(), {n: torch.zeros_like(wrt[n]) if g is None else g for n, g in zip(names, grads)}


# -- MAML family --------------------------------------------------------------------------

def maml_query_loss(forward, params, task, *, steps, rate, first_order=False, weights=None):
    """Query loss after ``steps`` inner SGD steps from ``params``.

    ``rate(name, k)`` is the step size of parameter ``name`` at step ``k`` (a float or tensor).
    ``weights``: per-step multipliers of the query loss after each step (multi-step loss).
    """
    fast = dict(params)
    total = 0.0
    for k in range(steps):
        names = list(fast)
        inner = loss_of(task.kind, forward(fast, task.support_x, k), task.support_y, task.n_way)
        grads = torch.autograd.grad(inner, [fast[n] for n in names], create_graph=not first_order)
        if first_order:
            grads = [g.detach() for g in grads]
        fast = {n: fast[n] - rate(n, k) * g for n, g in zip(names, grads)}
        if weights is not None:
            total = total + weights[k] * loss_of(task.kind, forward(fast, task.query_x, k + 1), task.query_y, task.n_way)
    if weights is not None and steps > 0:
        return total
    return loss_of(task.kind, forward(fast, task.query_x, steps), task.query_y, task.n_way)


def maml_meta_grad(forward, params, tasks, *, lr, steps, first_order=False):
    """MAML (or first-order MAML) mean query loss and gradient w.r.t. ``params`` (leaves)."""
    return mean_and_grad(lambda t: maml_query_loss(forward, params, t, steps=steps, rate=lambda n, k: lr,
                                                   first_order=first_order), tasks, params)


def fomaml_formula(forward, params, tasks, *, lr, steps):
    """First-order MAML by its definition: the query gradient at the adapted weights, averaged."""
    names = list(params)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for task in tasks:
        fast = {n: p.detach().clone() for n, p in params.items()}
        for k in range(steps):
            leaf = {n: p.requires_grad_(True) for n, p in fast.items()}
            inner = loss_of(task.kind, forward(leaf, task.support_x, k), task.support_y, task.n_way)
            grads = torch.autograd.grad(inner, [leaf[n] for n in names])
            fast = {n: (leaf[n] - lr * g).detach() for n, g in zip(names, grads)}
        leaf = {n: p.requires_grad_(True) for n, p in fast.items()}
        q = loss_of(task.kind, forward(leaf, task.query_x, steps), task.query_y, task.n_way)
        for n, g in zip(names, torch.autograd.grad(q, [leaf[n] for n in names])):
            out[n] += g / len(tasks)
    return out


def metasgd_meta_grad(forward, params, rates, tasks, *, steps, first_order=False):
    """Meta-SGD: ``rates[name]`` (same shape as the parameter) multiply the inner gradient elementwise.

    Returns the mean loss and gradients w.r.t. ``params`` and ``rates`` (keys ``params.<n>``/``lr.<n>``).
    """
    wrt = {**{"params." + n: p for n, p in params.items()}, **{"lr." + n: r for n, r in rates.items()}}
    return mean_and_grad(lambda t: maml_query_loss(forward, params, t, steps=steps, rate=lambda n, k: rates[n],
                                                   first_order=first_order), tasks, wrt)


def mamlpp_meta_grad(forward, params, lslr, tasks, *, steps, first_order=False, weights=None):
    """MAML++ with per-step rates ``lslr[name][k]`` and an optional multi-step loss ``weights``."""
    wrt = {**{"params." + n: p for n, p in params.items()}, **{"lslr." + n: r for n, r in lslr.items()}}
    return mean_and_grad(lambda t: maml_query_loss(forward, params, t, steps=steps, rate=lambda n, k: lslr[n][k],
                                                   first_order=first_order, weights=weights), tasks, wrt)


def anil_meta_grad(features, params, tasks, *, lr, steps, first_order=False):
    """ANIL: inner SGD on the head only, on features computed from the (meta) feature weights."""
    def one(task):
        fs, fq = features(params, task.support_x), features(params, task.query_x)
        w, b = params["head.weight"], params["head.bias"]
        for _ in range(steps):
            inner = loss_of(task.kind, fs @ w.t() + b, task.support_y, task.n_way)
            gw, gb = torch.autograd.grad(inner, [w, b], create_graph=not first_order)
            if first_order:
                gw, gb = gw.detach(), gb.detach()
            w, b = w - lr * gw, b - lr * gb
        return loss_of(task.kind, fq @ w.t() + b, task.query_y, task.n_way)
    return mean_and_grad(one, tasks, params)
