"""CLAD's negative-sample dictionary: one FIFO ring buffer of detached features per background class.

After every step each positive's feature is pushed under the key of the class its background came
from; an anchor of class y takes its negatives from key y, i.e. objects of other classes sitting on
backgrounds typical of y. Keys start empty and are filled, the first time, from the batch's anchors
of other classes (as CLAD's code does), so every anchor has negatives from its first step.

Push and lookup are vectorised (no Python loop over samples). The buffers are registered as
persistent so that a training checkpoint restores the dictionary's contents exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class NegativeDictionary(nn.Module):
    """Per-key ring buffers. # queue: (num_keys, size, dim)

    Args:
        num_keys: number of background classes (keys 0..num_keys-1).
        size: capacity of each buffer (CLAD: 32), also the number of negatives per anchor.
        dim: feature dimension.
    """

    def __init__(self, num_keys: int, size: int, dim: int):
        super().__init__()
        if num_keys < 1 or size < 1 or dim < 1:
            raise ValueError(f"num_keys, size and dim must be >= 1; got {num_keys}, {size}, {dim}")
        self.num_keys, self.size, self.dim = num_keys, size, dim
        self.register_buffer("queue", torch.zeros(num_keys, size, dim))
        self.register_buffer("ptr", torch.zeros(num_keys, dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros(num_keys, dtype=torch.long))  # filled slots

    def _check(self, features: torch.Tensor, keys: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim or keys.shape != features.shape[:1]:
            raise ValueError(
                f"expected features (N, {self.dim}) and keys (N,); got {tuple(features.shape)} and {tuple(keys.shape)}"
            )
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.num_keys):
            raise ValueError(
                f"keys must lie in [0, {self.num_keys}); got {keys.min().item()}..{keys.max().item()}"
            )

    @torch.no_grad()
    def push(self, features: torch.Tensor, keys: torch.Tensor) -> None:
        """Append ``features`` (N, D) under ``keys`` (N,), oldest entries overwritten first.

        Within one push, items of the same key enter in their batch order; when a key receives
        more than ``size`` items only its last ``size`` are kept.
        """
        self._check(features, keys)
        keys = keys.long().to(self.queue.device)
        features = features.detach().to(self.queue.dtype).to(self.queue.device)
        n = keys.numel()
        if n == 0:
            return
        order = torch.sort(keys, stable=True).indices
        sorted_keys = keys[order]
        per_key = torch.bincount(keys, minlength=self.num_keys)  # (num_keys,)
        first = torch.cumsum(per_key, 0) - per_key  # start of each key's run in sorted order
        rank = torch.arange(n, device=keys.device) - first[sorted_keys]  # position within its key
        keep = rank >= per_key[sorted_keys] - self.size  # the last `size` of each key
        slot = (self.ptr[sorted_keys] + rank) % self.size
        self.queue[sorted_keys[keep], slot[keep]] = features[order[keep]]
        self.ptr.copy_((self.ptr + per_key) % self.size)
        self.count.copy_(torch.clamp(self.count + per_key, max=self.size))

    @torch.no_grad()
    def fill_empty_from(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fill every still-empty key y with features whose label is not y (cycled to ``size``)."""
        self._check(features, labels)
        labels = labels.to(self.queue.device)
        features = features.detach().to(self.queue.dtype).to(self.queue.device)
        for key in torch.nonzero(self.count == 0).flatten().tolist():  # a loop over keys, not samples
            others = features[labels != key]
            if others.shape[0] == 0:
                continue
            idx = torch.arange(self.size, device=others.device) % others.shape[0]
            self.queue[key] = others[idx]
            self.count[key] = min(self.size, others.shape[0])
            self.ptr[key] = self.count[key] % self.size

    def lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Negatives for anchors keyed ``keys`` (B,): features (B, size, D) and a (B, size) validity mask."""
        keys = keys.long().to(self.queue.device)
        feats = self.queue[keys]
        valid = torch.arange(self.size, device=keys.device)[None, :] < self.count[keys][:, None]
        return feats, valid
