"""The Hard ImageNet measures of spurious-feature reliance (Moayeri, Singla, Feizi; NeurIPS 2022).

Three families, computed as the release's code computes them (github.com/mmoayeri/HardImageNet:
``ablations.py``, ``rfs.py``, ``saliency_analysis.py``), on the images whose object mask is not empty:

* **Ablation**: accuracy when the object is removed, and its drop (percentage points) from the
  accuracy on the same images unablated. A small drop means the model does not need the object.

  - ``grey_object``: the mask's pixels set to grey 0.5 (the release's ``replace_with_gray``, on
    [0, 1] images); in 8-bit images that is 128 (127.5 rounded), in all three channels;
  - ``grey_box``: the mask's bounding box set to the same grey;
  - ``fill_box``: the bounding box filled with tiles of the image's own background
    (:func:`augment.imageops.tile_fill`, the Background Challenge's ``only_bg_t``: the largest
    box-free strip beside the box, repeated over it). The release tiles each connected component's
    box separately with the largest adjacent box-sized tile cut short at other object pixels; here
    one box around the whole mask is filled, as the rest of this project does.

* **Relative foreground sensitivity** (``rfs.py``): Gaussian noise ``N(0, noise_std^2)`` is added, on
  the [0, 1] scale, to the object pixels only (``noisy_fg``) or to the background pixels only
  (``noisy_bg``), independently per pixel and channel, the result clipped to [0, 1] (the release's
  default "linf" noise, ``noise_std`` 0.25). The same noise draw serves both in a trial, and the
  release's 3 trials are the default. With ``acc_fg``, ``acc_bg`` the *class-balanced* accuracies
  (the mean over classes of each class's accuracy, pooled over trials, as the release computes them)
  as fractions::

      avg = (acc_fg + acc_bg) / 2
      RFS = (acc_bg - acc_fg) / (2 * min(avg, 1 - avg))      (0 when avg is 0 or 1)

  RFS lies in [-1, 1]; positive means the model is more sensitive to its foreground than to its
  background (what a model that looks at the object does).

* **Saliency alignment**: the IoU of the Grad-CAM map of the true class with the object mask
  (:mod:`debias.saliency`). ``saliency_iou`` binarises each map by keeping as many of its most salient
  pixels as the mask has; ``details["saliency"]["iou_threshold_0.5"]`` is the release's rule (normalised
  map >= 0.5). Both are means over images with a non-empty mask.

Everything is computed at the model's input resolution (the release ablates and adds noise after
resizing to 224 px): images are resized like :func:`debias.evaluate.predict` resizes them (bilinear,
antialiased), masks by area (a pixel is object if any of its area was, as the release's bilinear resize
followed by ``mask > 0`` does). Noise and greying are applied to 8-bit images, so the noisy images are
rounded to 1/255. Noise is seeded per image and trial (``seed``), independent of the batch size.

Units: accuracies, drops and IoUs in percent; RFS as a number in [-1, 1].
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from augment.imageops import box_mask, mask_bbox, tile_fill
from augment.seeding import item_rng

GREY = 128  # 0.5 on the [0, 1] scale (127.5), as an 8-bit value
ABLATIONS = ("grey_object", "grey_box", "fill_box")


# ----------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------


def grey_object(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images with their mask pixels set to :data:`GREY`."""
    return np.where(masks[..., None], np.uint8(GREY), images).astype(np.uint8)


def grey_box(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images with the bounding box of each mask set to :data:`GREY`."""
    boxes = np.stack([box_mask(m.shape, mask_bbox(m)) for m in masks]) if len(masks) else masks
    return np.where(boxes[..., None], np.uint8(GREY), images).astype(np.uint8)


def fill_box(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images with each mask's bounding box tiled with the image's own background."""
    if not len(images):
        return images.copy()
    return np.stack([tile_fill(img, m, pad=0) for img, m in zip(images, masks)])


def add_noise(images: np.ndarray, region: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``clip(x + region * noise, 0, 1)`` on the [0, 1] scale, back to uint8 (rounded).

    ``images`` (N, H, W, 3) uint8, ``region`` (N, H, W) bool, ``noise`` (N, H, W, 3) float already
    scaled by its standard deviation.
    """
    x = images.astype(np.float32) / 255.0 + np.where(region[..., None], noise, np.float32(0))
    return np.clip(np.rint(np.clip(x, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def noise_draw(seed: int, index: int, trial: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """The seeded Gaussian noise (float32, std ``std``) of image ``index`` in ``trial``."""
    rng = item_rng(seed, f"hard-imagenet/noise/{index}/{trial}")
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def compute_rfs(noisy_fg_accuracy: float, noisy_bg_accuracy: float) -> float:
    """Relative foreground sensitivity from accuracies given as fractions in [0, 1] (see the module doc)."""
    avg = 0.5 * (noisy_fg_accuracy + noisy_bg_accuracy)
    if avg <= 0 or avg >= 1:
        return 0.0
    return (noisy_bg_accuracy - noisy_fg_accuracy) / (2 * min(avg, 1 - avg))


def resize_for_model(images: np.ndarray, masks: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (bilinear, antialiased, as :func:`debias.evaluate.predict`) and masks (any area covered)
    at ``resolution`` x ``resolution``."""
    from .data import resize_uint8

    if images.shape[1:3] == (resolution, resolution):
        return images, masks
    x = resize_uint8(torch.as_tensor(images).permute(0, 3, 1, 2), resolution).permute(0, 2, 3, 1)
    m = F.interpolate(torch.as_tensor(masks)[:, None].float(), size=(resolution, resolution), mode="area")
    return x.numpy(), (m[:, 0] > 0).numpy()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _pct(correct: int | float, total: int | float) -> float | None:
    return 100.0 * correct / total if total else None


def evaluate_hard_imagenet(
    model,
    pre,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    noise_std: float = 0.25,
    seed: int = 0,
    progress: bool = True,
    trials: int = 3,
    saliency: bool = True,
    saliency_layer: str | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """The Hard ImageNet measures of ``model`` (see the module docstring for definitions and units).

    Args:
        model: a classifier called as ``model(pixel_values=x)`` (see :func:`debias.evaluate.predict`).
        pre: its :class:`~debias.models.Preprocessing` (resolution, mean, std).
        images: (N, H, W, 3) uint8; masks: (N, H, W) bool (True = object); labels: (N,) int.
        trials: noise draws per image for RFS (the release uses 3).
        saliency: compute the Grad-CAM IoU (one backward pass per image).
        saliency_layer: the Grad-CAM layer's name (default: :func:`debias.saliency.find_cam_layer`).
        class_names: names for the per-class table in ``details``.

    Returns a dict with ``accuracy`` (all images), ``ablation_accuracy`` and ``ablation_drop``
    (``original`` / ``grey_object`` / ``grey_box`` / ``fill_box``, images with a mask),
    ``noisy_fg_accuracy``, ``noisy_bg_accuracy``, ``rfs``, ``saliency_iou`` and ``details``.
    """
    from .evaluate import predict
    from .saliency import find_cam_layer, grad_cam, saliency_iou

    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if masks is None:
        raise ValueError("the Hard ImageNet measures need object masks")
    masks = np.asarray(masks)
    masks = masks if masks.dtype == bool else masks > 0
    n = len(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    if masks.shape != images.shape[:3] or labels.shape != (n,):
        raise ValueError(f"images {images.shape}, masks {masks.shape} and labels {labels.shape} do not match")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    t0 = time.perf_counter()
    model = model.to(device).eval()
    res = pre.resolution
    correct_all = 0
    usable_idx: list[np.ndarray] = []
    correct = {k: 0 for k in ("original",) + ABLATIONS}
    # per class: [images, correct noisy_fg, correct noisy_bg] (noisy counts pooled over trials)
    noisy: dict[int, list[int]] = {}
    ious_top: list[np.ndarray] = []
    ious_half: list[np.ndarray] = []
    layer_name = None
    bar = tqdm(total=n, desc="hard imagenet", disable=not progress, leave=False, unit="img")
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(s + batch_size, n))
        x, m = resize_for_model(images[idx], masks[idx], res)
        y = labels[idx]
        ok = predict(model, x, pre, device, batch_size) == y
        correct_all += int(ok.sum())
        u = np.flatnonzero(m.reshape(len(idx), -1).any(axis=1))
        bar.update(len(idx))
        if not u.size:
            continue
        xu, mu, yu, gu = x[u], m[u], y[u], idx[u]
        usable_idx.append(gu)
        correct["original"] += int(ok[u].sum())
        for name, fn in (("grey_object", grey_object), ("grey_box", grey_box), ("fill_box", fill_box)):
            correct[name] += int((predict(model, fn(xu, mu), pre, device, batch_size) == yu).sum())
        for c in np.unique(yu).tolist():
            noisy.setdefault(c, [0, 0, 0])[0] += int((yu == c).sum()) * trials
        for t in range(trials):
            noise = np.stack([noise_draw(seed, int(i), t, xu.shape[1:], noise_std) for i in gu])
            ok_fg = predict(model, add_noise(xu, mu, noise), pre, device, batch_size) == yu
            ok_bg = predict(model, add_noise(xu, ~mu, noise), pre, device, batch_size) == yu
            for c in np.unique(yu).tolist():
                noisy[c][1] += int(ok_fg[yu == c].sum())
                noisy[c][2] += int(ok_bg[yu == c].sum())
        if saliency:
            if layer_name is None:
                from .data import BatchAugment

                example = (
                    BatchAugment(pre.mean, pre.std)
                    .to(device)
                    .normalize(torch.as_tensor(xu[:1]).permute(0, 3, 1, 2).to(device))
                )
                layer_name = saliency_layer or find_cam_layer(model, example)[0]
            maps = grad_cam(model, xu, yu, layer=layer_name, preprocessing=pre, batch_size=batch_size)
            ious_top.append(saliency_iou(maps, mu))
            ious_half.append(saliency_iou(maps, mu, threshold=0.5))
    bar.close()
    usable = np.concatenate(usable_idx) if usable_idx else np.zeros(0, dtype=np.int64)
    nu = len(usable)
    ablation_accuracy = {k: _pct(v, nu) for k, v in correct.items()}
    ablation_drop = {
        k: (ablation_accuracy["original"] - ablation_accuracy[k]) if nu else None for k in ABLATIONS
    }
    classes = sorted(noisy)
    fg_by_class = {c: noisy[c][1] / noisy[c][0] for c in classes}
    bg_by_class = {c: noisy[c][2] / noisy[c][0] for c in classes}
    if classes:
        acc_fg = float(np.mean([fg_by_class[c] for c in classes]))
        acc_bg = float(np.mean([bg_by_class[c] for c in classes]))
        rfs: float | None = compute_rfs(acc_fg, acc_bg)
    else:
        acc_fg = acc_bg = float("nan")
        rfs = None

    def nanmean_pct(parts: list[np.ndarray]) -> float | None:
        v = np.concatenate(parts) if parts else np.zeros(0)
        v = v[~np.isnan(v)]
        return 100.0 * float(v.mean()) if v.size else None

    name_of = (lambda c: class_names[c]) if class_names else str
    report: dict[str, Any] = {
        "accuracy": _pct(correct_all, n),
        "ablation_accuracy": ablation_accuracy,
        "ablation_drop": ablation_drop,
        "noisy_fg_accuracy": 100.0 * acc_fg if classes else None,
        "noisy_bg_accuracy": 100.0 * acc_bg if classes else None,
        "rfs": rfs,
        "saliency_iou": nanmean_pct(ious_top) if saliency else None,
        "details": {
            "num_images": n,
            "num_with_mask": nu,
            "resolution": res,
            "grey_value": GREY,
            "noise_std": noise_std,
            "trials": trials,
            "seed": seed,
            "noisy_accuracy_kind": "class-balanced (mean of per-class accuracies, pooled over trials)",
            "noisy_fg_accuracy_by_class": {name_of(c): 100.0 * fg_by_class[c] for c in classes},
            "noisy_bg_accuracy_by_class": {name_of(c): 100.0 * bg_by_class[c] for c in classes},
            "saliency": {
                "method": "grad-cam",
                "layer": layer_name,
                "target": "true class",
                "iou_top_area": nanmean_pct(ious_top),
                "iou_threshold_0.5": nanmean_pct(ious_half),
            }
            if saliency
            else None,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }
    if not nu:
        report["details"]["note"] = "no image has a non-empty mask: only the accuracy can be measured"
    return report


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def hard_imagenet_markdown(report: dict[str, Any], title: str = "Hard ImageNet measures") -> str:
    """A small Markdown table of a report from :func:`evaluate_hard_imagenet`."""
    a, d, det = report["ablation_accuracy"], report["ablation_drop"], report["details"]
    lines = [
        f"# {title}",
        "",
        "| accuracy | grey object | grey box | fill box | noisy fg | noisy bg | RFS | saliency IoU |",
        "|" + " --- |" * 8,
        f"| {_fmt(report['accuracy'])} | {_fmt(a.get('grey_object'))} | {_fmt(a.get('grey_box'))} "
        f"| {_fmt(a.get('fill_box'))} | {_fmt(report['noisy_fg_accuracy'])} | {_fmt(report['noisy_bg_accuracy'])} "
        f"| {_fmt(report['rfs'], 3)} | {_fmt(report['saliency_iou'])} |",
        "",
        "| drop when ablated (points) | grey object | grey box | fill box |",
        "| --- | --- | --- | --- |",
        f"| from {_fmt(a.get('original'))} | {_fmt(d.get('grey_object'))} | {_fmt(d.get('grey_box'))} "
        f"| {_fmt(d.get('fill_box'))} |",
        "",
        f"{det['num_images']} images, {det['num_with_mask']} with an object mask, at {det['resolution']} px. "
        "Accuracy in percent: `accuracy` on every image; ablations on the masked images (object or its box "
        f"set to grey {det['grey_value']}, or the box filled with the image's background; a larger drop means "
        f"more reliance on the object); noisy fg / bg: Gaussian noise of std {det['noise_std']} (on [0, 1]) on "
        f"the object / the background, class-balanced, {det['trials']} trial(s). RFS = (noisy bg - noisy fg) / "
        "(2 min(avg, 1 - avg)) in [-1, 1], higher = more sensitive to the object. Saliency IoU: Grad-CAM of the "
        "true class vs the mask, the map's top pixels as many as the mask's.",
    ]
    sal = det.get("saliency")
    if sal:
        lines += [
            "",
            f"Grad-CAM layer `{sal.get('layer')}`; IoU with the release's 0.5 threshold: "
            f"{_fmt(sal.get('iou_threshold_0.5'))}.",
        ]
    if det.get("note"):
        lines += ["", f"Note: {det['note']}"]
    return "\n".join(lines) + "\n"


def plot_hard_imagenet(report: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Bar chart of the accuracy under each condition (PNG, matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = report["ablation_accuracy"]
    bars = {
        "original": a.get("original"),
        "grey object": a.get("grey_object"),
        "grey box": a.get("grey_box"),
        "fill box": a.get("fill_box"),
        "noisy fg": report.get("noisy_fg_accuracy"),
        "noisy bg": report.get("noisy_bg_accuracy"),
    }
    names = [k for k, v in bars.items() if v is not None]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    colours = ["#3b75af", "#9e9e9e", "#9e9e9e", "#9e9e9e", "#c44e52", "#55a868"][: len(names)]
    drawn = ax.bar(names, [bars[k] for k in names], color=colours)
    ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)")
    rfs = report.get("rfs")
    ax.set_title(title or f"Hard ImageNet measures (RFS {_fmt(rfs, 3)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_hard_imagenet_report(
    report: dict[str, Any], output_dir: str | os.PathLike, title: str = "Hard ImageNet measures"
) -> dict[str, str]:
    """Write ``hard_imagenet.json``, ``hard_imagenet.md`` and ``hard_imagenet.png`` into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": str(out / "hard_imagenet.json"),
        "markdown": str(out / "hard_imagenet.md"),
        "plot": str(out / "hard_imagenet.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(_json_safe(report), f, indent=2, allow_nan=False)
    Path(paths["markdown"]).write_text(hard_imagenet_markdown(report, title))
    plot_hard_imagenet(report, paths["plot"])
    return paths
