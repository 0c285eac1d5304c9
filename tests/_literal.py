"""Literal transcriptions of method.md sections 3 and 4, written independently of
``famkd_losses.functional`` (plain loops and torch ops), used as the ground truth in tests.
Only the deterministic mask modes ("topk", "topk_nonsalient") can be transcribed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rank_hidden(values: list[float], ratio: float, largest: bool) -> list[int]:
    k = math.floor(ratio * len(values) + 0.5)
    order = sorted(range(len(values)), key=lambda j: ((-values[j] if largest else values[j]), j))
    return order[:k]


def feature_level_literal(mod, s_feat: torch.Tensor, t_feat: torch.Tensor) -> torch.Tensor:
    """method.md section 3 for one level, using the module's own layers."""
    t = t_feat.detach()
    if s_feat.shape[-2:] != t.shape[-2:]:
        s_feat = F.interpolate(s_feat, size=t.shape[-2:], mode="bilinear", align_corners=False)
    x = mod.align(s_feat)
    h, w = t.shape[-2:]
    largest = mod.mask_mode == "topk"
    assert mod.mask_mode in ("topk", "topk_nonsalient")
    loss = torch.zeros((), dtype=x.dtype)
    for i, s in enumerate(mod.scales):
        if min(h, w) < s:
            continue
        ts = t if s == 1 else F.max_pool2d(t, s, s, ceil_mode=True)
        xs = x if s == 1 else F.max_pool2d(x, s, s, ceil_mode=True)
        n, c, hs, ws = ts.shape
        sal_sp = ts.abs().mean(dim=1)  # (n, hs, ws)
        sal_ch = ts.abs().mean(dim=(2, 3))  # (n, c)
        a_sp = (hs * ws * torch.softmax(sal_sp.reshape(n, -1) / mod.tau, dim=1)).reshape(n, 1, hs, ws)
        a_ch = (c * torch.softmax(sal_ch / mod.tau, dim=1)).reshape(n, c, 1, 1)
        m_sp = torch.ones(n, 1, hs, ws, dtype=xs.dtype)
        m_ch = torch.ones(n, c, 1, 1, dtype=xs.dtype)
        for b in range(n):
            for j in _rank_hidden(sal_sp[b].flatten().tolist(), mod.ratio_sp, largest):
                m_sp[b, 0, j // ws, j % ws] = 0
            for j in _rank_hidden(sal_ch[b].tolist(), mod.ratio_ch, largest):
                m_ch[b, j, 0, 0] = 0
        gi = 0 if mod.share_generators else i
        recons = []
        for br in mod.branches:
            m = m_sp if br == "spatial" else m_ch
            recons.append(mod.generators[br][gi](xs * m))
        if len(recons) == 1:
            r = recons[0]
        else:
            wts = torch.softmax(mod.fusion_logits[i], dim=0)
            r = sum(wts[j] * recons[j] for j in range(len(recons)))
        e = (r - ts) ** 2
        if mod.weighting == "attention":
            e = e * a_sp * a_ch
        loss = loss + mod.scale_weights[i] * e.sum() / n
    return mod.alpha * loss


def _dense_view(z: torch.Tensor, num_classes):
    """(N, A*K, H, W) -> (N, A, K, H, W); (N, P, K) -> (N, 1, K, P, 1)."""
    if z.dim() == 3:
        return z.permute(0, 2, 1).unsqueeze(1).unsqueeze(-1)
    n, c, h, w = z.shape
    k = c if num_classes is None else num_classes
    return z.reshape(n, c // k, k, h, w)


def logits_literal(
    s_levels,
    t_levels,
    *,
    head="sigmoid",
    temperature=1.0,
    guidance="logit",
    region_scales=None,
    weights="soft",
    tau_w=0.1,
    ratio_l=0.5,
    beta=1.0,
    num_classes=None,
    s_feats=None,
    t_feats=None,
):
    """method.md section 4 over levels (dense or flattened logits)."""
    total = 0.0
    positions = 0
    n = s_levels[0].shape[0]
    for lvl, (zs_raw, zt_raw) in enumerate(zip(s_levels, t_levels)):
        zs = _dense_view(zs_raw, num_classes)
        zt = _dense_view(zt_raw.detach(), num_classes)
        tt = temperature
        if head == "sigmoid":
            p = torch.sigmoid(zt / tt)
            q = torch.sigmoid(zs / tt)
            kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(dim=(1, 2))
        else:
            p = torch.softmax(zt / tt, dim=2)
            q = torch.softmax(zs / tt, dim=2)
            kl = (p * (torch.log(p) - torch.log(q))).sum(dim=(1, 2))
        d = (p - q).detach().abs().mean(dim=(1, 2))  # (N, H, W) or (N, P, 1)
        if guidance == "feature":
            sf, tf = s_feats[lvl].detach(), t_feats[lvl].detach()
            d = ((tf - sf) ** 2).mean(dim=1)  # (N, Hf, Wf)
        if region_scales is not None:
            hh, ww = d.shape[-2:]
            used = [s for s in region_scales if s <= min(hh, ww)]
            if used:
                out = torch.zeros_like(d)
                for s in used:
                    for b in range(d.shape[0]):
                        for i in range(hh):
                            for j in range(ww):
                                i0, j0 = (i // s) * s, (j // s) * s
                                out[b, i, j] += d[b, i0 : i0 + s, j0 : j0 + s].max()
                d = out / len(used)
        d = d.reshape(n, -1)
        if zs_raw.dim() == 3 and d.shape[1] != zs_raw.shape[1]:
            d = d.repeat_interleave(zs_raw.shape[1] // d.shape[1], dim=1)
        kl = kl.reshape(n, -1)
        pcount = d.shape[1]
        if weights == "soft":
            wmap = pcount * torch.softmax(d / tau_w, dim=1)
        else:
            wmap = torch.zeros_like(d)
            for b in range(n):
                for j in _rank_hidden(d[b].tolist(), ratio_l, True):
                    wmap[b, j] = 1.0
        total = total + (wmap * kl).sum()
        positions += pcount
    return beta * temperature**2 * total / (n * positions)
