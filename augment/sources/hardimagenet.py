"""Hard ImageNet (Moayeri, Singla, Feizi; NeurIPS 2022 Datasets and Benchmarks): 15 ImageNet classes
with strong spurious cues, and object segmentations for them.

Layout, as released (github.com/mmoayeri/HardImageNet, ``datasets/hard_imagenet.py``):

* images come from an ImageNet (ILSVRC-2012) root: ``<data_dir>/<split>/<wnid>/<file>``;
* masks from the Hard ImageNet download: ``<mask_dir>/<split>/<wnid>_<file>``, where ``<file>`` is the
  ImageNet file name *including its extension* (``train/n03218198_n03218198_1234.JPEG``,
  ``val/n03218198_ILSVRC2012_val_00000123.JPEG``). ``<wnid>_<file stem>.png`` is accepted too. Any
  non-zero mask pixel is object (the release does ``mask[mask > 0] = 1``).

Split folders are the release's ``train`` and ``val``. Hard ImageNet's ``val`` (ImageNet's validation
images; 750 masks, the set every number in the paper is measured on) has no held-out twin, and its
README calls it the validation split, so it is written as split ``validation`` (pass
``val_split="test"`` to write it as ``test``). With the default, evaluate it with
``--split validation``. Other folders (ImageNet's ``test``, the release's ``meta``) are ignored.

Classes are the 15 of the release, in the release's label order (its fine-tuning label ``i`` is
``CLASSES[i]``), named as its ``imagenet_classnames`` names them. ``classes`` selects a subset by name
(or wnid). Folders of other ImageNet classes under ``data_dir`` are ignored, not rejected: pointing
``--data-dir`` at a full ImageNet root must not turn 1.26M unrelated images into rejections.

The release reads the 15 ImageNet indices from a pickle that is not public code, so one wnid could not
be confirmed: "sunglasses" is ImageNet class 837 ``n04356056`` ("sunglasses, dark glasses, shades")
here; ImageNet also has class 836 ``n04355933`` ("sunglass"). When the mask folder holds masks named
``n04355933_*``, that synset's folder is read as "sunglasses" too, so either choice of the release is
followed.

Items of a split, each an input that becomes a row or a rejection:

* every image of a selected class folder; its mask when one is found, else ``mask=None`` (the
  pipeline's segmentation stage can fill it);
* every mask of a selected class whose image is not in its class folder. If the image is found
  directly under the split folder (ImageNet's ``val`` is often distributed flat), it is read from
  there; otherwise the item is rejected (stage ``mask``) with the mask file named;
* a second mask file of an image that already has one (say both ``<wnid>_<file>`` and
  ``<wnid>_<stem>.png``): the released name is used, the other is rejected (stage ``mask``);
* every file of the mask folder whose name is not ``<wnid>_<file>`` or whose wnid is not one of the
  15 classes: rejected (stage ``mask``), naming the file.

A mask whose size differs from its image's is rejected (stage ``mask``) naming the file and both sizes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import RejectedInput, Sample, Source
from .folder import read_mask, read_rgb

# (name, wnid) in the release's label order; names as the release's imagenet_classnames spell them.
CLASSES: tuple[tuple[str, str], ...] = (
    ("dog sled", "n03218198"),
    ("howler monkey", "n02492660"),
    ("seat belt", "n04162706"),
    ("ski", "n04228054"),
    ("sunglasses", "n04356056"),
    ("swimming cap", "n02807133"),
    ("balance beam", "n02777292"),
    ("gymnastics horizontal bar", "n03535780"),
    ("patio", "n03899768"),
    ("hockey puck", "n04019541"),
    ("miniskirt", "n03770439"),
    ("keyboard space bar", "n04264628"),
    ("volleyball", "n04540053"),
    ("baseball player", "n09835506"),
    ("snorkel", "n04251144"),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, _ in CLASSES)
WNIDS: dict[str, str] = dict(CLASSES)
# other synsets read as a class when the mask folder names masks with them (see the module docstring)
WNID_ALIASES: dict[str, tuple[str, ...]] = {"sunglasses": ("n04355933",)}

SPLIT_FOLDERS = ("train", "val")
MASK_NAME = re.compile(r"^(n\d{8})_(.+)$")


@dataclass(frozen=True)
class _Item:
    """One input of a split: an image (maybe with a mask), or a mask that cannot be used."""

    label: int
    wnid: str | None
    image: Path | None
    mask: Path | None
    problem: str = ""  # non-empty: the item is rejected with this reason (stage "mask")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and not e.name.startswith("."))


def resolve_classes(classes: list[str] | None) -> list[str]:
    """Class names of a selection given by name (any case, ``_`` for spaces) or wnid; all 15 by default."""
    if not classes:
        return list(CLASS_NAMES)
    by_key = {n: n for n in CLASS_NAMES} | {w: n for n, w in CLASSES}
    out, unknown = [], []
    for c in classes:
        key = c.strip()
        name = by_key.get(key) or by_key.get(key.lower().replace("_", " "))
        if name is None:
            unknown.append(c)
        elif name not in out:
            out.append(name)
    if unknown:
        raise ValueError(
            f"--classes: {unknown} not among the 15 Hard ImageNet classes: "
            + ", ".join(f"{n} ({w})" for n, w in CLASSES)
        )
    return out


class HardImageNetSource(Source):
    """The Hard ImageNet classes of an ImageNet root, with the release's masks (see the module docstring).

    Args:
        data_dir: the ImageNet root (``<split>/<wnid>/<file>``; ``val`` may also be flat).
        mask_dir: the Hard ImageNet root (``<split>/<wnid>_<file>``); None: no masks.
        classes: a subset of the 15 classes, by name or wnid, in the order given (default: all, in
            the release's label order).
        val_split: the split name ``val`` is written as (``validation``, or ``test``).
    """

    name = "hardimagenet"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        mask_dir: str | os.PathLike | None = None,
        classes: list[str] | None = None,
        val_split: str = "validation",
    ):
        self.root = Path(data_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--data-dir {self.root} is not a folder")
        self.mask_root = Path(mask_dir) if mask_dir else None
        if self.mask_root is not None and not self.mask_root.is_dir():
            raise FileNotFoundError(f"--mask-dir {self.mask_root} is not a folder")
        if val_split not in ("validation", "test"):
            raise ValueError(f"val_split must be 'validation' or 'test', got {val_split!r}")
        self.class_names = resolve_classes(classes)
        self.split_names = {"train": "train", "val": val_split}
        folders = [
            f
            for f in SPLIT_FOLDERS
            if (self.root / f).is_dir() or (self.mask_root is not None and (self.mask_root / f).is_dir())
        ]
        if not folders:
            where = f"{self.root}" + (f" or {self.mask_root}" if self.mask_root else "")
            raise FileNotFoundError(
                f"no 'train' or 'val' folder in {where} (expected <data_dir>/<split>/<wnid>/<file> and "
                "<mask_dir>/<split>/<wnid>_<file>)"
            )
        if self.mask_root is not None and not any((self.mask_root / f).is_dir() for f in SPLIT_FOLDERS):
            raise FileNotFoundError(
                f"--mask-dir {self.mask_root} has no 'train' or 'val' folder (expected the Hard ImageNet "
                "root: <mask_dir>/<split>/<wnid>_<ImageNet file name>)"
            )
        masks_by_folder = {f: _files(self.mask_root / f) if self.mask_root else [] for f in folders}
        # the wnids read for each selected class: its own, plus an alias the mask files use
        mask_wnids = {
            m.group(1) for files in masks_by_folder.values() for p in files if (m := MASK_NAME.match(p.name))
        }
        self.class_wnids: dict[str, list[str]] = {
            n: [WNIDS[n]] + [a for a in WNID_ALIASES.get(n, ()) if a in mask_wnids] for n in self.class_names
        }
        all_hard = {WNIDS[n] for n in CLASS_NAMES} | {a for al in WNID_ALIASES.values() for a in al}
        self._wnid_label = {w: i for i, n in enumerate(self.class_names) for w in self.class_wnids[n]}
        self._items: dict[str, list[_Item]] = {}
        self._folder: dict[str, str] = {}
        self._counts: dict[str, dict[str, int]] = {}
        for folder in folders:
            split = self.split_names[folder]
            self._folder[split] = folder
            self._items[split], self._counts[split] = self._index(folder, masks_by_folder[folder], all_hard)

    def _index(self, folder: str, mask_files: list[Path], all_hard: set[str]) -> tuple[list[_Item], dict]:
        """The items of one split folder and their counts (see the module docstring)."""
        masks: dict[tuple[str, str], list[Path]] = {}
        bad: list[_Item] = []
        ignored = 0
        for p in mask_files:
            m = MASK_NAME.match(p.name)
            if m is None:
                bad.append(
                    _Item(-1, None, None, p, f"mask {p}: not named <wnid>_<ImageNet file name> as released")
                )
                continue
            wnid, rest = m.group(1), m.group(2)
            if wnid in self._wnid_label:
                masks.setdefault((wnid, Path(rest).stem), []).append(p)
            elif wnid in all_hard:
                ignored += 1  # a Hard ImageNet class left out by --classes
            else:
                bad.append(
                    _Item(-1, wnid, None, p, f"mask {p}: {wnid} is not one of the 15 Hard ImageNet classes")
                )
        images: list[tuple[str, int, Path]] = []
        by_key: dict[tuple[str, str], Path] = {}
        for wnid, label in self._wnid_label.items():
            for img in _files(self.root / folder / wnid):
                images.append((wnid, label, img))
                by_key.setdefault((wnid, img.stem), img)
        assigned: dict[Path, Path] = {}
        flat_items: list[_Item] = []
        extra: list[_Item] = []
        flat_by_stem: dict[str, Path] | None = None
        no_image = duplicates = 0
        for (wnid, stem), candidates in masks.items():
            label = self._wnid_label[wnid]
            img = by_key.get((wnid, stem))
            if img is None:  # ImageNet val is often distributed flat: <data_dir>/val/<file>
                if flat_by_stem is None:
                    flat_by_stem = {}
                    for f in _files(self.root / folder):
                        flat_by_stem.setdefault(f.stem, f)
                img = flat_by_stem.get(stem)
                if img is not None:
                    flat_items.append(_Item(label, wnid, img, self._pick_mask(candidates, wnid, img.name)))
            if img is None:
                for p in candidates:
                    extra.append(
                        _Item(
                            label,
                            wnid,
                            None,
                            p,
                            f"mask {p} has no image: no {stem}.* in {self.root / folder / wnid} "
                            f"(nor in {self.root / folder})",
                        )
                    )
                    no_image += 1
                continue
            chosen = self._pick_mask(candidates, wnid, img.name)
            assigned[img] = chosen
            for p in candidates:
                if p != chosen:
                    extra.append(
                        _Item(
                            label, wnid, None, p, f"mask {p}: a second mask of {img} ({chosen.name} is used)"
                        )
                    )
                    duplicates += 1
        items = [_Item(label, wnid, img, assigned.get(img)) for wnid, label, img in images]
        items += flat_items + extra + bad
        n_images = sum(1 for it in items if it.image is not None)
        n_masked = sum(1 for it in items if it.image is not None and it.mask is not None)
        counts = {
            "images": n_images,
            "with_mask": n_masked,
            "without_mask": n_images - n_masked,
            "flat_images": len(flat_items),
            "masks_without_image": no_image,
            "duplicate_masks": duplicates,
            "bad_mask_files": len(bad),
            "masks_of_unselected_classes": ignored,
        }
        return items, counts

    @staticmethod
    def _pick_mask(candidates: list[Path], wnid: str, image_name: str) -> Path | None:
        """The released name ``<wnid>_<file>`` first, then ``<wnid>_<stem>.png``, then any other."""
        if not candidates:
            return None
        released = f"{wnid}_{image_name}"
        png = f"{wnid}_{Path(image_name).stem}.png"
        for want in (released, png):
            for p in candidates:
                if p.name == want:
                    return p
        return candidates[0]

    def splits(self) -> list[str]:
        order = ["train", "validation", "test"]
        return [s for s in order if s in self._items]

    def size(self, split: str) -> int:
        return len(self._items[split])

    def labels(self, split: str) -> np.ndarray:
        return np.asarray([it.label for it in self._items[split]], dtype=np.int64)

    def load(self, split: str, index: int) -> Sample:
        item = self._items[split][index]
        if item.problem:
            raise RejectedInput(item.problem, stage="mask", path=str(item.mask))
        assert item.image is not None
        image = read_rgb(item.image)
        mask = read_mask(item.mask, image.size) if item.mask is not None else None
        rel = item.image.relative_to(self.root).as_posix()
        recipe: dict[str, Any] = {"mask_from": "hard-imagenet" if mask is not None else "none", "file": rel}
        if item.mask is not None:
            recipe["mask_file"] = item.mask.relative_to(self.mask_root).as_posix()
        return Sample(
            id=self.item_id(split, index),
            split=split,
            index=index,
            image=image,
            label=item.label,
            mask=mask,
            bg_label=-1,
            caption="",  # ImageNet has no captions; the generation job makes one (describe.py)
            path=str(item.image),
            meta={
                "object": self.class_names[item.label],
                "wnid": item.wnid,
                "file": rel,
                "recipe": recipe,
            },
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "data_dir": str(self.root),
            "mask_dir": str(self.mask_root) if self.mask_root else None,
            "classes": list(self.class_names),
            "wnids": {n: self.class_wnids[n] for n in self.class_names},
            "split_folders": {self._folder[s]: s for s in self.splits()},
            "counts": {s: dict(self._counts[s]) for s in self.splits()},
            "inputs": {s: len(self._items[s]) for s in self.splits()},
        }
