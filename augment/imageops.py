"""Pixel operations shared by the generators and the evaluation variants.

Arrays are ``(H, W, 3)`` uint8 images and ``(H, W)`` boolean masks (True = foreground); the
functions never modify their inputs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), ends exclusive


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB uint8 array from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def to_mask(mask: Image.Image | np.ndarray | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A boolean mask from a mode-L image (foreground > 127) or an array; None gives an empty mask."""
    if mask is None:
        if shape is None:
            raise ValueError("an empty mask needs a shape")
        return np.zeros(shape, dtype=bool)
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L")) > 127
    arr = np.asarray(mask)
    return arr.astype(bool) if arr.dtype == bool else arr > 127


def mask_image(mask: np.ndarray) -> Image.Image:
    """The stored form of a mask: mode L, foreground 255, background 0."""
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def mask_coverage_problem(mask: Image.Image | np.ndarray | None) -> str | None:
    """Why a foreground mask cannot give a counterfactual (it is empty, or it leaves no background),
    or None when it has both object and background pixels."""
    if mask is None:
        return "no foreground mask"
    m = to_mask(mask)
    if not m.any():
        return "the foreground mask is empty"
    if m.all():
        return "the foreground mask covers the whole image (no background)"
    return None


def mask_bbox(mask: np.ndarray, pad: int = 0) -> Box | None:
    """Bounding box of the foreground, grown by ``pad`` pixels and clipped; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (
        max(int(rows[0]) - pad, 0),
        min(int(rows[-1]) + 1 + pad, h),
        max(int(cols[0]) - pad, 0),
        min(int(cols[-1]) + 1 + pad, w),
    )


def box_mask(shape: tuple[int, int], box: Box | None) -> np.ndarray:
    """A boolean mask that is True inside ``box``."""
    out = np.zeros(shape, dtype=bool)
    if box is not None:
        y0, y1, x0, x1 = box
        out[y0:y1, x0:x1] = True
    return out


def tile_fill(image: np.ndarray, mask: np.ndarray, pad: int = 1) -> np.ndarray:
    """Remove the object by filling its bounding box with tiles of the image's largest box-free strip.

    This is the Background Challenge's ``only_bg_t``: of the four strips around the box (above,
    below, left, right; each spanning the whole image the other way) the largest is repeated over
    the box. When the box covers the whole image there is no strip, and the box is filled with the
    mean colour of the pixels outside the mask (or grey when there are none).
    """
    out = image.copy()
    box = mask_bbox(mask, pad)
    if box is None:
        return out
    h, w = mask.shape
    y0, y1, x0, x1 = box
    strips = {"top": y0 * w, "bottom": (h - y1) * w, "left": x0 * h, "right": (w - x1) * h}
    side = max(strips, key=strips.get)
    if strips[side] == 0:
        outside = image[~mask]
        out[y0:y1, x0:x1] = outside.mean(axis=0).astype(np.uint8) if outside.size else 127
        return out
    bh, bw = y1 - y0, x1 - x0
    if side in ("top", "bottom"):
        strip = image[:y0] if side == "top" else image[y1:]
        reps = -(-bh // strip.shape[0])
        out[y0:y1, x0:x1] = np.tile(strip[:, x0:x1], (reps, 1, 1))[:bh]
    else:
        strip = image[:, :x0] if side == "left" else image[:, x1:]
        reps = -(-bw // strip.shape[1])
        out[y0:y1, x0:x1] = np.tile(strip[y0:y1], (1, reps, 1))[:, :bw]
    return out


def paste(obj: np.ndarray, obj_mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``background`` with the masked pixels of ``obj`` copied onto it, unchanged."""
    if obj.shape != background.shape or obj_mask.shape != background.shape[:2]:
        raise ValueError(
            f"shape mismatch: object {obj.shape}, mask {obj_mask.shape}, background {background.shape}"
        )
    return np.where(obj_mask[..., None], obj, background)


def shift(arr: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``arr`` translated by (dy, dx) pixels; what moves in is zero (False for masks)."""
    out = np.zeros_like(arr)
    h, w = arr.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = arr[ys, xs]
    return out


def center_on(obj: np.ndarray, obj_mask: np.ndarray, target: Box) -> tuple[np.ndarray, np.ndarray]:
    """Translate an object (image and mask) so that its box centre sits on the centre of ``target``."""
    box = mask_bbox(obj_mask)
    if box is None:
        return obj, obj_mask
    dy = (target[0] + target[1]) // 2 - (box[0] + box[1]) // 2
    dx = (target[2] + target[3]) // 2 - (box[2] + box[3]) // 2
    return shift(obj, dy, dx), shift(obj_mask, dy, dx)


def resize_pair(
    image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize an image (bilinear) and its mask (nearest) to ``size`` = (H, W)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, mask
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
    return img, mask
