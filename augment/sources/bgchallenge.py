"""The Background Challenge (Xiao et al., ICLR 2021) as released: ``ROOT/<variant>/<split>/<class>/<file>``.

Layout read (any subset of it)::

    ROOT/original/train/00_dog/n02085620_10074.JPEG   training images (IN-9)
    ROOT/in9l/train/00_dog/...                        training images when there is no original/train
    ROOT/original/val/00_dog/...                      test images (written as split ``test``)
    ROOT/fg_mask/<split>/00_dog/<stem>.npy            foreground masks (bool or 0/1 arrays)
    ROOT/fg_grabcut/<split>/00_dog/<stem>.<ext>       foreground masks made with GrabCut (e.g. CLAD's)
    ROOT/only_fg/<split>/00_dog/<stem>.<ext>          the object on black
    ROOT/no_fg, only_bg_b, only_bg_t, mixed_*/...     the other shipped variants (not read here;
                                                      see :func:`debias.bgchallenge.evaluate_shipped`)

Classes are the class folders of the image trees (``00_dog`` ... ``08_fish``), ordered by their
numeric prefix; a class's name is the part after the first underscore (``00_dog`` -> ``dog``).

Splits are kept as shipped: ``train`` is written as ``train`` and ``val`` as ``test``. No validation
split is carved out of ``train`` (the published numbers are on ``val``; a validation split is the
training job's business, not the reader's).

Foreground masks, the first one found wins, matched to the image by class folder and file stem
(``x.JPEG`` matches ``x.npy`` and ``x.JPEG.npy``; never by position): ``fg_mask`` (``.npy``, any non-zero value is foreground; a shape other than the
image's is a :class:`RejectedInput` naming both), then ``fg_grabcut``, then ``only_fg`` (an image:
non-black pixels are foreground, a single-channel 0/1 or 0/255 image is read as a mask); otherwise,
with ``mask_fallback="grabcut"``, OpenCV's GrabCut from a box centred in the image with a 10% margin;
otherwise no mask (the pipeline's ``--mask-source sam|grounded`` can fill it). Where each mask came
from is recorded in ``sample.meta["recipe"]`` (``mask_from``, ``mask_file``), which the pipeline
copies into the row's recipe.

Nothing is paired by position and nothing is dropped silently: a mask file whose image does not exist
is an input of its own that is rejected with a reason naming the mask file; an image without any mask
is fine (counted in :meth:`BackgroundChallengeSource.describe`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import RejectedInput, Sample, Source
from .folder import read_rgb

VARIANTS = (
    "original",
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
)
MASK_TREES = ("fg_mask", "fg_grabcut", "only_fg")  # in order of preference
KNOWN_DIRS = (*VARIANTS, "in9l", "fg_mask", "fg_grabcut")
# split name written -> image trees tried in order (variant, split folder on disk)
IMAGE_TREES = {
    "train": (("original", "train"), ("in9l", "train")),
    "test": (("original", "val"), ("in9l", "val")),
}
# a pixel of an on-black image is foreground when a channel exceeds this (JPEG leaves near-black noise)
BLACK_LEVEL = 10
GRABCUT_MARGIN = 0.1
GRABCUT_ITERATIONS = 5

_PREFIX = re.compile(r"^(\d+)_(.+)$")


def class_name(class_dir: str) -> str:
    """``00_dog`` -> ``dog``; a folder without a numeric prefix is its own name."""
    m = _PREFIX.match(class_dir)
    return m.group(2) if m else class_dir


def class_order(class_dir: str) -> tuple[int, int, str]:
    """Sort key: by numeric prefix, then name; folders without a prefix come last."""
    m = _PREFIX.match(class_dir)
    return (0, int(m.group(1)), class_dir) if m else (1, 0, class_dir)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def class_dirs(split_dir: Path) -> list[str]:
    """The class folders of ``<variant>/<split>`` in class order (empty if it is not a folder)."""
    if not split_dir.is_dir():
        return []
    return sorted((d.name for d in split_dir.iterdir() if d.is_dir() and _visible(d)), key=class_order)


def list_files(split_dir: Path, keep: set[str] | None = None) -> dict[str, list[Path]]:
    """``{class_dir: sorted files}`` of ``<variant>/<split>`` (hidden files skipped).

    ``keep``: only these class folders. Files directly in the split folder are listed under ``""``.
    """
    out: dict[str, list[Path]] = {}
    if not split_dir.is_dir():
        return out
    for d in sorted(split_dir.iterdir(), key=lambda p: class_order(p.name)):
        if not _visible(d):
            continue
        if d.is_file():
            out.setdefault("", []).append(d)
        elif keep is None or d.name in keep:
            out[d.name] = sorted(p for p in d.rglob("*") if p.is_file() and _visible(p))
    return out


IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


def file_key(path: Path) -> str:
    """The name a file is matched by across trees: its stem, also for ``x.JPEG.npy`` (-> ``x``)."""
    stem = Path(path.stem)
    return stem.stem if stem.suffix.lower() in IMAGE_SUFFIXES else str(stem)


def non_black(arr: np.ndarray, level: int = BLACK_LEVEL) -> np.ndarray:
    """Foreground of an on-black image (H, W, 3) or (H, W): any channel above ``level``."""
    arr = np.asarray(arr)
    return (arr > level).any(axis=-1) if arr.ndim == 3 else arr > level


def read_mask_file(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) foreground mask from a ``.npy`` array or an image file, checked against ``size``.

    ``.npy``: any non-zero value is foreground (a trailing or leading axis of length 1 is dropped).
    Images: a single-channel image whose values are all 0/1 is read as a mask (non-zero), anything
    else as an object on black (:func:`non_black`). ``size`` is the image's (width, height).
    """
    w, h = size
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise RejectedInput(
                f"mask {path}: cannot be read as a .npy array ({e})", "mask", str(path)
            ) from e
        shape = tuple(arr.shape)
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
        if arr.shape != (h, w):
            raise RejectedInput(
                f"mask {path} has shape {shape} but its image has shape {(h, w)} (height, width)",
                "mask",
                str(path),
            )
        return np.asarray(arr != 0)
    try:
        with Image.open(path) as im:
            im.load()
            im_size = im.size
            arr = np.asarray(im if im.mode in ("1", "L", "I", "I;16") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RejectedInput(f"mask {path}: cannot be decoded ({e})", "mask", str(path)) from e
    if im_size != (w, h):
        raise RejectedInput(
            f"mask {path} is {im_size[0]}x{im_size[1]} but its image is {w}x{h}", "mask", str(path)
        )
    if arr.ndim == 2 and arr.max(initial=0) <= 1:
        return arr != 0
    return non_black(arr)


def _import_cv2():
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "mask_fallback='grabcut' (--bg-mask-fallback grabcut) needs OpenCV: "
            "pip install opencv-python-headless"
        ) from e
    return cv2


def grabcut_mask(
    image: Image.Image | np.ndarray,
    margin: float = GRABCUT_MARGIN,
    iterations: int = GRABCUT_ITERATIONS,
    seed: int = 0,
) -> np.ndarray:
    """GrabCut foreground (bool (H, W)) initialised with a centred box ``margin`` of each side in.

    Raises ImportError without OpenCV and ``cv2.error`` when GrabCut fails (e.g. a one-colour image).
    """
    cv2 = _import_cv2()
    rgb = np.ascontiguousarray(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image))
    h, w = rgb.shape[:2]
    x0, y0 = int(round(w * margin)), int(round(h * margin))
    rect = (x0, y0, max(1, w - 2 * x0), max(1, h - 2 * y0))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)  # GrabCut's k-means initialisation is random
    cv2.grabCut(np.ascontiguousarray(rgb[..., ::-1]), mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


@dataclass
class _Item:
    class_dir: str
    stem: str
    label: int
    image: Path | None  # None: a mask file whose image is missing (rejected on load)
    masks: dict[str, Path] = field(default_factory=dict)  # tree -> file


class BackgroundChallengeSource(Source):
    """The released Background Challenge layout (see the module docstring).

    Args:
        data_dir: the root holding ``original/``, ``fg_mask/``, ``only_fg/``, ... (or ``in9l/``).
        mask_fallback: ``"none"`` (images without a mask file have no mask) or ``"grabcut"``
            (OpenCV GrabCut from a centred box with a 10% margin).
        classes: the classes to read, by name (``dog``) or folder (``00_dog``), in the order given;
            default every class folder, by numeric prefix. Images of other classes are not inputs.
    """

    name = "bgchallenge"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        mask_fallback: str = "none",
        classes: list[str] | None = None,
    ):
        self.root = Path(data_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data-dir {self.root} is not a folder")
        if mask_fallback not in ("none", "grabcut"):
            raise ValueError(f"mask_fallback must be 'none' or 'grabcut', got {mask_fallback!r}")
        if mask_fallback == "grabcut":
            _import_cv2()  # fail before reading anything
        self.mask_fallback = mask_fallback
        top = sorted(d.name for d in self.root.iterdir() if d.is_dir() and _visible(d))
        self.variants_found = [v for v in KNOWN_DIRS if v in top]
        self.other_dirs = [d for d in top if d not in KNOWN_DIRS]
        # which tree each split's images come from
        self.image_trees: dict[str, tuple[str, str]] = {}
        for split, candidates in IMAGE_TREES.items():
            for variant, disk in candidates:
                if (self.root / variant / disk).is_dir():
                    self.image_trees[split] = (variant, disk)
                    break
        if not self.image_trees:
            raise FileNotFoundError(
                f"{self.root} has none of original/train, in9l/train, original/val, in9l/val "
                f"(the Background Challenge layout <variant>/<split>/<class>/<file>); it has {top}"
            )
        all_dirs = sorted(
            {c for v, d in self.image_trees.values() for c in class_dirs(self.root / v / d)}, key=class_order
        )
        if not all_dirs:
            raise ValueError(f"{self.root}: no class folders under {self._tree_names()}")
        by_name: dict[str, str] = {}
        for d in all_dirs:
            if class_name(d) in by_name:
                raise ValueError(f"{self.root}: class folders {by_name[class_name(d)]} and {d} are one class")
            by_name[class_name(d)] = d
        if classes:
            chosen = []
            for c in classes:
                d = c if c in all_dirs else by_name.get(c)
                if d is None:
                    raise ValueError(f"class {c!r} is not among {[class_name(x) for x in all_dirs]}")
                chosen.append(d)
        else:
            chosen = all_dirs
        self.class_dirs = list(chosen)
        self.class_names = [class_name(d) for d in chosen]
        self.skipped_classes = [d for d in all_dirs if d not in chosen]
        label_of = {d: i for i, d in enumerate(self.class_dirs)}
        keep = set(self.class_dirs)
        self._items: dict[str, list[_Item]] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._counts: dict[str, dict[str, int]] = {}
        for split, (variant, disk) in self.image_trees.items():
            items: list[_Item] = []
            by_key: dict[tuple[str, str], list[_Item]] = {}
            for cdir, files in list_files(self.root / variant / disk, keep).items():
                for f in files:
                    item = _Item(cdir, file_key(f), label_of.get(cdir, -1), f)
                    items.append(item)
                    by_key.setdefault((cdir, item.stem), []).append(item)
            orphans: dict[tuple[str, str], _Item] = {}
            for tree in MASK_TREES:
                for cdir, files in list_files(self.root / tree / disk, keep).items():
                    for f in files:
                        key = (cdir, file_key(f))
                        targets = by_key.get(key)
                        if targets is None:
                            orphan = orphans.setdefault(
                                key, _Item(cdir, key[1], label_of.get(cdir, -1), None)
                            )
                            targets = [orphan]
                        for t in targets:
                            t.masks.setdefault(tree, f)  # two files of one stem in a tree: the first
            items.extend(orphans[k] for k in sorted(orphans, key=lambda k: (class_order(k[0]), k[1])))
            self._items[split] = items
            self._labels[split] = np.asarray([it.label for it in items], dtype=np.int64)
            counts: Counter[str] = Counter()
            for it in items:
                if it.image is None:
                    counts["mask_without_image"] += 1
                elif it.masks:
                    counts[next(t for t in MASK_TREES if t in it.masks)] += 1
                else:
                    counts["grabcut" if mask_fallback == "grabcut" else "none"] += 1
            self._counts[split] = dict(counts)

    def _tree_names(self) -> str:
        return ", ".join(f"{v}/{d}" for v, d in self.image_trees.values())

    def splits(self) -> list[str]:
        return [s for s in IMAGE_TREES if s in self._items]

    def size(self, split: str) -> int:
        return len(self._items[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def load(self, split: str, index: int) -> Sample:
        item = self._items[split][index]
        if item.image is None:
            files = [self._rel(p) for p in item.masks.values()]
            variant, disk = self.image_trees[split]
            raise RejectedInput(
                f"mask {files[0]} has no image: no {variant}/{disk}/{item.class_dir}/{item.stem}.* "
                f"(mask files of this stem: {', '.join(files)})",
                stage="mask",
                path=str(self.root / files[0]),
            )
        path = item.image
        if item.label < 0:  # a file directly in the split folder
            raise RejectedInput(
                f"{path}: not inside a class folder (<variant>/<split>/<class>/<file>)",
                stage="label",
                path=str(path),
            )
        image = read_rgb(path)
        mask, recipe = None, {"mask_from": "none", "mask_file": None}
        tree = next((t for t in MASK_TREES if t in item.masks), None)
        if tree is not None:
            mask = read_mask_file(item.masks[tree], image.size)
            recipe = {"mask_from": tree, "mask_file": self._rel(item.masks[tree])}
        elif self.mask_fallback == "grabcut":
            import cv2

            try:
                mask = grabcut_mask(image)
                recipe = {
                    "mask_from": "grabcut",
                    "mask_file": None,
                    "grabcut": {"margin": GRABCUT_MARGIN, "iterations": GRABCUT_ITERATIONS, "seed": 0},
                }
            except cv2.error as e:
                recipe = {"mask_from": "none", "mask_file": None, "mask_note": f"GrabCut failed: {e}"}
        rel = self._rel(path)
        recipe["file"] = rel
        return Sample(
            id=self.item_id(split, index),
            split=split,
            index=index,
            image=image,
            label=item.label,
            mask=None if mask is None else Image.fromarray(mask.astype(np.uint8) * 255, "L"),
            bg_label=-1,  # the background class of a real photograph is unknown
            caption="",
            path=str(path),
            meta={"object": self.class_names[item.label], "file": rel, "recipe": recipe},
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "data_dir": str(self.root),
            "variants_found": self.variants_found,
            "other_dirs": self.other_dirs,
            "image_trees": {s: f"{v}/{d}" for s, (v, d) in self.image_trees.items()},
            "split_note": "splits as shipped: train -> train, val -> test (no validation split is made)",
            "files": {s: len(items) for s, items in self._items.items()},
            "masks": self._counts,
            "mask_fallback": self.mask_fallback,
            "classes": self.class_names,
            "class_dirs": self.class_dirs,
            "skipped_classes": self.skipped_classes,
        }
