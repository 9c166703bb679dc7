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


# == Non-MAML algorithms (iMAML, Reptile, ProtoNet, fine-tuned heads, ridge head) ===============
# Plain-autograd references written without the agent package: a ReLU MLP by hand, explicit
# loops over classes, dense Hessians and the primal ridge normal equations.

import torch as _torch


def mlp_by_hand(params, x):
    """ReLU layers ``features.layers.<i>`` then, if present, the linear ``head``."""
    h, i = x.reshape(x.shape[0], -1), 0
    while f"features.layers.{i}.weight" in params:
        h = _torch.relu(h @ params[f"features.layers.{i}.weight"].T + params[f"features.layers.{i}.bias"])
        i += 1
    if "head.weight" in params:
        h = h @ params["head.weight"].T + params["head.bias"]
    return h


def loss_by_hand(kind, out, y):
    """Mean cross-entropy (``kind == "classification"``) or mean squared error."""
    if kind == "classification":
        logp = out - _torch.logsumexp(out, dim=1, keepdim=True)
        return -logp[_torch.arange(len(y)), y].mean()
    return ((out - y.reshape(out.shape)) ** 2).mean()


def _flat(d, names):
    return _torch.cat([d[n].reshape(-1) for n in names])


def _unflat(v, like, names):
    out, i = {}, 0
    for n in names:
        out[n] = v[i:i + like[n].numel()].reshape(like[n].shape)
        i += like[n].numel()
    return out


def proximal_solution(theta, support_fn, lam, lr, steps):
    """``phi`` after ``steps`` gradient steps on ``support_fn(phi) + lam/2 ||phi - theta||^2``."""
    theta = {n: t.detach() for n, t in theta.items()}
    phi = dict(theta)
    for _ in range(steps):
        p = {n: t.clone().requires_grad_(True) for n, t in phi.items()}
        obj = support_fn(p) + 0.5 * lam * sum(((p[n] - theta[n]) ** 2).sum() for n in p)
        g = _torch.autograd.grad(obj, list(p.values()))
        phi = {n: (p[n] - lr * gi).detach() for n, gi in zip(p, g)}
    return phi


def imaml_dense_gradient(phi, support_fn, query_fn, lam, damping=0.0):
    """Solve ``((1 + damping) I + H / lam) v = grad query(phi)`` with the dense Hessian of the support loss."""
    names = list(phi)
    x = _flat(phi, names).detach()
    hess = _torch.autograd.functional.hessian(lambda v: support_fn(_unflat(v, phi, names)), x)
    xq = x.clone().requires_grad_(True)
    gq = _torch.autograd.grad(query_fn(_unflat(xq, phi, names)), xq)[0]
    a = (1.0 + damping) * _torch.eye(len(x), dtype=x.dtype) + hess / lam
    return _unflat(_torch.linalg.solve(a, gq), phi, names), hess


def proximal_unrolled_gradient(theta, support_fn, query_fn, lam, lr, steps):
    """Gradient of ``query(phi_k)`` w.r.t. ``theta`` through ``steps`` proximal gradient steps (full MAML)."""
    theta = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
    phi = dict(theta)
    for _ in range(steps):
        obj = support_fn(phi) + 0.5 * lam * sum(((phi[n] - theta[n]) ** 2).sum() for n in phi)
        g = _torch.autograd.grad(obj, list(phi.values()), create_graph=True)
        phi = {n: phi[n] - lr * gi for n, gi in zip(phi, g)}
    g = _torch.autograd.grad(query_fn(phi), list(theta.values()))
    return dict(zip(theta, g))


def reptile_direction_by_hand(theta, loss_fn, lr, steps):
    """``theta - phi`` after ``steps`` plain gradient steps on ``loss_fn``."""
    phi = {n: t.detach() for n, t in theta.items()}
    for _ in range(steps):
        p = {n: t.clone().requires_grad_(True) for n, t in phi.items()}
        g = _torch.autograd.grad(loss_fn(p), list(p.values()))
        phi = {n: (p[n] - lr * gi).detach() for n, gi in zip(p, g)}
    return {n: theta[n].detach() - phi[n] for n in theta}


def prototype_logits_by_hand(emb_s, y_s, emb_q, n_way, distance, temperature):
    """ProtoNet logits with explicit loops over classes and queries."""
    protos = [emb_s[y_s == c].mean(0) for c in range(n_way)]
    rows = []
    for q in emb_q:
        row = []
        for p in protos:
            if distance == "sqeuclidean":
                d = ((q - p) ** 2).sum()
            else:
                d = 1 - (q @ p) / (q.norm() * p.norm())
            row.append(-d / temperature)
        rows.append(_torch.stack(row))
    return _torch.stack(rows)


def ridge_primal(x, y, lam):
    """Ridge weights from the primal normal equations ``(x^T x + lam I) W = x^T y``."""
    return _torch.linalg.solve(x.T @ x + lam * _torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)


def fitted_head_by_hand(emb_s, y_s, kind, width, lr, steps, cosine_scale=None):
    """A fresh head fitted by gradient descent on support embeddings, differentiably.

    Linear head from zeros, or (``cosine_scale`` given) a cosine head imprinted with the
    normalised class means. Returns ``head(emb) -> outputs``.
    """
    if cosine_scale is None:
        w = _torch.zeros(width, emb_s.shape[1], dtype=emb_s.dtype, requires_grad=True)
        b = _torch.zeros(width, dtype=emb_s.dtype, requires_grad=True)
        out = lambda e, w, b: e @ w.T + b  # noqa: E731
        params = [w, b]
    else:
        means = _torch.stack([emb_s[y_s == c].mean(0) for c in range(width)])
        w = means / means.norm(dim=1, keepdim=True)
        unit = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
        out = lambda e, w: cosine_scale * unit(e) @ unit(w).T  # noqa: E731
        params = [w]
    for _ in range(steps):
        g = _torch.autograd.grad(loss_by_hand(kind, out(emb_s, *params), y_s), params, create_graph=True)
        params = [p - lr * gi for p, gi in zip(params, g)]
    return lambda e: out(e, *params)
