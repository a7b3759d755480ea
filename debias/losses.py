"""Contrastive losses.

CLAD's InfoNCE, with s = cosine similarity and temperature tau::

    L_con = -log( e^{s(x,x+)/tau} / ( e^{s(x,x+)/tau} + sum_i e^{s(x,x-_i)/tau} ) )

averaged over the batch. Negatives may be ragged (an unfilled dictionary slot, an anchor with fewer
stored negatives): ``neg_mask`` marks which of the K slots are real.

The rest of the loss family (see :func:`supcon`, :func:`eps_supinfonce`, :func:`fairkl`) takes the same
kind of inputs, so that each works with the negative dictionary: anchors ``z`` (B, D); candidate
features either per anchor (B, M, D), as :func:`clad_infonce`'s negatives, or shared by the whole batch
(M, D); boolean masks (B, M) saying which candidates are positives / negatives of which anchor; an
optional per-anchor ``weight`` (B,). Every feature is L2-normalised inside (cosine similarities), and
half precision is computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def clad_infonce(
    z: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    temperature: float = 0.2,
    neg_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLAD's InfoNCE loss, the batch mean.

    Args:
        z: anchors (B, D); z_pos: positives (B, D); z_neg: negatives (B, K, D). Not normalised:
            the loss uses cosine similarity.
        temperature: tau > 0.
        neg_mask: optional (B, K) boolean, True for real negatives; masked slots do not count.
        weight: optional (B,) weights (0 drops an anchor, e.g. one without a positive); the mean is
            taken over the weights' sum.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z.dim() != 2 or z_pos.shape != z.shape:
        raise ValueError(f"z and z_pos must both be (B, D); got {tuple(z.shape)} and {tuple(z_pos.shape)}")
    if z_neg.dim() != 3 or z_neg.shape[0] != z.shape[0] or z_neg.shape[2] != z.shape[1]:
        raise ValueError(
            f"z_neg must be (B, K, D) = ({z.shape[0]}, K, {z.shape[1]}); got {tuple(z_neg.shape)}"
        )
    dtype = torch.promote_types(z.dtype, torch.float32)  # half precision is computed in float32
    z = F.normalize(z.to(dtype), dim=-1)
    pos = (z * F.normalize(z_pos.to(dtype), dim=-1)).sum(-1, keepdim=True) / temperature  # (B, 1)
    neg = torch.einsum("bd,bkd->bk", z, F.normalize(z_neg.to(dtype), dim=-1)) / temperature  # (B, K)
    if neg_mask is not None:
        if neg_mask.shape != neg.shape:
            raise ValueError(f"neg_mask must be (B, K) = {tuple(neg.shape)}; got {tuple(neg_mask.shape)}")
        neg = neg.masked_fill(~neg_mask.bool(), float("-inf"))
    losses = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos.squeeze(1)  # (B,)
    if weight is None:
        return losses.mean()
    weight = weight.to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp_min(1e-12)


class CLADInfoNCE(nn.Module):
    """``nn.Module`` form of :func:`clad_infonce`. # z: (B, D), z_pos: (B, D), z_neg: (B, K, D)"""

    def __init__(self, temperature: float = 0.2):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z, z_pos, z_neg, neg_mask=None, weight=None) -> torch.Tensor:
        return clad_infonce(z, z_pos, z_neg, self.temperature, neg_mask=neg_mask, weight=weight)


# ----------------------------------------------------------------------------------------------
# The rest of the loss family: SupCon, epsilon-SupInfoNCE, FairKL
# ----------------------------------------------------------------------------------------------


def _unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.to(dtype), dim=-1)


def _similarities(z: torch.Tensor, candidates: torch.Tensor, what: str) -> torch.Tensor:
    """Cosine similarities (B, M) of unit anchors (B, D) with unit candidates (M, D) or (B, M, D)."""
    b, d = z.shape
    if candidates.dim() == 2 and candidates.shape[1] == d:
        return z @ candidates.T
    if candidates.dim() == 3 and candidates.shape[0] == b and candidates.shape[2] == d:
        return torch.einsum("bd,bmd->bm", z, candidates)
    raise ValueError(f"{what} must be (M, {d}) or ({b}, M, {d}); got {tuple(candidates.shape)}")


def _mask(mask: torch.Tensor | None, shape: torch.Size, what: str, default: bool = True) -> torch.Tensor:
    if mask is None:
        return torch.full(tuple(shape), default, dtype=torch.bool)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} must be (B, M) = {tuple(shape)}; got {tuple(mask.shape)}")
    return mask.bool()


def _check_anchors(z: torch.Tensor, temperature: float | None = None) -> torch.dtype:
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z.dim() != 2:
        raise ValueError(f"z must be (B, D); got {tuple(z.shape)}")
    return torch.promote_types(z.dtype, torch.float32)  # half precision is computed in float32


def _masked_logsumexp(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum_{mask} e^s (B,); -inf for a row with no True entry, with clean (zero) gradients."""
    any_ = mask.any(dim=1)
    filled = s.masked_fill(~mask, float("-inf"))
    filled = torch.where(any_[:, None], filled, torch.zeros_like(s))  # no all -inf row reaches logsumexp
    lse = torch.logsumexp(filled, dim=1) if s.shape[1] else torch.zeros(s.shape[0], dtype=s.dtype)
    return torch.where(any_, lse, torch.full_like(lse, float("-inf")))


def _weighted_mean(losses: torch.Tensor, counted: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i over the anchors that count (0, still in the graph, when none does)."""
    w = counted.to(losses.dtype)
    if weight is not None:
        if weight.shape != losses.shape:
            raise ValueError(f"weight must be (B,) = {tuple(losses.shape)}; got {tuple(weight.shape)}")
        w = w * weight.to(device=losses.device, dtype=losses.dtype)
    losses = torch.where(counted, losses, torch.zeros_like(losses))
    return (losses * w).sum() / w.sum().clamp_min(1e-12)


def supcon(
    z: torch.Tensor,
    candidates: torch.Tensor,
    pos_mask: torch.Tensor,
    temperature: float = 0.2,
    neg_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) with an explicit positive mask, the batch mean.

    The "L_out" variant (the mean over positives sits outside the log), with s = cos(z_i, c)/tau::

        l_i = -1/|P(i)| sum_{p in P(i)} log( e^{s_ip} / sum_{a in P(i) u N(i)} e^{s_ia} )
            = logsumexp_{a in P(i) u N(i)} s_ia - mean_{p in P(i)} s_ip
        L   = sum_i w_i l_i / sum_{i : |P(i)| > 0} w_i

    P(i) = ``pos_mask[i]``, N(i) = ``neg_mask[i]`` minus P(i) (a candidate marked as both counts as a
    positive); without ``neg_mask`` every candidate that is not a positive is a negative. An anchor with
    no positive has no term: it contributes 0 and is left out of the mean (its weight is not counted);
    when no anchor has a positive the loss is 0. With exactly one positive per anchor this is
    :func:`clad_infonce` (L_out and L_in coincide there too). Khosla's extra factor tau/base_tau is 1.
    Candidates that are the anchor itself must be masked out by the caller (both masks False).

    Args:
        z: anchors (B, D). candidates: (M, D) shared by all anchors, or (B, M, D) per anchor.
        pos_mask: (B, M) boolean. neg_mask: optional (B, M) boolean. weight: optional (B,).
    """
    dtype = _check_anchors(z, temperature)
    z = _unit(z, dtype)
    s = _similarities(z, _unit(candidates, dtype), "candidates") / temperature  # (B, M)
    pos = _mask(pos_mask, s.shape, "pos_mask").to(s.device)
    neg = _mask(neg_mask, s.shape, "neg_mask").to(s.device) & ~pos if neg_mask is not None else ~pos
    n_pos = pos.sum(dim=1)
    mean_pos = (s * pos).sum(dim=1) / n_pos.clamp_min(1)
    losses = _masked_logsumexp(s, pos | neg) - mean_pos
    return _weighted_mean(losses, n_pos > 0, weight)


def eps_supinfonce(
    z: torch.Tensor,
    zp: torch.Tensor,
    z_neg: torch.Tensor,
    temperature: float = 0.2,
    eps: float = 0.0,
    neg_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """epsilon-SupInfoNCE (Barbano et al., ICLR 2023), the batch mean.

    With s = cos(z, z')/tau, each positive p of anchor i is contrasted with i's negatives only (the
    other positives are not in its denominator), with a margin eps between positives and negatives::

        l_ip = -log( e^{s_ip} / ( e^{s_ip - eps} + sum_{n in N(i)} e^{s_in} ) )
        l_i  = mean_{p in P(i)} l_ip        (reduction="mean"; "sum": sum_{p in P(i)} l_ip, the paper's sum)
        L    = sum_i w_i l_i / sum_{i : |P(i)| > 0} w_i

    eps = 0 gives SupInfoNCE, and with one positive per anchor exactly :func:`clad_infonce`. Since
    e^{s_ip - eps} <= the denominator, l_ip >= -eps (the loss can be negative when eps > 0). The paper
    writes the sum over positives; its published code (and SupCon's L_out) averages, which keeps the
    loss on the same scale as InfoNCE whatever the number of positives, hence the default "mean".
    Anchors with no positive contribute 0 and are left out of the mean; an anchor with no negative has
    l_ip = -eps.

    Args:
        z: anchors (B, D).
        zp: positives: (B, D), one per anchor (``pos_mask`` None); (B, P, D) per anchor, with an
            optional (B, P) ``pos_mask``; or (P, D) shared by all anchors, with a (B, P) ``pos_mask``.
        z_neg: negatives: (B, K, D) per anchor, or (M, D) shared by all anchors.
        neg_mask: optional (B, K) / (B, M) boolean, True for real negatives (default: all).
        weight: optional (B,) per-anchor weights.
    """
    dtype = _check_anchors(z, temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    z = _unit(z, dtype)
    zp_u = _unit(zp, dtype)
    if zp.dim() == 2 and pos_mask is None:
        if zp.shape != z.shape:
            raise ValueError(
                f"one positive per anchor: zp must be (B, D) = {tuple(z.shape)}; got {tuple(zp.shape)}"
            )
        sp = (z * zp_u).sum(dim=-1, keepdim=True) / temperature  # (B, 1)
    else:
        sp = _similarities(z, zp_u, "zp") / temperature  # (B, P)
    pos = _mask(pos_mask, sp.shape, "pos_mask").to(sp.device)
    sn = _similarities(z, _unit(z_neg, dtype), "z_neg") / temperature  # (B, K)
    neg = _mask(neg_mask, sn.shape, "neg_mask").to(sn.device)
    lse_neg = _masked_logsumexp(sn, neg)  # (B,), -inf without negatives
    per_pos = torch.logaddexp(sp - eps, lse_neg[:, None].expand_as(sp)) - sp  # (B, P)
    per_pos = torch.where(pos, per_pos, torch.zeros_like(per_pos))
    n_pos = pos.sum(dim=1)
    losses = per_pos.sum(dim=1)
    if reduction == "mean":
        losses = losses / n_pos.clamp_min(1)
    return _weighted_mean(losses, n_pos > 0, weight)


def _gaussian_sym_kl(mu_a, var_a, mu_c, var_c) -> torch.Tensor:
    """1/2 (KL(N_a || N_c) + KL(N_c || N_a)) of two univariate Gaussians."""
    d2 = (mu_a - mu_c) ** 2
    return 0.25 * (var_a / var_c + var_c / var_a - 2.0 + d2 * (1.0 / var_a + 1.0 / var_c))


def _pair_moments(s: torch.Tensor, pairs: torch.Tensor, w: torch.Tensor, bandwidth: float):
    """Weighted count, mean and (population) variance + bandwidth^2 of s over the marked pairs."""
    ww = pairs.to(s.dtype) * w[:, None]
    n = ww.sum()
    mu = (ww * s).sum() / n.clamp_min(1e-12)
    var = (ww * (s - mu) ** 2).sum() / n.clamp_min(1e-12) + bandwidth**2
    return n, mu, var


def fairkl(
    z: torch.Tensor,
    candidates: torch.Tensor,
    same_bg_mask: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bandwidth: float = 0.5,
) -> torch.Tensor:
    """FairKL (Barbano et al., ICLR 2023) as a regulariser: bias-aligned and bias-conflicting pairs alike.

    Here the bias is the background: a pair (anchor i, candidate m) is aligned when both carry the same
    background (``same_bg_mask[i, m]``), conflicting otherwise. Over all pairs of the batch, the cosine
    similarities s of each of the four groups (positive / negative x aligned / conflicting) are modelled
    as a Gaussian N(mu, var), with the (weighted) mean and population variance of the group, plus h^2,
    h = ``bandwidth`` (the variance of a Gaussian kernel density estimate with bandwidth h: it keeps a
    group of one pair, or of identical similarities, from having zero variance). The regulariser is the
    symmetric (Jeffreys / 2) KL divergence between the aligned and the conflicting Gaussian, separately
    for positives and negatives::

        J(a, c) = 1/2 (KL(N_a || N_c) + KL(N_c || N_a))
                = 1/4 ( var_a/var_c + var_c/var_a - 2 + (mu_a - mu_c)^2 (1/var_a + 1/var_c) )
        R       = J(pos aligned, pos conflicting) + J(neg aligned, neg conflicting)

    A term whose aligned or conflicting group is empty is 0. Symmetric because neither group is the
    reference distribution; J >= 0, = 0 iff the two Gaussians are equal. The KL is invariant under a
    common rescaling of the similarities, so a temperature would change nothing (only h's scale): h is on
    the cosine scale. The published code's moment-matching variant (squared differences of means and
    standard deviations, plus -mu_pos_conflicting + mu_neg_aligned) is not used.

    Args:
        z: anchors (B, D). candidates: (M, D) shared, or (B, M, D) per anchor.
        same_bg_mask: (B, M) boolean, True when anchor i and candidate m share a background.
        pos_mask: (B, M) boolean positive pairs. neg_mask: optional (B, M) boolean negative pairs
            (default: every candidate that is not a positive); a pair marked as both is a positive.
        weight: optional (B,) per-anchor weights on that anchor's pairs (0 leaves its pairs out).
        bandwidth: h > 0, on the cosine-similarity scale.
    """
    dtype = _check_anchors(z)
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    z = _unit(z, dtype)
    s = _similarities(z, _unit(candidates, dtype), "candidates")  # (B, M) cosine
    pos = _mask(pos_mask, s.shape, "pos_mask").to(s.device)
    neg = _mask(neg_mask, s.shape, "neg_mask").to(s.device) & ~pos if neg_mask is not None else ~pos
    aligned = _mask(same_bg_mask, s.shape, "same_bg_mask").to(s.device)
    if weight is None:
        w = torch.ones(s.shape[0], dtype=s.dtype, device=s.device)
    else:
        if weight.shape != s.shape[:1]:
            raise ValueError(f"weight must be (B,) = {tuple(s.shape[:1])}; got {tuple(weight.shape)}")
        w = weight.to(device=s.device, dtype=s.dtype)
    total = s.new_zeros(())
    for group in (pos, neg):
        n_a, mu_a, var_a = _pair_moments(s, group & aligned, w, bandwidth)
        n_c, mu_c, var_c = _pair_moments(s, group & ~aligned, w, bandwidth)
        term = _gaussian_sym_kl(mu_a, var_a, mu_c, var_c)
        total = total + torch.where((n_a > 0) & (n_c > 0), term, torch.zeros_like(term))
    return total
