"""An image folder: ``<root>/<split>/<class>/<file>``, optional masks in a parallel tree.

Any format PIL reads is accepted. Masks live under ``mask_dir`` at the same relative path, either
with the image's own file name or with its extension replaced by ``.png``; any non-zero pixel is
foreground. Split folders named ``val``, ``valid`` or ``dev`` are written as ``validation``.

Nothing is dropped silently: a file that cannot be decoded, a mask of the wrong size, a class folder
that is not in the class list, or a file outside any class folder becomes a :class:`RejectedInput`
whose reason names the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import RejectedInput, Sample, Source, canonical_split, order_splits


def read_rgb(path: Path) -> Image.Image:
    """Decode an image file fully as RGB, honouring EXIF orientation; RejectedInput if it cannot."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RejectedInput(f"{path}: cannot be read ({e.strerror})", path=str(path)) from e
    if size == 0:
        raise RejectedInput(f"{path}: empty file (0 bytes)", path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(white, rgba).convert("RGB")
                if im.mode == "I;16" or im.mode.startswith("I"):
                    arr = np.asarray(im, dtype=np.float64)
                    peak = 65535.0 if arr.max() > 255 else 255.0
                    im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
                return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise RejectedInput(f"{path}: not an image PIL can identify", path=str(path)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedInput(f"{path}: image too large ({e})", path=str(path)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise RejectedInput(f"{path}: cannot be decoded ({e})", path=str(path)) from e


def read_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """Read a mask file (non-zero = foreground) as mode L 0/255, checking it matches ``size``."""
    try:
        with Image.open(path) as m:
            m.load()
            arr = np.asarray(m.convert("L") if m.mode not in ("1", "L", "I", "I;16") else m)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RejectedInput(f"mask {path}: cannot be decoded ({e})", stage="mask", path=str(path)) from e
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise RejectedInput(
            f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {size[0]}x{size[1]}",
            stage="mask",
            path=str(path),
        )
    return Image.fromarray((arr != 0).astype(np.uint8) * 255, "L")


class ImageFolderSource(Source):
    """Labelled images in ``<data_dir>/<split>/<class>/<file>`` (see the module docstring).

    Args:
        data_dir: the root folder.
        mask_dir: optional root of a parallel tree of masks.
        classes: the class list; by default the sorted class folders of ``train`` (or, without a
            train split, of every split).
        splits: restrict to these split names (after aliasing).
    """

    name = "folder"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        mask_dir: str | os.PathLike | None = None,
        classes: list[str] | None = None,
        splits: list[str] | None = None,
    ):
        self.root = Path(data_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data-dir {self.root} is not a folder")
        self.mask_root = Path(mask_dir) if mask_dir else None
        if self.mask_root is not None and not self.mask_root.is_dir():
            raise FileNotFoundError(f"--mask-dir {self.mask_root} is not a folder")
        found: dict[str, Path] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            split = canonical_split(d.name)
            if split in found:
                raise ValueError(
                    f"{self.root}: both {found[split].name}/ and {d.name}/ would be split {split!r}"
                )
            found[split] = d
        if splits:
            missing = [s for s in splits if s not in found]
            if missing:
                raise FileNotFoundError(f"{self.root}: no split folder for {missing}; found {sorted(found)}")
            found = {s: found[s] for s in splits}
        if not found:
            raise FileNotFoundError(
                f"{self.root} has no split folders (expected <root>/<split>/<class>/<file>)"
            )
        self.split_dirs = found
        if classes is None:
            class_splits = ["train"] if "train" in found else list(found)
            classes = sorted(
                {
                    c.name
                    for s in class_splits
                    for c in found[s].iterdir()
                    if c.is_dir() and not c.name.startswith(".")
                }
            )
        if not classes:
            raise ValueError(f"{self.root}: no class folders found under {', '.join(found)}")
        self.class_names = list(classes)
        index = {c: i for i, c in enumerate(self.class_names)}
        self._files: dict[str, list[Path]] = {}
        self._labels: dict[str, np.ndarray] = {}
        for split, d in found.items():
            files = sorted(
                p
                for p in d.rglob("*")
                if p.is_file() and not any(q.startswith(".") for q in p.relative_to(d).parts)
            )
            self._files[split] = files
            labels = []
            for p in files:
                rel = p.relative_to(d).parts
                labels.append(index.get(rel[0], -1) if len(rel) > 1 else -1)
            self._labels[split] = np.asarray(labels, dtype=np.int64)

    def splits(self) -> list[str]:
        return order_splits(self._files)

    def size(self, split: str) -> int:
        return len(self._files[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def path(self, split: str, index: int) -> Path:
        return self._files[split][index]

    def _mask_path(self, split: str, path: Path) -> Path | None:
        if self.mask_root is None:
            return None
        rel = path.relative_to(self.split_dirs[split])
        for candidate in (
            self.mask_root / self.split_dirs[split].name / rel,
            (self.mask_root / self.split_dirs[split].name / rel).with_suffix(".png"),
        ):
            if candidate.is_file():
                return candidate
        return None

    def load(self, split: str, index: int) -> Sample:
        path = self._files[split][index]
        rel = path.relative_to(self.split_dirs[split])
        if len(rel.parts) < 2:
            raise RejectedInput(
                f"{path}: not inside a class folder (<root>/<split>/<class>/<file>)",
                stage="label",
                path=str(path),
            )
        label = int(self._labels[split][index])
        if label < 0:
            raise RejectedInput(
                f"{path}: class folder {rel.parts[0]!r} is not in the class list {self.class_names}",
                stage="label",
                path=str(path),
            )
        image = read_rgb(path)
        mask = None
        mask_path = self._mask_path(split, path)
        if mask_path is not None:
            mask = read_mask(mask_path, image.size)
        return Sample(
            id=self.item_id(split, index),
            split=split,
            index=index,
            image=image,
            label=label,
            mask=mask,
            bg_label=-1,
            caption="",  # a folder has no captions; the generation job makes one (describe.py)
            path=str(path),
            meta={"object": self.class_names[label], "file": str(rel)},
        )

    def describe(self) -> dict:
        return {
            "source": self.name,
            "data_dir": str(self.root),
            "mask_dir": str(self.mask_root) if self.mask_root else None,
            "classes": self.class_names,
            "files": {s: len(f) for s, f in self._files.items()},
        }
