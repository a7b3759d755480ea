"""Background Challenge variants on constructed images whose right answer is known, and the metrics."""

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from debias.evaluate import EvalSet, build_variants, evaluate_model
from debias.models import Preprocessing

FG = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250]], dtype=np.uint8)
BG = np.array([[120, 120, 0], [0, 120, 120], [120, 0, 120]], dtype=np.uint8)
BOX = (slice(3, 6), slice(2, 6))  # rows 3-5, cols 2-5 of a 10x10 image: top strip (3 rows) < bottom (4 rows)


def constructed(per_class=4, mismatched=()):
    """Class c: an FG[c] rectangle on a uniform BG[bg] background (bg = c unless listed in mismatched)."""
    n = 3 * per_class
    labels = np.arange(n) % 3
    bgs = labels.copy()
    for i, b in mismatched:
        bgs[i] = b
    images = np.zeros((n, 10, 10, 3), dtype=np.uint8)
    masks = np.zeros((n, 10, 10), dtype=bool)
    for i in range(n):
        images[i] = BG[bgs[i]]
        images[i][BOX] = FG[labels[i]]
        masks[i][BOX] = True
    return EvalSet(images, labels, bgs, masks, [f"t/{i}" for i in range(n)], ["r", "g", "b"])


class ColourModel(torch.nn.Module):
    """Classifies by the colour of one pixel: the object's (4, 3) or the background's corner (0, 0)."""

    def __init__(self, where: str, table: np.ndarray):
        super().__init__()
        self.yx = (4, 3) if where == "fg" else (9, 9)
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32) / 255)

    def forward(self, pixel_values):
        px = pixel_values[:, :, self.yx[0], self.yx[1]]  # (B, 3) in [0, 1] (mean 0, std 1)
        return ImageClassifierOutputWithNoAttention(logits=-torch.cdist(px, self.table))


PRE = Preprocessing(10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_each_variant_has_the_known_pixels():
    data = constructed()
    v = build_variants(data, seed=0)
    inside = np.zeros((10, 10), dtype=bool)
    inside[BOX] = True
    for k, i in enumerate(v["only_fg"].source):
        img = v["only_fg"].images[k]
        assert (img[inside] == FG[data.labels[i]]).all() and (img[~inside] == 0).all()
    for k, i in enumerate(v["no_fg"].source):
        img = v["no_fg"].images[k]
        assert (img[inside] == 0).all() and (img[~inside] == BG[data.bg_labels[i]]).all()
    for k, i in enumerate(v["only_bg_b"].source):
        img = v["only_bg_b"].images[k]
        assert (img[inside] == 0).all() and (img[~inside] == BG[data.bg_labels[i]]).all()
    for k, i in enumerate(v["only_bg_t"].source):
        assert (
            v["only_bg_t"].images[k] == BG[data.bg_labels[i]]
        ).all()  # uniform background tiles over the box
    for name, rule in [
        ("mixed_same", lambda y, yb: yb == y),
        ("mixed_rand", lambda y, yb: yb != y),
        ("mixed_next", lambda y, yb: yb == (y + 1) % 3),
    ]:
        var = v[name]
        assert len(var.labels) == len(data.labels)
        for k, (i, j) in enumerate(zip(var.source, var.background)):
            img = var.images[k]
            assert (img[inside] == FG[data.labels[i]]).all(), name
            assert (img[~inside] == BG[data.bg_labels[j]]).all(), name
            assert rule(data.labels[i], data.labels[j]), name
            assert var.bg_keys[k] == data.bg_labels[j] and var.labels[k] == data.labels[i]
        if name == "mixed_same":
            assert all(i != j for i, j in zip(var.source, var.background))


def test_variants_are_seeded():
    data = constructed()
    a, b, c = build_variants(data, seed=1), build_variants(data, seed=1), build_variants(data, seed=2)
    assert np.array_equal(a["mixed_rand"].background, b["mixed_rand"].background)
    assert not all(np.array_equal(a[n].background, c[n].background) for n in ("mixed_rand", "mixed_same"))


def test_metrics_for_an_object_model_and_a_background_model():
    data = constructed(per_class=6, mismatched=[(0, 1), (4, 2)])
    fg = evaluate_model(ColourModel("fg", FG), PRE, data, challenge_pool_per_class=None, min_group_size=1)
    acc = fg["accuracy"]
    for name in ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"):
        assert acc[name] == pytest.approx(100.0), name
    assert fg["bg_gap"] == pytest.approx(0.0)
    assert fg["challenge_accuracy"] == pytest.approx(100.0)
    assert fg["worst_group_accuracy"] == pytest.approx(100.0)
    # the background model is right exactly when the background agrees with the label
    bg = evaluate_model(ColourModel("bg", BG), PRE, data, challenge_pool_per_class=None, min_group_size=1)
    acc = bg["accuracy"]
    assert acc["original"] == pytest.approx(100 * 16 / 18)
    assert acc["only_bg_t"] == pytest.approx(100 * 16 / 18)
    variants = build_variants(data, seed=0)  # what evaluate_model builds with its default seed
    for name in ("mixed_same", "mixed_rand", "mixed_next"):
        v = variants[name]
        assert acc[name] == pytest.approx(100 * np.mean(v.bg_keys == v.labels)), name
    assert acc["mixed_rand"] < 20 and acc["mixed_same"] > 80
    assert bg["bg_gap"] == pytest.approx(acc["mixed_same"] - acc["mixed_rand"])
    assert bg["challenge_accuracy"] == pytest.approx(0.0)  # every foreground is flipped by some background
    assert bg["worst_group_accuracy"] == pytest.approx(0.0)
    assert bg["details"]["groups"]["0,0"]["accuracy"] == pytest.approx(100.0)


def test_challenge_pool_limit_and_no_masks():
    data = constructed()
    r = evaluate_model(ColourModel("fg", FG), PRE, data, challenge_pool_per_class=2)
    assert r["details"]["challenge_pool"] == 6
    nomask = EvalSet(data.images, data.labels, data.bg_labels, None, data.ids, data.class_names)
    r = evaluate_model(ColourModel("fg", FG), PRE, nomask)
    assert list(r["accuracy"]) == ["original"] and r["bg_gap"] is None and r["challenge_accuracy"] is None
    assert "no foreground masks" in r["details"]["note"]


def test_empty_masks_are_left_out_of_mask_variants():
    data = constructed()
    data.masks[0] = False
    v = build_variants(data)
    assert (
        len(v["original"].labels) == 12 and len(v["only_fg"].labels) == 11 and 0 not in v["mixed_rand"].source
    )
