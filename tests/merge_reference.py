"""Independent straightforward merge implementations, written from the spec for the tests.

Everything is flattened into one n×d float32 matrix (per scope) and uses torch.sort /
torch.kthvalue at the spec's exact indices — the way the papers' released code works.
Nothing here imports mcomp.merge.
"""

from __future__ import annotations

import torch


def flatten(base, models, keys):
    b = torch.cat([base[k].float().reshape(-1) for k in keys])
    tau = torch.stack([torch.cat([m[k].float().reshape(-1) for k in keys]) - b for m in models])
    return b, tau


def unflatten(vec, base, keys):
    out, pos = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = vec[pos : pos + n].reshape(base[k].shape)
        pos += n
    return out


def by_scope(base, models, scope, fn):
    """Apply fn(tau) -> merged delta over each scope group; return θ as float32 dict."""
    keys = list(base)
    groups = [keys] if scope == "global" else [[k] for k in keys]
    out = {}
    for g in groups:
        b, tau = flatten(base, models, g)
        out.update(unflatten(b + fn(tau), base, g))
    return out


def task_arithmetic(tau, weights=None, scale=1.0):
    w = torch.tensor(weights if weights is not None else [1.0] * tau.shape[0]).unsqueeze(1)
    return scale * (w * tau).sum(0)


def ties(tau, density=0.2, weights=None, scale=1.0, sign="mass"):
    n, d = tau.shape
    k = d - int(d * density)
    if k > 0:
        kth = tau.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = tau * (tau.abs() >= kth)
    else:
        trimmed = tau.clone()
    if weights is not None:
        trimmed = trimmed * torch.tensor(weights).unsqueeze(1)
    s = torch.sign(trimmed.sum(0)) if sign == "mass" else torch.sign(torch.sign(trimmed).sum(0))
    majority = torch.sign(s.sum())
    s[s == 0] = majority
    keep = torch.where(s.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    cnt = (sel != 0).sum(0).float()
    return scale * (sel.sum(0) / torch.clamp(cnt, min=1))


def pcb(tau, ratio=0.1, clip=0.01, inter="v1", weights=None, scale=1.0):
    n, d = tau.shape
    srt = torch.sort(tau.abs(), dim=1).values
    lo = srt[:, int(d * clip)].unsqueeze(1)
    hi = srt[:, int(d * (1 - clip) - 1)].unsqueeze(1)
    a = torch.clamp(tau.abs(), lo, hi)
    clipped = torch.sign(tau) * a
    mn, mx = a.min(1, keepdim=True).values, a.max(1, keepdim=True).values
    rng = mx - mn
    norm = torch.where(rng > 0, (a - mn) / torch.where(rng > 0, rng, 1), torch.zeros_like(a))
    intra = torch.exp(n * norm**2)
    hat = torch.sign(tau) * norm
    if inter == "v1":
        cross = torch.tanh(tau * tau.sum(0))
    elif inter == "v2":
        cross = torch.tanh(tau * hat.sum(0))
    else:
        cross = torch.stack([torch.tanh(hat[i] * hat).sum(0) for i in range(n)])
    beta = intra * cross
    sb = torch.sort(beta, dim=1).values
    t = sb[:, int(d * (1 - ratio))].unsqueeze(1)
    m = sb[:, d - 1].unsqueeze(1)
    c = torch.clamp(beta, t, m)
    span = m - t
    s = torch.where(span > 0, (c - t) / torch.where(span > 0, span, 1), torch.zeros_like(c))
    lam = torch.tensor(weights if weights is not None else [1.0] * n).unsqueeze(1)
    merged = (lam * s * clipped).sum(0) / torch.clamp(s.sum(0), min=1e-12)
    return scale * merged
