"""An image folder: ``<root>/<split>/<class>/<file>``, optional masks in a parallel tree.

Any format PIL reads is accepted; :mod:`augment.inputs` turns every mode into upright RGB (its
docstring says how). Masks live under ``mask_dir`` at the same relative path, either with the image's
own file name or with its extension replaced by ``.png``; any non-zero pixel is foreground. Split
folders named ``val``, ``valid`` or ``dev`` are written as ``validation``.

Nothing is dropped silently: a file that cannot be decoded (or is a broken link), an image over the
pixel limit, a mask of the wrong size, a class folder that is not in the class list, or a file
outside any class folder becomes a :class:`RejectedInput` whose reason names the file. Ids are
``folder/<split>/<index>`` over the sorted file list, so file names never become ids or paths (two
files can never share an id); names appear only in reasons and recipes, through
:func:`augment.inputs.display_name` (control characters escaped, very long names shortened).
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs import (
    DEFAULT_MAX_PIXELS,
    check_max_pixels,
    display_name,
    read_mask_image,
    read_upright,
    set_pixel_limit,
)
from .base import RejectedInput, Sample, Source, canonical_split, order_splits

# what the datasets library accepts as a split name (it names the parquet files too)
_SPLIT_NAME = re.compile(r"\w+(\.\w+)*")


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def read_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file fully as upright RGB (:mod:`augment.inputs`); RejectedInput if it cannot."""
    return read_upright(path, max_pixels)[0]


def read_mask(path: Path, size: tuple[int, int], image_orientation: int = 1) -> Image.Image:
    """Read a mask file (non-zero = foreground) as mode L 0/255, checking it matches ``size``.

    ``image_orientation``: the EXIF orientation of its image (a mask of the stored size is turned
    like the image; :func:`augment.inputs.fit_mask`).
    """
    return read_mask_image(path, size, image_orientation)


def _split_name_problem(name: str) -> str | None:
    """Why a split folder name cannot name a split of the written dataset, or None."""
    if not _SPLIT_NAME.fullmatch(name):
        return "split names must be letters, digits and underscores (dots between words)"
    return None


def list_files(folder: Path) -> list[Path]:
    """Every non-folder entry under ``folder`` (hidden names skipped), sorted.

    Symbolic links to folders are followed (each real folder once, so a link loop ends); broken
    links, sockets and other non-files are listed too, so that reading them records a rejection
    instead of their being dropped silently.
    """
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        out += [Path(dirpath) / n for n in filenames if not n.startswith(".")]
    return sorted(out)


class ImageFolderSource(Source):
    """Labelled images in ``<data_dir>/<split>/<class>/<file>`` (see the module docstring).

    Args:
        data_dir: the root folder.
        mask_dir: optional root of a parallel tree of masks.
        classes: the class list; by default the sorted class folders of ``train`` (or, without a
            train split, of every split). Names are compared after Unicode NFC normalisation, so a
            folder written in decomposed form (as some file systems store it) matches.
        splits: restrict to these split names (after aliasing).
        max_pixels: images (and masks) with more pixels are rejected (None or 0: no limit).
    """

    name = "folder"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        mask_dir: str | os.PathLike | None = None,
        classes: list[str] | None = None,
        splits: list[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.root = Path(data_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data-dir {self.root} is not a folder")
        self.mask_root = Path(mask_dir) if mask_dir else None
        if self.mask_root is not None and not self.mask_root.is_dir():
            raise FileNotFoundError(f"--mask-dir {self.mask_root} is not a folder")
        self.max_pixels = check_max_pixels(max_pixels)
        set_pixel_limit(self.max_pixels)
        found: dict[str, Path] = {}
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            split = canonical_split(_nfc(d.name))
            problem = _split_name_problem(split)
            if problem:
                raise ValueError(
                    f"{self.root}: split folder {display_name(d.name)!r} cannot be a split name: {problem}"
                )
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
                    _nfc(c.name)
                    for s in class_splits
                    for c in found[s].iterdir()
                    if c.is_dir() and not c.name.startswith(".")
                }
            )
        else:
            classes = [_nfc(c) for c in classes]
            repeated = sorted({c for c in classes if classes.count(c) > 1})
            if repeated:
                raise ValueError(f"--classes names {repeated} more than once")
        if not classes:
            raise ValueError(f"{self.root}: no class folders found under {', '.join(found)}")
        self.class_names = list(classes)
        index = {c: i for i, c in enumerate(self.class_names)}
        self._files: dict[str, list[Path]] = {}
        self._labels: dict[str, np.ndarray] = {}
        for split, d in found.items():
            files = list_files(d)
            self._files[split] = files
            labels = []
            for p in files:
                rel = p.relative_to(d).parts
                labels.append(index.get(_nfc(rel[0]), -1) if len(rel) > 1 else -1)
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
        where = display_name(path)
        if len(rel.parts) < 2:
            raise RejectedInput(
                f"{where}: not inside a class folder (<root>/<split>/<class>/<file>)",
                stage="label",
                path=str(path),
            )
        label = int(self._labels[split][index])
        if label < 0:
            raise RejectedInput(
                f"{where}: class folder {display_name(rel.parts[0])!r} is not in the class list "
                f"{self.class_names}",
                stage="label",
                path=str(path),
            )
        image, turned = read_upright(path, self.max_pixels)
        mask = None
        mask_path = self._mask_path(split, path)
        if mask_path is not None:
            mask = read_mask_image(mask_path, image.size, turned, self.max_pixels)
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
            meta={"object": self.class_names[label], "file": display_name(rel)},
        )

    def describe(self) -> dict:
        return {
            "source": self.name,
            "data_dir": str(self.root),
            "mask_dir": str(self.mask_root) if self.mask_root else None,
            "classes": self.class_names,
            "files": {s: len(f) for s, f in self._files.items()},
            "max_image_pixels": self.max_pixels,
        }
