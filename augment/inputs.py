"""Decoding user images and masks: every odd-but-good file becomes RGB, every bad one a rejection.

The folder, Background Challenge, Hard ImageNet and hub sources read pixels through these functions,
so a file behaves the same whichever source it comes from. What each case becomes (the table with
its tests is docs/RELIABILITY.md, "Bad input and safe defaults"):

* **kept as is**: RGB; grayscale and 1-bit images (the grey value in all three channels);
* **converted**: transparency of any kind (RGBA, LA, PA, a palette or RGB with a ``transparency``
  entry) is composited on **white** (the usual page colour for cut-out product photos; black would
  make dark objects vanish); palette images take their palette colours; CMYK uses PIL's conversion
  (no ICC colour management); 16-bit images (``I;16*``, and ``I`` holding 0..65535 as 16-bit PNGs
  decode) keep their high byte, ``v >> 8``; float images (``F``) are read as 0..1 when their largest
  value is at most 1, else as 0..255; EXIF orientation is applied, so pixels are upright;
* **rejected** (stage ``read``, the reason names the file): a 0-byte file, a file that cannot be
  opened, a file that is not an image PIL can identify, a truncated or corrupt one, an image with
  more than ``max_pixels`` pixels (``--max-image-pixels``; a decompression-bomb guard), pixel values
  no scaling is defined for (negative or > 65535 integers, floats outside 0..255).

Masks (stage ``mask``): any non-zero pixel is foreground (for palette masks: any non-zero index, as in
VOC-style masks; for colour masks: any non-zero colour channel, alpha ignored). A mask with its own
EXIF orientation is turned upright. A mask must have its image's upright size; a mask that has the
image's *stored* size instead (a 90-degree EXIF rotation of a non-square photo) was drawn on the
stored pixels and gets the same rotation as its image. Any other size is rejected.
"""

from __future__ import annotations

import io
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .sources.base import RejectedInput

# PIL's own warning threshold (about 89.5 megapixels): a 9500 x 9400 photo passes, a bomb does not
DEFAULT_MAX_PIXELS = 89_478_485
MAX_NAME_CHARS = 200  # longer names are shortened (with their end kept) where they are shown
_EXIF_ORIENTATION = 0x0112


def display_name(name: str | os.PathLike) -> str:
    """``name`` as it may appear in a reason or a recipe: NFC-normalised, control characters written
    as ``\\xNN`` escapes, at most ``MAX_NAME_CHARS`` characters (the middle elided)."""
    text = unicodedata.normalize("NFC", os.fspath(name))
    text = "".join(
        f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in text
    )  # NUL, newlines, escape sequences: a reason stays one readable line
    if len(text) > MAX_NAME_CHARS:
        keep = (MAX_NAME_CHARS - 3) // 2
        text = f"{text[:keep]}...{text[-keep:]}"
    return text


def set_pixel_limit(max_pixels: int | None) -> None:
    """Let PIL open images up to ``max_pixels`` (None or 0: any size); our own check does the refusing.

    PIL refuses images above twice its ``MAX_IMAGE_PIXELS`` before our check sees them, so a limit
    above that (or none) lifts PIL's for the whole process.
    """
    if not max_pixels:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_max_pixels(max_pixels: int | None, flag: str = "--max-image-pixels") -> int | None:
    """``max_pixels`` validated (None or 0: no limit), or a ValueError naming the flag."""
    if max_pixels is None or max_pixels == 0:
        return None
    if max_pixels < 0:
        raise ValueError(f"{flag} must be >= 0 (0: no limit), got {max_pixels}")
    return int(max_pixels)


def _too_large(what: str, size: tuple[int, int], max_pixels: int, path: str | None, stage: str):
    w, h = size
    return RejectedInput(
        f"{what}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
        "(--max-image-pixels; a guard against decompression bombs)",
        stage=stage,
        path=path,
    )


def open_image(
    source: str | os.PathLike | bytes | io.BytesIO,
    what: str,
    path: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    stage: str = "read",
) -> Image.Image:
    """Open and fully decode an image file or its bytes (mode unchanged); RejectedInput if it cannot.

    ``what`` names the input in the reason (a file name, or ``dataset split row``).
    """
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        try:
            size = p.stat().st_size
        except OSError as e:  # a broken symbolic link, a file that went away
            raise RejectedInput(f"{what}: cannot be read ({e.strerror})", stage=stage, path=path) from e
        if not p.is_file():
            raise RejectedInput(f"{what}: not a regular file", stage=stage, path=path)
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        size = source.getbuffer().nbytes
    if size == 0:
        raise RejectedInput(f"{what}: empty file (0 bytes)", stage=stage, path=path)
    try:
        with warnings.catch_warnings():
            # the pixel limit is ours (below); PIL's warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        with im:
            if max_pixels and im.size[0] * im.size[1] > max_pixels:
                raise _too_large(what, im.size, max_pixels, path, stage)
            im.load()
            out = im.copy()
            out.info = dict(im.info)  # keeps the EXIF block, so orientation() works on the copy
            return out
    except RejectedInput:
        raise
    except UnidentifiedImageError as e:
        raise RejectedInput(f"{what}: not an image PIL can identify", stage=stage, path=path) from e
    except Image.DecompressionBombError as e:
        raise RejectedInput(
            f"{what}: image too large ({e}; raise --max-image-pixels to read it)", stage=stage, path=path
        ) from e
    except PermissionError as e:
        raise RejectedInput(f"{what}: cannot be read ({e.strerror})", stage=stage, path=path) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise RejectedInput(f"{what}: cannot be decoded ({e})", stage=stage, path=path) from e


def has_transparency(im: Image.Image) -> bool:
    """True when ``im`` carries alpha (a band, or a ``transparency`` colour or palette entry)."""
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def scale_to_uint8(arr: np.ndarray, what: str, path: str | None = None) -> np.ndarray:
    """Pixel values of any numeric type as uint8 (see the module docstring for each case)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise RejectedInput(
                f"{what}: integer pixels in {lo}..{hi}, outside 0..65535 (no defined 8-bit scaling)",
                path=path,
            )
        if arr.dtype.itemsize == 1 or (hi <= 255 and arr.dtype != np.uint16):
            return arr.astype(np.uint8)  # an 8-bit image held in a wider integer array
        return (arr.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit: the high byte
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and not np.isfinite(arr).all():
            raise RejectedInput(f"{what}: float pixels include NaN or infinity", path=path)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise RejectedInput(
                f"{what}: float pixels in {lo:g}..{hi:g}, outside 0..1 and 0..255 (no defined scaling)",
                path=path,
            )
        scale = 255.0 if hi <= 1.0 else 1.0
        return np.floor(arr.astype(np.float64) * scale + 0.5).astype(np.uint8)
    raise RejectedInput(f"{what}: pixels of type {arr.dtype} are not an image", path=path)


def to_rgb(im: Image.Image, what: str, path: str | None = None) -> Image.Image:
    """An upright RGB image from any decoded image (see the module docstring for each mode)."""
    try:
        im = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:  # a malformed EXIF block
        raise RejectedInput(f"{what}: unreadable EXIF orientation ({e})", path=path) from e
    if has_transparency(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        grey = scale_to_uint8(np.asarray(im), what, path)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:  # e.g. LAB or HSV on a PIL without that conversion
        raise RejectedInput(f"{what}: colour mode {im.mode} cannot be converted to RGB", path=path) from e


def array_image(value: Any, what: str, path: str | None = None) -> Image.Image:
    """A PIL image from an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric type."""
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise RejectedInput(f"{what}: an array of shape {arr.shape} is not an image", path=path)
    return Image.fromarray(np.ascontiguousarray(scale_to_uint8(arr, what, path)))


def read_upright(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, int]:
    """Decode an image file as upright RGB, with the EXIF orientation it had (for its mask);
    RejectedInput (stage ``read``) naming the file if it cannot."""
    where = display_name(path)
    im = open_image(path, where, str(path), max_pixels)
    return to_rgb(im, where, str(path)), orientation(im)


def mask_bits(m: Image.Image) -> np.ndarray:
    """The boolean foreground of a decoded mask image: any non-zero value (index for palettes)."""
    if m.mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"):
        return np.asarray(m.convert("RGB")).any(axis=2)
    if m.mode in ("LA", "La", "PA"):
        return np.asarray(m)[..., 0] != 0
    return np.asarray(m) != 0  # 1, L, P (palette index), I, I;16, F


def fit_mask(
    bits: np.ndarray,
    image_size: tuple[int, int],
    what: str,
    path: str | None = None,
    image_orientation: int = 1,
) -> Image.Image:
    """A mode-L 0/255 mask of the image's upright ``image_size`` (W, H), or RejectedInput (``mask``).

    A mask of the image's stored (pre-EXIF) size, when that differs, is turned like its image.
    """
    h, w = bits.shape
    m = Image.fromarray(bits.astype(np.uint8) * 255, "L")
    if (w, h) == tuple(image_size):
        return m
    method = _TRANSPOSE.get(image_orientation)
    if method is not None and (h, w) == tuple(image_size):  # only 90-degree turns swap the sides
        return m.transpose(method)
    raise RejectedInput(
        f"mask {what} is {w}x{h} but its image is {image_size[0]}x{image_size[1]}",
        stage="mask",
        path=path,
    )


# EXIF orientation -> the transpose that makes the stored pixels upright (as ImageOps.exif_transpose)
_TRANSPOSE = {
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_mask_image(
    path: str | os.PathLike,
    image_size: tuple[int, int],
    image_orientation: int = 1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read a mask file (non-zero = foreground) as mode L 0/255 aligned with its upright image."""
    where = display_name(path)
    m = open_image(path, f"mask {where}", str(path), max_pixels, stage="mask")
    own = orientation(m)
    try:
        m = ImageOps.exif_transpose(m)  # a mask with its own orientation tag
    except (OSError, ValueError, SyntaxError, KeyError, TypeError) as e:
        raise RejectedInput(
            f"mask {where}: unreadable EXIF orientation ({e})", stage="mask", path=str(path)
        ) from e
    return fit_mask(mask_bits(m), image_size, where, str(path), image_orientation if own == 1 else 1)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag of a decoded image (1 = upright, also when there is none)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        return 1
    return int(value) if value in range(1, 9) else 1
