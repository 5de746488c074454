"""Independent straightforward implementations of the newer merge methods, written from their released
code's maths (TSV-M, Iso-C/CTS, TALL-mask consensus) and mergekit's (Breadcrumbs, DELLA, Model Stock,
SLERP), for the tests: per tensor in float64 (SLERP in numpy float32, as mergekit computes it), one
model at a time, no chunks. Nothing here imports mcomp.merge; the DELLA draws follow mcomp's documented
stream (a torch.Generator seeded from sha256(seed, tensor name, model index), uniforms in element order).
Each function takes {name: θ0}, [{name: θ_i}] and returns {name: θ} in float64."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def deltas(base, models):
    return {k: [m[k].double() - base[k].double() for m in models] for k in base}


def polar(x):
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsv(base, models, scale=1.0):
    out = {}
    for key, d in deltas(base, models).items():
        t = len(d)
        if d[0].dim() != 2:
            merged = sum(d) / t
        else:
            k = min(d[0].shape)
            r = int(k * (1 / t))
            us, ss, vs = [], [], []
            for x in d:
                u, s, vh = torch.linalg.svd(x, full_matrices=False)
                us.append(u[:, :r])
                ss.append(s[:r])
                vs.append(vh[:r])
            pad = k - t * r
            u = torch.cat([*us, torch.zeros(d[0].shape[0], pad, dtype=torch.float64)], 1)
            s = torch.cat([*ss, torch.zeros(pad, dtype=torch.float64)])
            vh = torch.cat([*vs, torch.zeros(pad, d[0].shape[1], dtype=torch.float64)], 0)
            merged = polar(u) @ torch.diag(s) @ polar(vh)
        out[key] = base[key].double() + scale * merged
    return out


def iso_c(base, models, scale=1.0):
    out = {}
    for key, d in deltas(base, models).items():
        if d[0].dim() != 2:
            merged = sum(d) / len(d)
        else:
            u, s, vh = torch.linalg.svd(sum(d), full_matrices=False)
            merged = s.mean() * u @ vh
        out[key] = base[key].double() + scale * merged
    return out


def iso_cts(base, models, fraction=0.8, scale=1.0):
    out = {}
    for key, d in deltas(base, models).items():
        t = len(d)
        if d[0].dim() != 2:
            merged = sum(d) / t
        else:
            k = min(d[0].shape)
            c = k - round((k - int(k * fraction)) / t) * t
            n = (k - c) // t
            u, s, vh = torch.linalg.svd(sum(d), full_matrices=False)
            uc = u[:, :c]
            us, ss, vs = [], [], []
            for x in d:
                ut, st, vt = torch.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
                us.append(ut[:, :n])
                ss.append(st[:n])
                vs.append(vt[:n])
            ss.append(s[:c])
            merged = torch.cat(ss).mean() * polar(torch.cat([*us, uc], 1)) @ polar(torch.cat([*vs, vh[:c]], 0))
        out[key] = base[key].double() + scale * merged
    return out


def consensus(base, models, lambdas, min_agree=2, multi_task="sum", density=0.2, scale=1.0):
    """Global, as released: the whole model flattened into one vector per task (sorted keys)."""
    keys = sorted(base)
    theta0 = torch.cat([base[k].double().reshape(-1) for k in keys])
    thetas = torch.stack([torch.cat([m[k].double().reshape(-1) for k in keys]) for m in models])
    tau = thetas - theta0
    if multi_task == "sum":
        multi = tau.sum(0)
    else:
        size = tau.shape[1]
        kth = tau.abs().kthvalue(size - int(size * density), dim=1, keepdim=True).values
        trimmed = tau * (tau.abs() >= kth)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        multi = (trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)).sum(0)
    lam = torch.tensor(lambdas, dtype=torch.float64).unsqueeze(1)
    masks = (theta0 - thetas).abs() > lam * ((theta0 + multi) - thetas).abs()
    merged = theta0 + scale * multi * (masks.sum(0) >= min_agree)
    out, pos = {}, 0
    for k in keys:
        out[k] = merged[pos : pos + base[k].numel()].reshape(base[k].shape)
        pos += base[k].numel()
    return out


def uniforms(seed, name, model, count):
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(count, generator=g)


def _rescaled(x, mask):
    kept = x * mask
    before, after = x.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def breadcrumbs_sparsify(x, density, gamma, rescale):
    flat = x.reshape(-1)
    n = flat.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = sorted(range(n), key=lambda i: float(flat[i].abs()))
    mask = torch.zeros(n, dtype=x.dtype)
    mask[order[bottom : n - top]] = 1
    return _rescaled(x, mask.view_as(x)) if rescale else x * mask.view_as(x)


def della_sparsify(x, density, epsilon, rescale, seed, name, model):
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    length = rows.shape[1]
    probs = torch.empty_like(rows)
    for index in np.ndindex(rows.shape[0], *rows.shape[2:]):
        line = rows[(index[0], slice(None), *index[1:])]
        order = sorted(range(length), key=lambda i: float(line[i].abs()))
        rank = torch.empty(length, dtype=x.dtype)
        rank[order] = torch.arange(length, dtype=x.dtype)
        spread = rank / (length - 1) if length > 1 else torch.full_like(rank, 0.5)
        probs[(index[0], slice(None), *index[1:])] = density - epsilon + spread * 2 * epsilon
    mask = (uniforms(seed, name, model, x.numel()).double() < probs.reshape(-1)).to(x.dtype).view_as(x)
    return _rescaled(x, mask) if rescale else x * mask


def gta(base, models, sparsify, consensus, weights=None, normalize=False, scale=1.0):
    """mergekit's generalized task arithmetic over already-defined sparsifiers (sparsify(x, name, i))."""
    out = {}
    weights = weights or [1.0] * len(models)
    for key, d in deltas(base, models).items():
        sparse = [sparsify(x, key, i) for i, x in enumerate(d)]
        weighted = [w * x for w, x in zip(weights, sparse)]
        if consensus:
            majority = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
            masks = [(x.sign() == majority).double() for x in weighted]
            mixed = sum(x * m for x, m in zip(weighted, masks))
            divisor = sum(w * m for w, m in zip(weights, masks))
            divisor[divisor == 0] = 1
        else:
            mixed = sum(weighted)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        if normalize:
            mixed = mixed / divisor
        out[key] = base[key].double() + scale * mixed
    return out


def model_stock(base, models, filter_wise=False):
    out = {}
    for key, d in deltas(base, models).items():
        shape = d[0].shape
        rows = [x.reshape(-1, shape[-1]) if filter_wise and x.dim() else x.reshape(1, -1) for x in d]
        cosines = []
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                norms = rows[i].norm(dim=-1) * rows[j].norm(dim=-1)
                cosines.append(((rows[i] * rows[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = (sum(cosines) / len(cosines)).unsqueeze(-1)
        n = len(rows)
        t = n * cos / (1 + (n - 1) * cos)
        w0 = base[key].double().reshape(rows[0].shape)
        average = sum(w0 + r for r in rows) / n
        out[key] = (t * average + (1 - t) * w0).reshape(shape)
    return out


def slerp(base, other, t):
    """mergekit's slerp in numpy float32 (v0 = the base)."""
    out = {}
    for key in base:
        v0 = base[key].float().numpy()
        v1 = other[key].float().numpy()
        n0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > 1e-8 else v0
        n1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > 1e-8 else v1
        dot = np.sum(n0 * n1)
        if np.abs(dot) > 0.9995:
            res = (1 - t) * v0 + t * v1
        else:
            theta = np.arccos(dot)
            res = np.sin(theta - theta * t) / np.sin(theta) * v0 + np.sin(theta * t) / np.sin(theta) * v1
        out[key] = torch.from_numpy(np.asarray(res, dtype=np.float32)).double()
    return out


def relative_error(got, want, base) -> float:
    """max |got − want| / max |want − θ0| per tensor (the merged delta's scale), worst over tensors."""
    worst = 0.0
    for k, w in want.items():
        g = got[k].double()
        scale = float((w - base[k].double()).abs().max())
        worst = max(worst, float((g - w).abs().max()) / (scale if scale > 0 else 1.0))
    return worst if math.isfinite(worst) else math.inf


def knots_ties(deltas_by_task, density=0.2, alpha=1.0):
    """KnOTS-TIES as released (`SVDMerger`), for 2-D task updates {name: ΔW_t}: per layer, float64 SVD of
    [ΔW_1 | … | ΔW_T] keeping s > 1e-5; R_t = diag(s) Vh-block t; every layer's R_t flattened into one
    vector per task (sorted names); TIES top-k (kthvalue, >=), mass sign with the global majority where 0,
    α times the disjoint mean; ΔW = U R. Returns {name: ΔW} in float64."""
    names = sorted(deltas_by_task[0])
    t = len(deltas_by_task)
    bases, reps, shapes = {}, [[] for _ in range(t)], {}
    for name in names:
        cols = deltas_by_task[0][name].shape[1]
        u, s, vh = torch.linalg.svd(torch.cat([d[name].double() for d in deltas_by_task], 1), full_matrices=False)
        keep = s > 1e-5
        bases[name] = u[:, keep]
        blocks = torch.diag(s[keep]) @ vh[keep]
        shapes[name] = (int(keep.sum()), cols)
        for i in range(t):
            reps[i].append(blocks[:, i * cols : (i + 1) * cols].reshape(-1))
    stacked = torch.stack([torch.cat(r) for r in reps])
    size = stacked.shape[1]
    k = size - int(size * density)
    if k > 0:
        kth = stacked.abs().kthvalue(k, dim=1, keepdim=True).values
        stacked = stacked * (stacked.abs() >= kth)
    sign = torch.sign(stacked.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    kept = alpha * stacked * torch.where(sign > 0, stacked > 0, stacked < 0)
    merged = kept.sum(0) / (kept != 0).sum(0).clamp(min=1)
    out, pos = {}, 0
    for name in names:
        rows, cols = shapes[name]
        out[name] = bases[name] @ merged[pos : pos + rows * cols].reshape(rows, cols)
        pos += rows * cols
    return out
