"""The negative dictionary: FIFO order, keying, capacity, lookup, initialisation, against a loop reference."""

from collections import deque

import numpy as np
import pytest
import torch

from debias.negatives import NegativeDictionary


class ReferenceDictionary:
    """Per-key deques: the behaviour the vectorised buffer must reproduce (as sets per key)."""

    def __init__(self, num_keys, size):
        self.q = [deque(maxlen=size) for _ in range(num_keys)]

    def push(self, feats, keys):
        for f, k in zip(feats, keys):
            self.q[int(k)].append(tuple(np.round(f, 6)))


def contents(d: NegativeDictionary, key: int) -> set:
    feats, valid = d.lookup(torch.tensor([key]))
    return {tuple(np.round(f, 6)) for f, v in zip(feats[0].numpy(), valid[0].numpy()) if v}


def test_fifo_keeps_the_newest_per_key():
    d = NegativeDictionary(num_keys=3, size=4, dim=2)
    feats = torch.arange(12, dtype=torch.float32).repeat_interleave(2).view(12, 2)  # rows (i, i)
    d.push(feats[:3], torch.tensor([0, 0, 0]))
    assert contents(d, 0) == {(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)}
    assert int(d.count[0]) == 3 and int(d.count[1]) == 0
    d.push(feats[3:6], torch.tensor([0, 0, 0]))  # 6 pushed into 4 slots: 2, 3, 4, 5 remain
    assert contents(d, 0) == {(float(i), float(i)) for i in (2, 3, 4, 5)}
    # one push larger than the buffer keeps only its last `size` items
    d.push(feats[:10], torch.zeros(10, dtype=torch.long))
    assert contents(d, 0) == {(float(i), float(i)) for i in (6, 7, 8, 9)}
    assert contents(d, 1) == set() and contents(d, 2) == set()


def test_keys_are_independent_and_lookup_follows_keys():
    d = NegativeDictionary(num_keys=3, size=2, dim=1)
    d.push(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([2, 0, 2, 2]))
    assert contents(d, 0) == {(2.0,)}
    assert contents(d, 2) == {(3.0,), (4.0,)}
    feats, valid = d.lookup(torch.tensor([2, 0, 1]))
    assert feats.shape == (3, 2, 1) and valid.tolist() == [[True, True], [True, False], [False, False]]


def test_matches_reference_over_random_pushes():
    rng = np.random.default_rng(0)
    d, ref = NegativeDictionary(5, 7, 3), ReferenceDictionary(5, 7)
    for _ in range(40):
        n = int(rng.integers(0, 20))
        feats = rng.normal(size=(n, 3)).astype(np.float32)
        keys = rng.integers(0, 5, size=n)
        d.push(torch.tensor(feats), torch.tensor(keys))
        ref.push(feats, keys)
        for k in range(5):
            assert contents(d, k) == set(ref.q[k]), f"key {k} differs"
            assert int(d.count[k]) == len(ref.q[k])


def test_fill_empty_from_other_classes():
    d = NegativeDictionary(num_keys=3, size=4, dim=1)
    d.push(torch.tensor([[9.0]]), torch.tensor([1]))  # key 1 is not empty: left alone
    feats = torch.tensor([[0.0], [1.0], [2.0]])
    labels = torch.tensor([0, 1, 2])
    d.fill_empty_from(feats, labels)
    assert contents(d, 0) == {(1.0,), (2.0,)}  # only anchors whose label is not 0
    assert contents(d, 1) == {(9.0,)}
    assert contents(d, 2) == {(0.0,), (1.0,)}
    assert int(d.count[0]) == 2


def test_state_dict_round_trip_restores_contents():
    d = NegativeDictionary(2, 3, 2)
    d.push(torch.randn(5, 2), torch.tensor([0, 1, 0, 0, 1]))
    e = NegativeDictionary(2, 3, 2)
    e.load_state_dict(d.state_dict())
    assert torch.equal(e.queue, d.queue) and torch.equal(e.ptr, d.ptr) and torch.equal(e.count, d.count)


def test_bad_input():
    d = NegativeDictionary(2, 3, 2)
    with pytest.raises(ValueError, match="keys must lie"):
        d.push(torch.randn(1, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match="expected features"):
        d.push(torch.randn(1, 3), torch.tensor([0]))
