"""Contrastive losses.

CLAD's InfoNCE, with s = cosine similarity and temperature tau::

    L_con = -log( e^{s(x,x+)/tau} / ( e^{s(x,x+)/tau} + sum_i e^{s(x,x-_i)/tau} ) )

averaged over the batch. Negatives may be ragged (an unfilled dictionary slot, an anchor with fewer
stored negatives): ``neg_mask`` marks which of the K slots are real.
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
