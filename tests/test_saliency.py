"""Grad-CAM, input gradients and mask IoU, on models whose decision provably uses one region only."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from debias.models import Preprocessing
from debias.saliency import binarize, find_cam_layer, grad_cam, input_gradients, saliency_iou

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
