"""Per-item seeds.

Every random choice the pipeline makes about an item is drawn from a generator seeded by the run
seed and the item's id, never from a shared stream. The output for an item therefore does not depend
on the order items are processed in, the batch they fall in, or the number of processes.
"""

from __future__ import annotations

import hashlib

import numpy as np


def item_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from a run seed and a string key (an item id, optionally with a role)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def item_rng(seed: int, key: str) -> np.random.Generator:
    """A numpy generator private to ``key`` under run seed ``seed``."""
    return np.random.default_rng(item_seed(seed, key))
