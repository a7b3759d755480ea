"""CLAD's InfoNCE against a plain loop-based numpy reference, and a constructed exact value."""

import math

import numpy as np
import pytest
import torch

from debias.losses import CLADInfoNCE, clad_infonce


def reference_infonce(z, z_pos, z_neg, tau, mask=None, weight=None):
    """-log(e^{s+/tau} / (e^{s+/tau} + sum_k e^{s_k/tau})), s = cosine similarity, loops only."""
    b, k = z_neg.shape[:2]
    losses = []
    for i in range(b):

        def cos(a, c):
            return float(np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c)))

        pos = math.exp(cos(z[i], z_pos[i]) / tau)
        denom = pos
        for j in range(k):
            if mask is None or mask[i, j]:
                denom += math.exp(cos(z[i], z_neg[i, j]) / tau)
        losses.append(-math.log(pos / denom))
    if weight is None:
        return sum(losses) / b
    return sum(w * loss for w, loss in zip(weight, losses)) / sum(weight)


@pytest.mark.parametrize("b,k,d", [(1, 1, 2), (4, 3, 8), (8, 32, 16), (5, 34, 7)])
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_matches_reference(b, k, d, tau):
    rng = np.random.default_rng(b * 100 + k + d)
    z, zp, zn = rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k, d))
    got = clad_infonce(torch.tensor(z), torch.tensor(zp), torch.tensor(zn), tau).item()
    assert got == pytest.approx(reference_infonce(z, zp, zn, tau), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_mask_and_weight_match_reference(tau):
    rng = np.random.default_rng(7)
    b, k, d = 6, 5, 4
    z, zp, zn = rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k, d))
    mask = rng.random((b, k)) < 0.6
    mask[0] = False  # an anchor with no negatives at all: loss 0 for it
    weight = np.array([1, 0, 1, 1, 0.5, 1.0])
    got = clad_infonce(
        torch.tensor(z), torch.tensor(zp), torch.tensor(zn), tau, torch.tensor(mask), torch.tensor(weight)
    ).item()
    assert got == pytest.approx(reference_infonce(z, zp, zn, tau, mask, weight), rel=1e-5)


def test_masked_slot_equals_dropping_it():
    torch.manual_seed(0)
    z, zp, zn = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 4, 8)
    mask = torch.tensor([[True, True, False, True]] * 3)
    full = clad_infonce(z, zp, zn, 0.2, mask)
    dropped = clad_infonce(z, zp, zn[:, [0, 1, 3]], 0.2)
    assert torch.allclose(full, dropped)


def test_constructed_exact_value():
    # anchor == positive (cos 1); K negatives orthogonal (cos 0): loss = log(1 + K e^{-1/tau})
    tau, k = 0.2, 5
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    zp = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # scale must not matter
    zn = torch.eye(6, dtype=torch.float64)[1 : 1 + k].unsqueeze(0) * 2.0
    expected = math.log(1 + k * math.exp(-1 / tau))
    assert clad_infonce(z, zp, zn, tau).item() == pytest.approx(expected, rel=1e-6)
    # one negative identical to the anchor (cos 1), one orthogonal (cos 0)
    zn2 = torch.stack([z[0], torch.eye(6, dtype=torch.float64)[1]]).unsqueeze(0)
    expected2 = -math.log(math.exp(1 / tau) / (2 * math.exp(1 / tau) + 1))
    assert clad_infonce(z, zp, zn2, tau).item() == pytest.approx(expected2, rel=1e-6)


def test_gradient_reaches_anchor_and_positive():
    torch.manual_seed(1)
    z, zp = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    zn = torch.randn(4, 3, 6)
    CLADInfoNCE(0.2)(z, zp, zn).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert zp.grad is not None and zp.grad.abs().sum() > 0


def test_bad_arguments():
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        clad_infonce(z, z, torch.randn(2, 3, 4), 0.0)
    with pytest.raises(ValueError, match="z_neg"):
        clad_infonce(z, z, torch.randn(2, 4), 0.2)
    with pytest.raises(ValueError, match="neg_mask"):
        clad_infonce(z, z, torch.randn(2, 3, 4), 0.2, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        CLADInfoNCE(-1.0)
