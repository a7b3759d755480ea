"""Saliency maps of an image classifier and their alignment with object masks.

* :func:`grad_cam` (Selvaraju et al., 2017): the activations ``A`` of a convolutional layer weighted
  by the spatial mean of ``d logit_y / d A`` per channel, summed over channels, ReLU, upsampled
  (bilinear) to the input size and min-max normalised per image to [0, 1] (as the ``pytorch-grad-cam``
  package the Hard ImageNet release uses; here the upsampling comes first so that every map spans
  exactly [0, 1], and a map that is zero everywhere stays zero). The default layer is the last module
  that contains a convolution and outputs a spatial map (N, C, h, w) with h * w > 1, pooling layers
  excluded: the last stage of a ResNet (``model.layer4[-1]`` in torchvision terms, which is the
  release's choice), of the project's small ResNet, of ConvNeXt and the like. For a vision
  transformer, pass ``layer`` (and note its maps are of the layer you choose).
* :func:`input_gradients`: ``|d logit_y / d x|`` summed over the colour channels, divided by its
  per-image maximum (zeros stay zeros: a pixel the decision cannot depend on has saliency 0). The
  gradient is taken with respect to the model's normalised input.
* :func:`saliency_iou`: binarise a map and compute its IoU with the object mask. By default the map
  keeps as many pixels as the mask has (its top-``|mask|`` pixels: all pixels at least as salient as
  the ``|mask|``-th most salient one, never a pixel of saliency 0), so a map that ranks the object's
  pixels first scores 1 whatever its scale. ``threshold=0.5`` is the Hard ImageNet release's rule
  (pixels with a normalised Grad-CAM value >= 0.5); ``top_fraction=f`` keeps the top ``f`` of the image.
  :func:`saliency_dice` is the Dice coefficient ``2 |S & M| / (|S| + |M|)`` of the same binarised map
  ``S`` and mask ``M``.
* :func:`saliency_mass_on_object`: no binarisation: the share of the map's total (non-negative) mass
  that lies inside the mask. A map spread evenly over the image scores the mask's area fraction, the
  chance level that :func:`alignment_summary` reports beside the means (``object_area``).

The target class ``y`` is ``labels`` when given (the Hard ImageNet release uses the true class), else
the predicted class. Images are either model-ready ``pixel_values`` (a float tensor (N, 3, H, W),
already normalised) or, with ``preprocessing`` (:class:`~debias.models.Preprocessing`), uint8 images
(N, H, W, 3) or (N, 3, H, W) that are resized to the model's resolution and normalised the way
:func:`debias.evaluate.predict` does; maps are returned at the size of the images given.

Every function works in batches, puts the model in eval mode and leaves it there, and changes nothing
else: parameters keep their values and ``requires_grad`` flags, no ``.grad`` is written, hooks are
removed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_POOLING = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
)


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters without ``requires_grad`` for the duration (no graph through them), then restored."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class _Inputs:
    """Batches of normalised pixel_values from pixel_values or uint8 images (see the module docstring)."""

    def __init__(self, images, preprocessing=None):
        self.pre = preprocessing
        if preprocessing is None:
            x = torch.as_tensor(images)
            if not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
                raise TypeError(
                    "without `preprocessing`, images must be normalised pixel_values: a float tensor "
                    f"(N, 3, H, W); got {x.dtype} {tuple(x.shape)}"
                )
            self.x = x
            self.size = tuple(x.shape[-2:])
        else:
            x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise TypeError(f"with `preprocessing`, images must be uint8 (N, H, W, 3); got {x.dtype}")
            if x.shape[-1] == 3 and x.shape[1] != 3:
                x = x.permute(0, 3, 1, 2)
            self.x = x
            self.size = tuple(x.shape[-2:])
            from .data import BatchAugment

            self.norm = BatchAugment(preprocessing.mean, preprocessing.std)

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, s: int, e: int, device) -> torch.Tensor:
        x = self.x[s:e].to(device)
        if self.pre is None:
            return x.float()
        from .data import resize_uint8

        x = resize_uint8(x, self.pre.resolution)
        return self.norm.to(device).normalize(x)


def _labels(labels, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    return y


def _resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def find_cam_layer(
    model: nn.Module, pixel_values: torch.Tensor, min_size: int | None = None
) -> tuple[str, nn.Module]:
    """The default Grad-CAM layer (see the module docstring) and its name, found by one forward pass
    (in eval mode, where the model is left).

    ``min_size``: instead, the last such module whose map is at least ``min_size`` x ``min_size``
    (a finer map than the last stage's where that one has only a few cells, e.g. 2 x 2 for a
    64 px input to the project's small ResNet).
    """
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    finished: list[nn.Module] = []

    def record(module, inputs, output):
        if (
            isinstance(output, torch.Tensor)
            and output.ndim == 4
            and output.is_floating_point()
            and output.shape[-1] * output.shape[-2] > 1
            and (min_size is None or min(output.shape[-2:]) >= min_size)
            and not isinstance(module, _POOLING)
            and any(isinstance(m, nn.Conv2d) for m in module.modules())
        ):
            finished.append(module)

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        size = f" of at least {min_size} x {min_size}" if min_size is not None else ""
        raise ValueError(
            f"{type(model).__name__} has no convolutional layer with a spatial output{size}; pass `layer=`"
        )
    return names[finished[-1]], finished[-1]


def _resolve_layer(model: nn.Module, layer, example: torch.Tensor) -> nn.Module:
    if layer is None:
        return find_cam_layer(model, example)[1]
    if isinstance(layer, nn.Module):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"{type(model).__name__} has no module named {layer!r}")
    return modules[layer]


def grad_cam(
    model: nn.Module,
    images,
    labels=None,
    layer: str | nn.Module | None = None,
    preprocessing=None,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] at the size of ``images`` (see the module docstring).

    Args:
        model: a classifier called as ``model(pixel_values=x)`` returning logits (or an output with
            ``.logits``): a transformers image classifier, the project's small ResNet.
        images: normalised pixel_values (float (N, 3, H, W)), or uint8 images with ``preprocessing``.
        labels: the class each map explains (default: the predicted class).
        layer: the module (or its name in ``model.named_modules()``) whose activations are weighted;
            default: :func:`find_cam_layer`.
        preprocessing: a :class:`~debias.models.Preprocessing` for uint8 ``images``.
        batch_size: images per forward/backward pass.
    """
    model.eval()
    inputs = _Inputs(images, preprocessing)
    n = len(inputs)
    y_all = _labels(labels, n)
    device = _device(model)
    out = torch.zeros((n, *inputs.size), dtype=torch.float32)
    if n == 0:
        return out.numpy()
    module = _resolve_layer(model, layer, inputs.batch(0, 1, device))
    captured: dict[str, torch.Tensor] = {}

    def hook(mod, inp, output):
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError(f"Grad-CAM layer {type(mod).__name__} must output (N, C, h, w)")
        leaf = output.detach().requires_grad_(True)
        captured["act"] = leaf
        return leaf * 1.0  # a non-leaf copy, so that in-place operations after the layer are allowed

    with _frozen(model):
        for s in range(0, n, batch_size):
            x = inputs.batch(s, min(s + batch_size, n), device)
            handle = module.register_forward_hook(hook)
            try:
                with torch.enable_grad():
                    logits = _logits(model(pixel_values=x))
                    y = logits.argmax(-1) if y_all is None else y_all[s : s + len(x)].to(logits.device)
                    score = logits.gather(1, y[:, None]).sum()
                    (grads,) = torch.autograd.grad(score, captured["act"], allow_unused=True)
            finally:
                handle.remove()
            if grads is None:
                raise ValueError(
                    "the logits do not depend on the Grad-CAM layer's output; choose another layer"
                )
            act = captured.pop("act").detach()
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = torch.relu((weights * act).sum(dim=1))
            cam = _resize_maps(_resize_maps(cam, tuple(x.shape[-2:])), inputs.size)
            out[s : s + len(x)] = _minmax(cam).float().cpu()
    return out.numpy()


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    span = hi - lo
    return torch.where(
        span > 0, (maps - lo) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps)
    )


def input_gradients(
    model: nn.Module, images, labels=None, preprocessing=None, batch_size: int = 64
) -> np.ndarray:
    """``|d logit_y / d x|`` summed over channels, divided by its per-image maximum: (N, H, W) in [0, 1].

    Arguments as for :func:`grad_cam`. Maps are at the size of ``images`` (resized bilinearly when
    ``preprocessing`` resized the input).
    """
    model.eval()
    inputs = _Inputs(images, preprocessing)
    n = len(inputs)
    y_all = _labels(labels, n)
    device = _device(model)
    out = torch.zeros((n, *inputs.size), dtype=torch.float32)
    with _frozen(model):
        for s in range(0, n, batch_size):
            x = inputs.batch(s, min(s + batch_size, n), device).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = _logits(model(pixel_values=x))
                y = logits.argmax(-1) if y_all is None else y_all[s : s + len(x)].to(logits.device)
                (grads,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x)
            sal = _resize_maps(grads.detach().abs().sum(dim=1), inputs.size)
            peak = sal.flatten(1).max(dim=1).values[:, None, None]
            sal = torch.where(
                peak > 0, sal / peak.clamp_min(torch.finfo(sal.dtype).tiny), torch.zeros_like(sal)
            )
            out[s : s + len(x)] = sal.float().cpu()
    return out.numpy()


def binarize(
    maps, masks=None, threshold: float | None = None, top_fraction: float | None = None
) -> np.ndarray:
    """Boolean salient regions (N, H, W) of saliency ``maps`` (see :func:`saliency_iou` for the rules)."""
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got {maps.shape}")
    if threshold is not None and top_fraction is not None:
        raise ValueError("give either threshold or top_fraction, not both")
    if threshold is not None:
        return maps >= threshold
    n, h, w = maps.shape
    if top_fraction is not None:
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        ks = np.full(n, int(np.ceil(top_fraction * h * w)))
    else:
        if masks is None:
            raise ValueError("the default binarisation keeps as many pixels as the mask has: pass masks")
        ks = _per_image(_as_masks(masks, maps.shape))
    flat = maps.reshape(n, h * w)
    out = np.zeros_like(flat, dtype=bool)
    for i, k in enumerate(ks.tolist()):
        if k <= 0:
            continue
        kth = np.partition(flat[i], flat.shape[1] - k)[flat.shape[1] - k]  # the k-th largest value
        out[i] = (flat[i] >= kth) & (flat[i] > 0)
    return out.reshape(maps.shape)


def _per_image(x: np.ndarray) -> np.ndarray:
    """Per-image sums (N,) of an (N, H, W) array (N may be 0)."""
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).sum(axis=1)


def _as_masks(masks, shape: tuple[int, ...]) -> np.ndarray:
    m = np.asarray(masks)
    m = m if m.dtype == bool else m > 0
    if m.shape != tuple(shape):
        raise ValueError(f"masks {m.shape} and maps {tuple(shape)} differ in shape")
    return m


def saliency_iou(
    maps, masks, top_fraction: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """IoU (N,) of each binarised saliency map with its object mask; NaN where the mask is empty.

    Binarisation (see the module docstring): by default the top-``|mask|`` pixels of the map;
    ``threshold``: pixels with map >= threshold (0.5 is the Hard ImageNet release's rule on Grad-CAM
    maps); ``top_fraction``: the top fraction of the image's pixels. ``masks``: (N, H, W), boolean or
    non-zero = object, the same shape as ``maps``.
    """
    inter, sal_area, area = _overlap(maps, masks, top_fraction, threshold)
    iou = np.full(len(area), np.nan)
    ok = area > 0
    iou[ok] = inter[ok] / (sal_area[ok] + area[ok] - inter[ok])
    return iou


def _overlap(maps, masks, top_fraction, threshold) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: |S & M|, |S| and |M| for the binarised map S and the mask M."""
    maps = np.asarray(maps, dtype=np.float64)
    m = _as_masks(masks, maps.shape)
    sal = binarize(maps, m, threshold=threshold, top_fraction=top_fraction)
    return _per_image(sal & m), _per_image(sal), _per_image(m)


def _dice(inter: np.ndarray, sal_area: np.ndarray, area: np.ndarray) -> np.ndarray:
    dice = np.full(len(area), np.nan)
    ok = area > 0
    dice[ok] = 2 * inter[ok] / (sal_area[ok] + area[ok])
    return dice


def saliency_dice(
    maps, masks, top_fraction: float | None = None, threshold: float | None = None
) -> np.ndarray:
    """Dice coefficient (N,) of each binarised saliency map with its object mask; NaN where the mask is
    empty.

    ``2 |S & M| / (|S| + |M|)`` with ``S`` the map binarised by the rules of :func:`saliency_iou` (the
    same arguments) and ``M`` the mask. Dice = 2 IoU / (1 + IoU), image by image.
    """
    return _dice(*_overlap(maps, masks, top_fraction, threshold))


def saliency_mass_on_object(maps, masks) -> np.ndarray:
    """Share (N,) of each map's total mass that lies inside its object mask, in [0, 1].

    ``sum(map * mask) / sum(map)`` per image; NaN where the mask is empty or the map is zero everywhere.
    ``maps``: (N, H, W), non-negative (as Grad-CAM and input-gradient maps are; a negative value raises
    ``ValueError``); ``masks``: the same shape, boolean or non-zero = object.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, H, W), got {maps.shape}")
    m = _as_masks(masks, maps.shape)
    if (maps < 0).any():
        raise ValueError("maps must be non-negative to measure their mass (got negative values)")
    total, inside, area = _per_image(maps), _per_image(np.where(m, maps, 0.0)), _per_image(m)
    share = np.full(len(maps), np.nan)
    ok = (area > 0) & (total > 0)
    share[ok] = inside[ok] / total[ok]
    return share


def _binarization_name(top_fraction: float | None, threshold: float | None) -> str:
    if threshold is not None:
        return f"map >= {threshold:g}"
    if top_fraction is not None:
        return f"top {100 * top_fraction:g}% of the image"
    return "top-|mask| pixels"


def alignment_summary(
    maps, masks, top_fraction: float | None = None, threshold: float | None = None
) -> dict[str, Any]:
    """How well saliency ``maps`` (N, H, W) fall on the objects of ``masks`` (N, H, W): means in percent.

    Returns a JSON-ready dict:

    * ``iou``, ``dice``: mean :func:`saliency_iou` and :func:`saliency_dice` (binarisation by
      ``top_fraction`` / ``threshold`` as there, named in ``binarization``) over the ``num_with_mask``
      images whose mask is not empty;
    * ``mass_on_object``: mean :func:`saliency_mass_on_object` over the ``num_with_mass`` images whose mask
      is not empty and whose map is not zero everywhere;
    * ``object_area``: mean share of the image the mask covers, over the ``num_with_mask`` images: the
      ``mass_on_object`` of a map spread evenly over the image (chance level);
    * ``num_images``: N.

    A mean over no image is ``None``. The per-image functions give fractions; the summary gives percent,
    as the project's reports do. Everything is vectorised over N (one binarisation serves IoU and Dice);
    for more maps than fit in memory, summarise chunks and combine their means weighted by the counts.
    """
    maps = np.asarray(maps, dtype=np.float64)
    m = _as_masks(masks, maps.shape)
    inter, sal_area, area = _overlap(maps, m, top_fraction, threshold)
    has_mask = area > 0
    iou = np.full(len(area), np.nan)
    iou[has_mask] = inter[has_mask] / (sal_area + area - inter)[has_mask]
    dice = _dice(inter, sal_area, area)
    mass = saliency_mass_on_object(maps, m)
    n = len(maps)
    area = area / float(np.prod(maps.shape[1:]))

    def pct(v: np.ndarray) -> float | None:
        v = v[~np.isnan(v)]
        return 100.0 * float(v.mean()) if v.size else None

    return {
        "iou": pct(iou),
        "dice": pct(dice),
        "mass_on_object": pct(mass),
        "object_area": pct(np.where(has_mask, area, np.nan)),
        "num_images": n,
        "num_with_mask": int(has_mask.sum()),
        "num_with_mass": int((~np.isnan(mass)).sum()),
        "binarization": _binarization_name(top_fraction, threshold),
    }
