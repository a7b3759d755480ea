"""Grad-CAM, input gradients and mask IoU, on models whose decision provably uses one region only."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from debias.models import Preprocessing
from debias.saliency import (
    alignment_summary,
    binarize,
    find_cam_layer,
    grad_cam,
    input_gradients,
    saliency_dice,
    saliency_iou,
    saliency_mass_on_object,
)

S = 32


def _square(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((S, S), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


LEFT, RIGHT = _square(8, 24, 2, 14), _square(8, 24, 18, 30)


class _GatedFeatures(nn.Module):
    """An identity convolution (plus ``kernel`` > 1: a small 3x3 blur), average-pooled by ``stride``,
    zeroed outside ``region``: the only features the model has."""

    def __init__(self, region: np.ndarray, stride: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel, padding=kernel // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, kernel // 2, kernel // 2] = torch.eye(3)
            if kernel > 1:
                self.conv.weight.add_(0.05)
        self.stride = stride
        r = torch.as_tensor(region, dtype=torch.float32)[None, None]
        self.register_buffer("region", F.avg_pool2d(r, stride) if stride > 1 else r)

    def forward(self, x):
        f = self.conv(x)
        if self.stride > 1:
            f = F.avg_pool2d(f, self.stride)
        return f * self.region


class RegionReader(nn.Module):
    """Logits from the mean of the gated features (-1 per channel for class 0, +1 for class 1):
    nothing outside ``region`` reaches the logits."""

    def __init__(self, region: np.ndarray, stride: int = 1, kernel: int = 1):
        super().__init__()
        self.features = _GatedFeatures(region, stride, kernel)
        self.head = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))

    def forward(self, pixel_values, **kwargs):
        f = self.features(pixel_values)
        pooled = f.sum(dim=(2, 3)) / self.features.region.sum()
        return SimpleNamespace(logits=self.head(pooled))


def _images(n=4, seed=0) -> torch.Tensor:
    """Normalised images, dark (class 0) or bright (class 1) in both squares, mid-grey elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, S, S)
    both = torch.as_tensor(LEFT | RIGHT)
    for i in range(n):
        level = -0.8 if i % 2 == 0 else 0.8
        x[i][:, both] = level + 0.1 * torch.rand(3, int(both.sum()), generator=g)
    return x


def test_grad_cam_peaks_on_the_region_the_decision_uses():
    model = RegionReader(LEFT)
    x = _images()
    labels = np.array([0, 1, 0, 1])
    maps = grad_cam(model, x, labels)
    assert maps.shape == (4, S, S) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert (maps[:, ~LEFT] == 0).all() and (maps[:, LEFT] > 0).all()
    assert np.allclose(maps.max(axis=(1, 2)), 1)
    masks_left, masks_right = np.stack([LEFT] * 4), np.stack([RIGHT] * 4)
    np.testing.assert_array_equal(saliency_iou(maps, masks_left), np.ones(4))
    np.testing.assert_array_equal(saliency_iou(maps, masks_right), np.zeros(4))
    np.testing.assert_array_equal(saliency_iou(maps, masks_left, threshold=1e-6), np.ones(4))
    # the predicted class is the default target; the model is right on every image
    np.testing.assert_array_equal(grad_cam(model, x), maps)
    # batches do not interact
    np.testing.assert_array_equal(grad_cam(model, x, labels, batch_size=3), maps)
    # the other region: the opposite
    other = grad_cam(RegionReader(RIGHT), x, labels)
    np.testing.assert_array_equal(saliency_iou(other, masks_right), np.ones(4))
    np.testing.assert_array_equal(saliency_iou(other, masks_left), np.zeros(4))


def test_grad_cam_upsamples_coarse_maps():
    model = RegionReader(LEFT, stride=4)  # an 8x8 feature map
    assert find_cam_layer(model, _images(1))[0] == "features"
    maps = grad_cam(model, _images(), np.array([0, 1, 0, 1]))
    assert maps.shape == (4, S, S)
    left = saliency_iou(maps, np.stack([LEFT] * 4))
    right = saliency_iou(maps, np.stack([RIGHT] * 4))
    assert (left > 0.75).all() and (right < 0.05).all(), (left, right)
    assert (maps[:, :, 20:] == 0).all()  # far from the used region nothing is salient


def test_input_gradients_are_zero_outside_the_receptive_region():
    x = _images()
    maps = input_gradients(RegionReader(LEFT), x)
    np.testing.assert_array_equal(maps, np.stack([LEFT.astype(np.float32)] * 4))  # exact: linear model
    wide = input_gradients(RegionReader(LEFT, kernel=3), x, labels=np.array([1, 1, 0, 0]))
    grown = F.max_pool2d(torch.as_tensor(LEFT, dtype=torch.float32)[None, None], 3, 1, 1)[0, 0].bool().numpy()
    assert (wide[:, ~grown] == 0).all() and (wide[:, LEFT] > 0).all()
    assert np.allclose(wide.max(axis=(1, 2)), 1)


def _tiny_models():
    from transformers import ResNetConfig, ResNetForImageClassification

    from debias.models import SmallResNetConfig, SmallResNetForImageClassification

    torch.manual_seed(0)
    small = SmallResNetForImageClassification(SmallResNetConfig(widths=(4, 8, 8, 8), num_labels=3))
    hf = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)
    )
    return [(small, "stages"), (hf, "resnet.encoder.stages.1")]


@pytest.mark.parametrize("which", [0, 1])
def test_real_classifiers_are_left_unchanged(which):
    model, layer = _tiny_models()[which]
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 64, 64)
    assert find_cam_layer(model, x[:1])[0] == layer
    maps = grad_cam(model, x, labels=[0, 1, 2, 0, 1], batch_size=2)
    grads = input_gradients(model, x, batch_size=4)
    for m in (maps, grads):
        assert m.shape == (5, 64, 64) and m.min() >= 0 and m.max() <= 1
        assert np.isfinite(m).all()
    assert np.allclose(grads.max(axis=(1, 2)), 1)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    # a layer by name or module gives the same maps
    module = dict(model.named_modules())[layer]
    np.testing.assert_allclose(grad_cam(model, x, [0, 1, 2, 0, 1], layer=module), maps, atol=1e-6)


def test_uint8_images_with_preprocessing():
    model, _ = _tiny_models()[0]
    pre = Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    maps = grad_cam(model, images, preprocessing=pre)
    assert maps.shape == (3, 40, 48) and 0 <= maps.min() and maps.max() <= 1
    assert input_gradients(model, images, preprocessing=pre).shape == (3, 40, 48)
    with pytest.raises(TypeError, match="normalised pixel_values"):
        grad_cam(model, images)
    with pytest.raises(ValueError, match="no module named"):
        grad_cam(model, torch.zeros(1, 3, 64, 64), layer="nope")

    class NoConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, pixel_values):
            return self.fc(pixel_values.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="no convolutional layer"):
        grad_cam(NoConv(), torch.zeros(1, 3, 8, 8))


def test_saliency_iou_rules():
    maps = np.zeros((3, 4, 4))
    maps[0, 0, :] = [0.9, 0.8, 0.7, 0.6]  # the top row is the most salient
    maps[0, 1, 0] = 0.5
    maps[1] = maps[0]
    maps[2, 0, 0] = 1.0  # a single salient pixel, everything else zero (never selected)
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, 0, :] = True  # exactly the top row: IoU 1 with the default rule
    masks[1, 0, :2] = True  # two pixels: the top two are kept, IoU 1
    masks[2, 0, :2] = True
    np.testing.assert_allclose(saliency_iou(maps, masks), [1.0, 1.0, 0.5])
    # the release's rule: map >= 0.5 keeps 5 pixels on images 0 and 1
    np.testing.assert_allclose(saliency_iou(maps, masks, threshold=0.5), [4 / 5, 2 / 5, 1 / 2])
    # the top quarter of the image: 4 pixels (image 2 has only one non-zero pixel)
    np.testing.assert_allclose(saliency_iou(maps, masks, top_fraction=0.25), [1.0, 0.5, 0.5])
    assert binarize(maps, masks).sum(axis=(1, 2)).tolist() == [4, 2, 1]
    empty = np.zeros((1, 4, 4), dtype=bool)
    assert np.isnan(saliency_iou(maps[:1], empty)[0])
    masks255 = masks.astype(np.uint8) * 255  # non-zero = object
    np.testing.assert_allclose(saliency_iou(maps, masks255), [1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="differ in shape"):
        saliency_iou(maps, masks[:, :2])
    with pytest.raises(ValueError, match="not both"):
        saliency_iou(maps, masks, threshold=0.5, top_fraction=0.1)


def _rule_maps():
    """The maps and masks of test_saliency_iou_rules, plus a map that is zero everywhere."""
    maps = np.zeros((4, 4, 4))
    maps[0, 0, :] = [0.9, 0.8, 0.7, 0.6]
    maps[0, 1, 0] = 0.5
    maps[1] = maps[0]
    maps[2, 0, 0] = 1.0
    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[0, 0, :] = True
    masks[1, 0, :2] = True
    masks[2, 0, :2] = True
    masks[3, 1:3, 1:3] = True  # image 3: a 2x2 object, a map that is zero everywhere
    return maps, masks


def test_saliency_dice_and_mass_exact():
    maps, masks = _rule_maps()
    # default rule: S = top-|mask| non-zero pixels; Dice = 2 |S & M| / (|S| + |M|)
    np.testing.assert_allclose(saliency_dice(maps, masks), [1.0, 1.0, 2 * 1 / (1 + 2), 0.0])
    # map >= 0.5: 5 pixels on images 0 and 1, one on image 2, none on image 3
    np.testing.assert_allclose(
        saliency_dice(maps, masks, threshold=0.5), [2 * 4 / 9, 2 * 2 / 7, 2 * 1 / 3, 0.0]
    )
    # top quarter (4 pixels): the top row on images 0 and 1, the single non-zero pixel on image 2
    np.testing.assert_allclose(
        saliency_dice(maps, masks, top_fraction=0.25), [1.0, 2 * 2 / 6, 2 * 1 / 3, 0.0]
    )
    # mass: sum(map * mask) / sum(map); the map of image 3 has no mass
    mass = saliency_mass_on_object(maps, masks)
    np.testing.assert_allclose(mass[:3], [3.0 / 3.5, 1.7 / 3.5, 1.0])
    assert np.isnan(mass[3])
    # scale does not matter; a uniform map scores the mask's area fraction
    np.testing.assert_allclose(saliency_mass_on_object(7 * maps[:3], masks[:3]), mass[:3])
    np.testing.assert_allclose(
        saliency_mass_on_object(np.ones((4, 4, 4)), masks), [4 / 16, 2 / 16, 2 / 16, 4 / 16]
    )
    # empty masks: NaN for both
    empty = np.zeros((1, 4, 4), dtype=bool)
    assert np.isnan(saliency_dice(maps[:1], empty)[0]) and np.isnan(
        saliency_mass_on_object(maps[:1], empty)[0]
    )
    np.testing.assert_allclose(saliency_mass_on_object(maps, masks.astype(np.uint8) * 255)[:3], mass[:3])
    with pytest.raises(ValueError, match="non-negative"):
        saliency_mass_on_object(-maps, masks)
    with pytest.raises(ValueError, match="differ in shape"):
        saliency_dice(maps, masks[:, :2])


def _reference(maps, masks):
    """IoU, Dice and mass share by plain loops over pixels (the default binarisation)."""
    out = []
    for mp, mk in zip(maps, masks):
        values = sorted(mp.ravel().tolist(), reverse=True)
        k = int(mk.sum())
        kth = values[k - 1] if k else np.inf
        inter = union = sal = inside = total = 0.0
        for v, m in zip(mp.ravel().tolist(), mk.ravel().tolist()):
            s = v >= kth and v > 0
            inter += s and m
            union += s or m
            sal += s
            inside += v * m
            total += v
        if not k:
            out.append((np.nan, np.nan, np.nan))
            continue
        out.append((inter / union, 2 * inter / (sal + k), inside / total if total > 0 else np.nan))
    return np.array(out)


@pytest.mark.parametrize("shape", [(5, 6, 6), (3, 8, 5), (1, 3, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_against_a_loop_reference(shape, seed):
    rng = np.random.default_rng(seed)
    maps = rng.random(shape) * (rng.random(shape) > 0.3)  # ties at zero
    maps[0] = np.round(maps[0], 1)  # ties above zero
    masks = rng.random(shape) > 0.6
    masks[-1] = False if shape[0] > 1 else masks[-1]
    ref = _reference(maps, masks)
    iou, dice, mass = (
        saliency_iou(maps, masks),
        saliency_dice(maps, masks),
        saliency_mass_on_object(maps, masks),
    )
    np.testing.assert_allclose(np.stack([iou, dice, mass], axis=1), ref, equal_nan=True)
    ok = ~np.isnan(iou)
    np.testing.assert_allclose(dice[ok], 2 * iou[ok] / (1 + iou[ok]))


def test_alignment_summary_exact():
    maps, masks = _rule_maps()
    maps = np.concatenate([maps, maps[:1]])
    masks = np.concatenate([masks, np.zeros((1, 4, 4), dtype=bool)])  # image 4: no object, not counted
    s = alignment_summary(maps, masks)
    assert s["num_images"] == 5 and s["num_with_mask"] == 4 and s["num_with_mass"] == 3
    assert s["iou"] == pytest.approx(100 * (1 + 1 + 0.5 + 0) / 4)
    assert s["dice"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)
    assert s["mass_on_object"] == pytest.approx(100 * (3.0 / 3.5 + 1.7 / 3.5 + 1.0) / 3)
    assert s["object_area"] == pytest.approx(100 * (4 + 2 + 2 + 4) / 16 / 4)
    assert s["binarization"] == "top-|mask| pixels"
    half = alignment_summary(maps, masks, threshold=0.5)
    assert half["iou"] == pytest.approx(100 * (4 / 5 + 2 / 5 + 1 / 2 + 0) / 4)
    assert half["binarization"] == "map >= 0.5"
    assert alignment_summary(maps, masks, top_fraction=0.25)["binarization"] == "top 25% of the image"
    none = alignment_summary(maps[4:], masks[4:])
    assert none["iou"] is None and none["mass_on_object"] is None and none["num_with_mask"] == 0
    assert alignment_summary(np.zeros((0, 4, 4)), np.zeros((0, 4, 4), dtype=bool))["iou"] is None
    import json

    json.dumps(s, allow_nan=False)  # plain JSON


def test_find_cam_layer_min_size():
    model, _ = _tiny_models()[0]  # 64 px: stem 16x16, stages 16, 8, 4, 2
    x = torch.randn(1, 3, 64, 64)
    assert find_cam_layer(model, x)[0] == "stages"
    assert find_cam_layer(model, x, min_size=4)[0] == "stages.2"
    assert find_cam_layer(model, x, min_size=8)[0] == "stages.1"
    with pytest.raises(ValueError, match="at least 64 x 64"):
        find_cam_layer(model, x, min_size=64)


def test_saliency_figure_size_and_examples(tmp_path):
    from PIL import Image

    from debias.report import saliency_examples, saliency_figure, saliency_figure_size

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[:, 4:12, 4:12] = True
    maps = rng.random((2, 16, 16))
    by_method = {
        "erm": {"grad_cam": maps, "input_gradients": maps**4},
        "clad": {"grad_cam": 1 - maps},
    }
    path = tmp_path / "saliency.png"
    saliency_figure(images, masks, by_method, [1, 0], ["cat", "dog"], path)
    with Image.open(path) as im:
        assert im.size == saliency_figure_size(2, 1 + 3)  # the image, then three maps
        pixels = np.asarray(im.convert("RGB"))
    assert saliency_figure_size(2, 4) == (34 + 4 * 140, 72 + 2 * 140 + 28)
    assert pixels.std() > 10  # not blank
    with pytest.raises(ValueError, match="maps_by_method"):
        saliency_figure(images, masks, {"erm": {"grad_cam": maps[:1]}}, [1, 0], None, path)
    # one image per class, the first with an object, in class order
    labels = np.array([1, 0, 1, 2, 0])
    ex_masks = np.ones((5, 4, 4), dtype=bool)
    ex_masks[1] = False
    assert saliency_examples(labels, ex_masks) == [4, 0, 3]
    assert saliency_examples(labels, ex_masks, max_images=2) == [4, 0]
