"""The contrastive losses against plain loop-based numpy references, and constructed exact values:
CLAD's InfoNCE, SupCon, epsilon-SupInfoNCE and FairKL."""

import math

import numpy as np
import pytest
import torch

from debias.losses import CLADInfoNCE, clad_infonce, eps_supinfonce, fairkl, supcon


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


# ----------------------------------------------------------------------------------------------
# SupCon, epsilon-SupInfoNCE, FairKL: loop references over numpy arrays
# ----------------------------------------------------------------------------------------------


def _cos(a, c):
    return float(np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c)))


def _cand(cands, i, m):
    """Candidate m of anchor i: shared (M, D) or per anchor (B, M, D)."""
    return cands[m] if cands.ndim == 2 else cands[i, m]


def _batch_mean(losses, weight):
    """Weighted mean over the anchors that have a loss (None: no positive, left out)."""
    num = den = 0.0
    for i, loss in enumerate(losses):
        if loss is None:
            continue
        w = 1.0 if weight is None else float(weight[i])
        num += w * loss
        den += w
    return num / den if den > 0 else 0.0


def reference_supcon(z, cands, pos, tau, neg=None, weight=None):
    """L_out: -1/|P| sum_p log(e^{s_p} / sum_{a in P u N} e^{s_a}); negatives default to the non-positives."""
    b, m = pos.shape
    losses = []
    for i in range(b):
        p_idx = [j for j in range(m) if pos[i, j]]
        n_idx = [j for j in range(m) if not pos[i, j] and (neg is None or neg[i, j])]
        if not p_idx:
            losses.append(None)
            continue
        denom = sum(math.exp(_cos(z[i], _cand(cands, i, j)) / tau) for j in p_idx + n_idx)
        terms = [-math.log(math.exp(_cos(z[i], _cand(cands, i, j)) / tau) / denom) for j in p_idx]
        losses.append(sum(terms) / len(terms))
    return _batch_mean(losses, weight)


def reference_eps(z, zp, zn, tau, eps, pos=None, neg=None, weight=None, reduction="mean"):
    """Per positive: -log(e^{s+} / (e^{s+ - eps} + sum_n e^{s_n})); zp (B, P, D), zn (B, K, D)."""
    b, p_count, k = zp.shape[0], zp.shape[1], zn.shape[1]
    losses = []
    for i in range(b):
        negs = sum(math.exp(_cos(z[i], zn[i, j]) / tau) for j in range(k) if neg is None or neg[i, j])
        terms = []
        for p in range(p_count):
            if pos is not None and not pos[i, p]:
                continue
            sp = _cos(z[i], zp[i, p]) / tau
            terms.append(-math.log(math.exp(sp) / (math.exp(sp - eps) + negs)))
        if not terms:
            losses.append(None)
        else:
            losses.append(sum(terms) / (len(terms) if reduction == "mean" else 1))
    return _batch_mean(losses, weight)


def _kl(mu1, var1, mu2, var2):
    """KL(N(mu1, var1) || N(mu2, var2)), written in its textbook form."""
    return math.log(math.sqrt(var2) / math.sqrt(var1)) + (var1 + (mu1 - mu2) ** 2) / (2 * var2) - 0.5


def reference_fairkl(z, cands, same_bg, pos, neg=None, weight=None, h=0.05):
    b, m = pos.shape
    groups = {key: [] for key in ("pa", "pc", "na", "nc")}
    for i in range(b):
        w = 1.0 if weight is None else float(weight[i])
        for j in range(m):
            is_neg = not pos[i, j] and (neg is None or neg[i, j])
            if not (pos[i, j] or is_neg):
                continue
            key = ("p" if pos[i, j] else "n") + ("a" if same_bg[i, j] else "c")
            groups[key].append((_cos(z[i], _cand(cands, i, j)), w))

    def moments(items):
        tot = sum(w for _, w in items)
        if tot == 0:
            return None
        mu = sum(w * s for s, w in items) / tot
        return mu, sum(w * (s - mu) ** 2 for s, w in items) / tot + h * h

    total = 0.0
    for a_key, c_key in (("pa", "pc"), ("na", "nc")):
        a, c = moments(groups[a_key]), moments(groups[c_key])
        if a is None or c is None:
            continue
        total += 0.5 * (_kl(*a, *c) + _kl(*c, *a))
    return total


def _masks(rng, b, m, p_pos=0.3, p_neg=0.5):
    """Random positive/negative masks; anchor 0 has no positive, anchor 1 (when present) no negative."""
    pos = rng.random((b, m)) < p_pos
    neg = rng.random((b, m)) < p_neg
    pos[0] = False
    if b > 1:
        neg[1] = False
        pos[1, 0] = True
    return pos, neg


def _t(*arrays):
    return [torch.tensor(a) for a in arrays]


SHAPES = [(1, 2, 3), (4, 6, 8), (7, 12, 5), (16, 40, 16)]  # (B, M, D)


@pytest.mark.parametrize("b,m,d", SHAPES)
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
@pytest.mark.parametrize("shared", [True, False])
def test_supcon_matches_reference(b, m, d, tau, shared):
    rng = np.random.default_rng(b * 1000 + m * 10 + d)
    z = rng.normal(size=(b, d))
    cands = rng.normal(size=(m, d) if shared else (b, m, d))
    pos, neg = _masks(rng, b, m)
    weight = rng.uniform(0.2, 2.0, size=b)
    tz, tc, tp, tn, tw = _t(z, cands, pos, neg, weight)
    assert supcon(tz, tc, tp, tau, tn).item() == pytest.approx(
        reference_supcon(z, cands, pos, tau, neg), rel=1e-6, abs=1e-9
    )
    assert supcon(tz, tc, tp, tau, tn, tw).item() == pytest.approx(
        reference_supcon(z, cands, pos, tau, neg, weight), rel=1e-6, abs=1e-9
    )
    # without neg_mask every non-positive candidate is a negative
    assert supcon(tz, tc, tp, tau).item() == pytest.approx(
        reference_supcon(z, cands, pos, tau), rel=1e-6, abs=1e-9
    )


@pytest.mark.parametrize("b,k,d", [(1, 1, 2), (4, 3, 8), (8, 20, 16)])
@pytest.mark.parametrize("p_count", [1, 3])
@pytest.mark.parametrize("tau,eps", [(0.07, 0.0), (0.2, 0.1), (1.0, 0.5)])
def test_eps_supinfonce_matches_reference(b, k, d, p_count, tau, eps):
    rng = np.random.default_rng(b * 100 + k * 10 + d + p_count)
    z, zp, zn = rng.normal(size=(b, d)), rng.normal(size=(b, p_count, d)), rng.normal(size=(b, k, d))
    pos = rng.random((b, p_count)) < 0.7
    neg = rng.random((b, k)) < 0.6
    pos[0] = False  # no positive: left out of the mean
    if b > 1:
        pos[1, 0], neg[1] = True, False  # no negative: l = -eps
    weight = rng.uniform(0.2, 2.0, size=b)
    tz, tp, tn, tpm, tnm, tw = _t(z, zp, zn, pos, neg, weight)
    for reduction in ("mean", "sum"):
        got = eps_supinfonce(tz, tp, tn, tau, eps, tnm, tw, pos_mask=tpm, reduction=reduction).item()
        want = reference_eps(z, zp, zn, tau, eps, pos, neg, weight, reduction)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    # one positive per anchor given as (B, D), no masks
    got = eps_supinfonce(tz, tp[:, 0], tn, tau, eps).item()
    assert got == pytest.approx(reference_eps(z, zp[:, :1], zn, tau, eps), rel=1e-6, abs=1e-9)
    # shared candidates: positives (P', D) and negatives (M, D) common to the batch, selected by masks
    flat_p, flat_n = zp.reshape(b * p_count, d), zn.reshape(b * k, d)
    pm_shared = np.zeros((b, b * p_count), dtype=bool)
    nm_shared = np.zeros((b, b * k), dtype=bool)
    for i in range(b):
        pm_shared[i, i * p_count : (i + 1) * p_count] = pos[i]
        nm_shared[i, i * k : (i + 1) * k] = neg[i]
    fp, fn, spm, snm = _t(flat_p, flat_n, pm_shared, nm_shared)
    got = eps_supinfonce(tz, fp, fn, tau, eps, snm, tw, pos_mask=spm).item()
    assert got == pytest.approx(reference_eps(z, zp, zn, tau, eps, pos, neg, weight), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("b,m,d", SHAPES)
@pytest.mark.parametrize("h", [0.01, 0.05, 0.5])
@pytest.mark.parametrize("shared", [True, False])
def test_fairkl_matches_reference(b, m, d, h, shared):
    rng = np.random.default_rng(b * 7 + m * 3 + d)
    z = rng.normal(size=(b, d))
    cands = rng.normal(size=(m, d) if shared else (b, m, d))
    pos, neg = _masks(rng, b, m, p_pos=0.4)
    same_bg = rng.random((b, m)) < 0.5
    weight = rng.uniform(0.0, 2.0, size=b)
    tz, tc, ts, tp, tn, tw = _t(z, cands, same_bg, pos, neg, weight)
    got = fairkl(tz, tc, ts, tp, tn, tw, bandwidth=h).item()
    assert got == pytest.approx(reference_fairkl(z, cands, same_bg, pos, neg, weight, h), rel=1e-6, abs=1e-9)
    got = fairkl(tz, tc, ts, tp, bandwidth=h).item()
    assert got == pytest.approx(reference_fairkl(z, cands, same_bg, pos, h=h), rel=1e-6, abs=1e-9)


def test_supcon_with_one_positive_is_clad_infonce():
    """Candidates [x+, x-_1..x-_K] with x+ the only positive: L_out = L_in = CLAD's InfoNCE, masks and
    weights included (every anchor has its one positive, so none is left out of the mean)."""
    rng = np.random.default_rng(3)
    b, k, d = 6, 5, 8
    z, zp, zn = rng.normal(size=(b, d)), rng.normal(size=(b, d)), rng.normal(size=(b, k, d))
    mask = rng.random((b, k)) < 0.6
    mask[0] = False
    weight = np.array([1, 0, 1, 1, 0.5, 2.0])
    tz, tp, tn, tm, tw = _t(z, zp, zn, mask, weight)
    cands = torch.cat([tp[:, None], tn], 1)
    pos = torch.zeros(b, k + 1, dtype=torch.bool)
    pos[:, 0] = True
    neg = torch.cat([torch.zeros(b, 1, dtype=torch.bool), tm], 1)
    for tau in (0.1, 0.2, 0.7):
        want = clad_infonce(tz, tp, tn, tau, tm, tw)
        assert torch.allclose(supcon(tz, cands, pos, tau, neg, tw), want, rtol=1e-10)
        assert torch.allclose(supcon(tz, cands, pos, tau, neg), clad_infonce(tz, tp, tn, tau, tm), rtol=1e-10)


def test_eps_zero_is_the_infonce_form():
    rng = np.random.default_rng(4)
    b, k, d = 5, 7, 6
    z, zp, zn = _t(rng.normal(size=(b, d)), rng.normal(size=(b, 3, d)), rng.normal(size=(b, k, d)))
    mask, weight = _t(rng.random((b, k)) < 0.5, rng.uniform(0.5, 1.5, size=b))
    for tau in (0.1, 0.2):
        # one positive: exactly clad_infonce
        assert torch.allclose(
            eps_supinfonce(z, zp[:, 0], zn, tau, 0.0, mask, weight),
            clad_infonce(z, zp[:, 0], zn, tau, mask, weight),
        )
        # several positives: the mean over positives of the one-positive InfoNCE
        per_positive = torch.stack([clad_infonce(z, zp[:, p], zn, tau, mask) for p in range(3)])
        assert torch.allclose(eps_supinfonce(z, zp, zn, tau, 0.0, mask), per_positive.mean())
    # the margin lowers the floor of each term from 0 to -eps: log(e^{-eps} + sum_n e^{s_n - s+}) >= -eps
    assert -0.5 <= eps_supinfonce(z, zp, zn, 0.2, 0.5, mask) < eps_supinfonce(z, zp, zn, 0.2, 0.0, mask)


def test_constructed_exact_values():
    e = torch.eye(6, dtype=torch.float64)
    tau = 0.2
    z = (3 * e[0])[None]  # one anchor; scales must not matter
    # SupCon: positives e0, 2 e0 (cos 1) and e1 (cos 0); negatives e2, e3 (cos 0)
    cands = torch.stack([e[0], 2 * e[0], e[1], e[2], e[3]])
    pos = torch.tensor([[True, True, True, False, False]])
    want = math.log(2 * math.exp(1 / tau) + 3) - (2 / tau) / 3
    assert supcon(z, cands, pos, tau).item() == pytest.approx(want, rel=1e-12)
    # eps-SupInfoNCE: positives e0 (cos 1), e1 (cos 0); negatives e2, e3 (cos 0), -e0 (cos -1)
    zp = torch.stack([e[0], e[1]])[None]
    zn = torch.stack([e[2], e[3], -e[0]])[None]
    for eps in (0.0, 0.3):
        negs = 2 + math.exp(-1 / tau)
        l1 = math.log(math.exp(1 / tau - eps) + negs) - 1 / tau
        l2 = math.log(math.exp(-eps) + negs)
        assert eps_supinfonce(z, zp, zn, tau, eps).item() == pytest.approx((l1 + l2) / 2, rel=1e-12)
        assert eps_supinfonce(z, zp, zn, tau, eps, reduction="sum").item() == pytest.approx(
            l1 + l2, rel=1e-12
        )
    # FairKL: positives aligned {1, 0}, conflicting {1/sqrt 2}; negatives aligned {0}, conflicting {-1, 0}
    h = 0.1
    cands = torch.stack([e[0], e[1], e[0] + e[1], e[2], -e[0], e[3]])
    pos = torch.tensor([[True, True, True, False, False, False]])
    same_bg = torch.tensor([[True, True, False, True, False, False]])

    def jeffreys_half(mu_a, var_a, mu_c, var_c):
        return 0.25 * (var_a / var_c + var_c / var_a - 2 + (mu_a - mu_c) ** 2 * (1 / var_a + 1 / var_c))

    want = jeffreys_half(0.5, 0.25 + h * h, 1 / math.sqrt(2), h * h) + jeffreys_half(
        0.0, h * h, -0.5, 0.25 + h * h
    )
    assert fairkl(z, cands, same_bg, pos, bandwidth=h).item() == pytest.approx(want, rel=1e-12)


def test_fairkl_zero_cases():
    torch.manual_seed(0)
    z, cands = torch.randn(4, 8), torch.randn(10, 8)
    pos = torch.rand(4, 10) < 0.4
    everything_aligned = torch.ones(4, 10, dtype=torch.bool)
    assert fairkl(z, cands, everything_aligned, pos).item() == 0.0  # every conflicting group empty
    assert fairkl(z, cands, ~everything_aligned, pos).item() == 0.0  # every aligned group empty
    # mirrored groups: the aligned and conflicting similarity distributions are identical
    e = torch.eye(4)
    zz = e[0][None]
    cc = torch.stack([e[0], e[1], e[0], e[1], -e[0], e[2], -e[0], e[2]])
    pp = torch.tensor([[True] * 4 + [False] * 4])
    same_bg = torch.tensor([[True, True, False, False, True, True, False, False]])
    assert fairkl(zz, cc, same_bg, pp).item() == pytest.approx(0.0, abs=1e-12)
    # no pair at all (all weights 0): 0
    assert fairkl(z, cands, pos, pos, weight=torch.zeros(4)).item() == 0.0


def test_new_losses_gradients_are_finite():
    torch.manual_seed(2)
    b, m, d = 6, 9, 5
    z = torch.randn(b, d, requires_grad=True)
    cands = torch.randn(m, d, requires_grad=True)
    pos = torch.rand(b, m) < 0.3
    neg = torch.rand(b, m) < 0.5
    pos[0], neg[1], pos[1, 0] = False, False, True  # an anchor without positives, one without negatives
    same_bg = torch.rand(b, m) < 0.5
    losses = {
        "supcon": lambda: supcon(z, cands, pos, 0.1, neg),
        "eps": lambda: eps_supinfonce(z, cands, cands, 0.1, 0.2, neg, pos_mask=pos),
        "fairkl": lambda: fairkl(z, cands, same_bg, pos, neg, bandwidth=0.01),
        # degenerate: no anchor has a positive / groups empty: 0 with zero (finite) gradients
        "supcon-empty": lambda: supcon(z, cands, torch.zeros(b, m, dtype=torch.bool), 0.1, neg),
        "eps-empty": lambda: eps_supinfonce(
            z,
            cands,
            cands,
            0.1,
            0.2,
            torch.zeros(b, m, dtype=torch.bool),
            pos_mask=torch.zeros(b, m, dtype=torch.bool),
        ),
        "fairkl-empty": lambda: fairkl(z, cands, torch.ones(b, m, dtype=torch.bool), pos),
    }
    for name, fn in losses.items():
        z.grad = cands.grad = None
        loss = fn()
        assert torch.isfinite(loss), name
        loss.backward()
        assert torch.isfinite(z.grad).all() and torch.isfinite(cands.grad).all(), name
        if not name.endswith("empty"):
            assert z.grad.abs().sum() > 0 and cands.grad.abs().sum() > 0, name
        else:
            assert loss.item() == 0.0, name


def test_new_losses_bad_arguments():
    z = torch.randn(2, 4)
    cands = torch.randn(3, 4)
    pos = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="temperature"):
        supcon(z, cands, pos, 0.0)
    with pytest.raises(ValueError, match="candidates"):
        supcon(z, torch.randn(3, 5), pos)
    with pytest.raises(ValueError, match="pos_mask"):
        supcon(z, cands, pos[:, :2])
    with pytest.raises(ValueError, match="neg_mask"):
        eps_supinfonce(z, z, cands, 0.2, 0.1, neg_mask=pos[:, :2])
    with pytest.raises(ValueError, match="zp"):
        eps_supinfonce(z, torch.randn(3, 4), cands, 0.2)
    with pytest.raises(ValueError, match="reduction"):
        eps_supinfonce(z, z, cands, 0.2, reduction="max")
    with pytest.raises(ValueError, match="bandwidth"):
        fairkl(z, cands, pos, pos, bandwidth=0.0)
    with pytest.raises(ValueError, match="weight"):
        supcon(z, cands, pos, weight=torch.ones(3))
