"""Any Hugging Face dataset: a Hub name or a local folder that ``datasets.load_dataset`` reads.

``HubSource("owner/name")`` (or a folder of parquet files in the Hub's ``data/<split>-*.parquet``
layout, an image folder, a folder written by ``save_to_disk``) becomes a source of labelled images:

* splits as the dataset names them, ``val`` / ``valid`` / ``dev`` written as ``validation``;
  ``splits`` selects some (by either name);
* the class of a row from ``label_column``: a ``ClassLabel`` (its names are the class names), a
  string column (the sorted distinct strings) or an integer column (``"0"`` .. ``"K-1"``);
  ``classes`` selects and orders the classes, and a row of any other class is rejected (stage
  ``label``);
* ``group_column`` (e.g. Waterbirds' ``place``) becomes ``bg_label``: integers as they are; strings
  mapped to the class index when every value is a class name, else to the index of the sorted
  distinct strings (the mapping is in :meth:`HubSource.describe`, so in the dataset card);
* ``mask_column``: a foreground mask per row (any non-zero pixel is the object); a mask whose size is
  not the image's is rejected (stage ``mask``).

Images are decoded one row at a time, on :meth:`HubSource.load` (random access through the
``datasets.Dataset``); :meth:`HubSource.labels` reads the label column alone. Every original's
``recipe`` records where it came from: ``{"hub": name, "revision": ..., "split": ..., "row": i}``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import trust
from ..inputs import (
    DEFAULT_MAX_PIXELS,
    array_image,
    check_max_pixels,
    display_name,
    fit_mask,
    mask_bits,
    open_image,
    orientation,
    set_pixel_limit,
    to_rgb,
)
from .base import RejectedInput, Sample, Source, canonical_split, order_splits


def _folder_fingerprint(root: Path) -> str:
    """A hash of every file's relative path, size and modification time under ``root``.

    ``datasets`` may key its cache of a local folder on the card's metadata alone, so a folder
    rewritten in place could load stale rows; caching under this fingerprint makes every rewrite a
    new cache entry.
    """
    h = hashlib.sha256(str(root.resolve()).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _is_local(data_dir: str) -> bool:
    return os.path.exists(os.path.expanduser(data_dir)) or data_dir.startswith(("/", ".", "~"))


def load_any(data_dir: str, revision: str | None = None):
    """A ``DatasetDict`` from a Hub name, a folder ``load_dataset`` reads, or a ``save_to_disk`` folder."""
    from datasets import Dataset, DatasetDict, config, load_dataset, load_from_disk

    local = _is_local(data_dir)
    if local:
        root = Path(os.path.expanduser(data_dir))
        if not root.is_dir():
            raise FileNotFoundError(
                f"--data-dir {data_dir}: no such folder (a Hub dataset name is owner/name)"
            )
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            ds = load_from_disk(str(root))  # a folder written by save_to_disk
            return ds if isinstance(ds, DatasetDict) else DatasetDict({"train": ds})
        cache_dir = Path(config.HF_DATASETS_CACHE) / "hub_source" / _folder_fingerprint(root)
        try:
            ds = load_dataset(str(root), cache_dir=str(cache_dir), **trust.dataset_kwargs(load_dataset))
        except Exception as e:  # datasets raises many types here; name the folder and the cause
            raise ValueError(
                f"--data-dir {data_dir}: datasets.load_dataset cannot read this folder "
                f"({type(e).__name__}: {e}); expected data/<split>-*.parquet files, an image folder "
                "<split>/<class>/<file>, or a folder written by save_to_disk"
            ) from e
    else:
        try:
            ds = load_dataset(data_dir, revision=revision, **trust.dataset_kwargs(load_dataset))
        except (ConnectionError, TimeoutError) as e:
            raise ConnectionError(
                f"--data-dir {data_dir}: cannot reach the Hugging Face Hub ({e}); download the dataset "
                "first or give a local folder"
            ) from e
        except Exception as e:
            raise ValueError(
                f"--data-dir {data_dir}: datasets.load_dataset failed ({type(e).__name__}: {e})"
            ) from e
    if isinstance(ds, Dataset):
        ds = DatasetDict({"train": ds})
    return ds


def _column_values(ds, column: str) -> list:
    """One column as Python values, without decoding any other column (indices mapping honoured)."""
    return ds.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()


def _feature_kind(feature) -> str:
    """``classlabel``, ``string``, ``int``, ``bool`` or ``other`` for a datasets feature."""
    from datasets import ClassLabel, Value

    if isinstance(feature, ClassLabel):
        return "classlabel"
    if isinstance(feature, Value):
        if feature.dtype in ("string", "large_string"):
            return "string"
        if feature.dtype == "bool":
            return "bool"
        if feature.dtype.startswith(("int", "uint")):
            return "int"
    return "other"


def _open(
    value: Any, what: str, allowed: list[Path], max_pixels: int | None, base: Path | None = None
) -> tuple[Image.Image, str | None]:
    """Decode a cell of an image column (``{"bytes", "path"}``, bytes, a path, an array or a PIL image).

    Returns the fully loaded image and its file path when the dataset stores one. A path is opened
    only when it lies inside one of ``allowed`` (the dataset folder, the datasets / Hub caches): a
    row cannot make the job read ``/etc/...`` or ``../../`` files. A relative path is taken from
    ``base`` (a local dataset's folder), not from the working directory.
    """
    path = None
    if isinstance(value, Image.Image):
        return value, None
    if isinstance(value, dict):
        path = value.get("path")
        value = value.get("bytes") if value.get("bytes") is not None else path
    if value is None:
        raise RejectedInput(f"{what}: empty cell (no image)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return open_image(bytes(value), what, path, max_pixels), path
    if isinstance(value, (str, os.PathLike)):
        path = str(value)
        if "\x00" in path:
            raise RejectedInput(f"{what}: file path {display_name(path)!r} contains a NUL character")
        full = Path(path) if base is None else base / path  # an absolute path stays itself
        real = Path(os.path.realpath(full))
        if not any(real.is_relative_to(root) for root in allowed):
            raise RejectedInput(
                f"{what}: file path {display_name(path)!r} is outside the dataset folder and the "
                "datasets cache; it is not opened",
                path=path,
            )
        return open_image(real, f"{what} ({display_name(path)})", path, max_pixels), path
    image = array_image(value, what)
    if max_pixels and image.size[0] * image.size[1] > max_pixels:
        raise RejectedInput(
            f"{what}: an array of {image.size[0]}x{image.size[1]} pixels is over --max-image-pixels"
        )
    return image, None


def _allowed_roots(data_dir: str) -> list[Path]:
    """Folders an image path in a dataset may point into: a local dataset's folder, the caches."""
    from datasets import config
    from huggingface_hub import constants

    roots = [config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE]
    if _is_local(data_dir):
        roots.append(os.path.expanduser(data_dir))
    return [Path(os.path.realpath(r)) for r in roots]


class HubSource(Source):
    """Labelled images from a Hugging Face dataset (see the module docstring).

    Args:
        data_dir: a Hub dataset name (``owner/name``) or a local folder.
        image_column, label_column: the image and class columns.
        mask_column: a foreground-mask column (image or array; non-zero = object), if any.
        group_column: a column whose value becomes ``bg_label`` (e.g. Waterbirds' ``place``).
        splits: read only these splits (``validation`` also matches ``val`` / ``valid``).
        revision: the dataset revision on the Hub (branch, tag or commit).
        classes: the class list, or a subset of it in the wanted order (rows of other classes are
            rejected).
        caption_column: a text column used as the image's caption, if any.
        max_pixels: images with more pixels are rejected (None or 0: no limit).
    """

    name = "hub"

    def __init__(
        self,
        data_dir: str,
        image_column: str = "image",
        label_column: str = "label",
        mask_column: str | None = None,
        group_column: str | None = None,
        splits: list[str] | None = None,
        revision: str | None = None,
        classes: list[str] | None = None,
        caption_column: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        from datasets import Image as ImageFeature

        self.max_pixels = check_max_pixels(max_pixels)
        set_pixel_limit(self.max_pixels)
        self._allowed = _allowed_roots(str(data_dir))
        self._base = Path(os.path.expanduser(str(data_dir))) if _is_local(str(data_dir)) else None

        self.data_dir = str(data_dir)
        self.revision = revision
        self.image_column, self.label_column = image_column, label_column
        self.mask_column, self.group_column, self.caption_column = mask_column, group_column, caption_column
        dd = load_any(self.data_dir, revision)
        found: dict[str, str] = {}  # canonical split name -> the dataset's own name
        for raw in dd:
            split = canonical_split(raw)
            if split in found:
                raise ValueError(
                    f"{self.data_dir}: both splits {found[split]!r} and {raw!r} would be {split!r}"
                )
            found[split] = raw
        if splits:
            wanted = [canonical_split(s) for s in splits]
            missing = [s for s, w in zip(splits, wanted) if w not in found]
            if missing:
                raise ValueError(
                    f"{self.data_dir}: no split {missing}; the dataset has {sorted(dd)} "
                    "(val/valid/dev are read as validation)"
                )
            found = {w: found[w] for w in dict.fromkeys(wanted)}
        if not found:
            raise ValueError(f"{self.data_dir}: the dataset has no splits")
        self.raw_splits = found
        wanted_columns = [
            c for c in (image_column, label_column, mask_column, group_column, caption_column) if c
        ]
        for raw in found.values():
            present = list(dd[raw].column_names)
            missing = [c for c in dict.fromkeys(wanted_columns) if c not in present]
            if missing:
                raise ValueError(
                    f"{self.data_dir} split {raw!r} has no column {', '.join(repr(c) for c in missing)}; "
                    f"its columns are {present} (choose them with --image-column, --label-column, "
                    "--mask-column, --group-column)"
                )
        features = dd[found[next(iter(found))]].features
        self.label_kind = _feature_kind(features[label_column])
        if self.label_kind == "other":
            raise ValueError(
                f"{self.data_dir}: label column {label_column!r} is {features[label_column]!r}; expected a "
                "ClassLabel, a string or an integer column"
            )
        raw_labels = {s: _column_values(dd[r], label_column) for s, r in found.items()}
        if self.label_kind == "classlabel":
            all_names = list(features[label_column].names)
        else:  # from every split, so that class indices do not depend on --splits
            all_names = self._names_from_values(
                [_column_values(dd[r], label_column) for r in dd if label_column in dd[r].column_names]
            )
        if classes:
            unknown = [c for c in classes if c not in all_names]
            if unknown:
                raise ValueError(
                    f"--classes {unknown} are not classes of {self.data_dir} (label column "
                    f"{label_column!r} has {all_names[:50]}{' ...' if len(all_names) > 50 else ''})"
                )
            self.class_names = list(classes)
        else:
            self.class_names = list(all_names)
        if not self.class_names:
            raise ValueError(f"{self.data_dir}: label column {label_column!r} names no class")
        self._raw_label_names = all_names
        self._labels = {s: self._map_labels(v) for s, v in raw_labels.items()}
        self.group_names: list[str] | None = None
        self._group_map: dict[Any, int] | None = None
        if group_column:
            self._init_groups(dd, features[group_column])
        # random access: only the columns a sample needs, images left undecoded until load()
        self._rows = {}
        for split, raw in found.items():
            ds = dd[raw].select_columns(list(dict.fromkeys(wanted_columns)))
            for col in (image_column, mask_column):
                if col and isinstance(ds.features[col], ImageFeature):
                    ds = ds.cast_column(col, ImageFeature(decode=False))
            self._rows[split] = ds
        self.commit = self._resolve_commit()

    # -- set-up ------------------------------------------------------------------------------------
    def _names_from_values(self, columns: list[list]) -> list[str]:
        """Class names of a string column (sorted distinct values) or an integer one ("0".."K-1")."""
        values = {v for vals in columns for v in vals if v is not None}
        if self.label_kind == "string":
            return sorted(values)
        ints = [int(v) for v in values]
        k = max((v for v in ints if v >= 0), default=-1) + 1
        return [str(i) for i in range(k)]

    def _map_labels(self, values: list) -> np.ndarray:
        """Raw label values -> indices into ``class_names`` (-1: missing, negative or not selected)."""
        index = {c: i for i, c in enumerate(self.class_names)}
        out = np.full(len(values), -1, dtype=np.int64)
        for i, v in enumerate(values):
            if v is None:
                continue
            if self.label_kind == "string":
                name = v
            else:
                v = int(v)
                if v < 0 or v >= len(self._raw_label_names):
                    continue
                name = self._raw_label_names[v]
            out[i] = index.get(name, -1)
        return out

    def _init_groups(self, dd, feature) -> None:
        kind = _feature_kind(feature)
        if kind == "classlabel":
            self.group_names = list(feature.names)
        elif kind == "string":
            values = sorted(
                {
                    v
                    for raw in self.raw_splits.values()
                    for v in _column_values(dd[raw], self.group_column)
                    if v
                }
            )
            if values and all(v in self.class_names for v in values):
                self._group_map = {v: self.class_names.index(v) for v in values}  # backgrounds named by class
            else:
                self._group_map = {v: i for i, v in enumerate(values)}
            self.group_names = list(self._group_map)
        elif kind not in ("int", "bool"):
            raise ValueError(
                f"{self.data_dir}: group column {self.group_column!r} is {feature!r}; expected a "
                "ClassLabel, an integer, a boolean or a string column"
            )
        # bg_label is the class whose background an image carries: it keys CLAD's negative
        # dictionary (one key per class), so every group must be a class index
        if self._group_map is not None:
            top = max(self._group_map.values(), default=-1)
            shown = ", ".join(f"{k!r} -> {v}" for k, v in list(self._group_map.items())[:20])
        else:
            values = {
                int(v)
                for raw in self.raw_splits.values()
                for v in _column_values(dd[raw], self.group_column)
                if v is not None
            }
            top = max(values, default=-1)
            shown = ", ".join(str(v) for v in sorted(values)[:20])
        if top >= len(self.class_names):
            raise ValueError(
                f"{self.data_dir}: group column {self.group_column!r} gives bg_label up to {top} ({shown}), "
                f"but bg_label must be a class index 0..{len(self.class_names) - 1} (the class whose "
                "background the image carries; it keys CLAD's negative dictionary)"
            )

    def _resolve_commit(self) -> str | None:
        """The Hub commit of a named dataset (when online), so that the card pins what was read."""
        if _is_local(self.data_dir):
            return None
        try:
            from huggingface_hub import HfApi, is_offline_mode

            if is_offline_mode() or os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in (
                "1",
                "true",
                "yes",
            ):
                return None
            return HfApi().dataset_info(self.data_dir, revision=self.revision).sha
        except Exception:  # provenance only: a failed look-up leaves the commit unrecorded
            return None

    # -- Source ------------------------------------------------------------------------------------
    def splits(self) -> list[str]:
        return order_splits(self._rows)

    def size(self, split: str) -> int:
        return len(self._rows[split])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[split]

    def _bg_label(self, value: Any) -> int:
        if value is None:
            return -1
        if self._group_map is not None:
            return self._group_map.get(value, -1)
        v = int(value)
        return v if v >= 0 else -1

    def load(self, split: str, index: int) -> Sample:
        raw = self.raw_splits[split]
        where = f"{self.data_dir} split {raw!r} row {index}"
        row = self._rows[split][index]
        label = int(self._labels[split][index])
        if label < 0:
            value = row[self.label_column]
            raise RejectedInput(
                f"{where}: label {value!r} is not in the class list "
                f"{self.class_names[:20]}{' ...' if len(self.class_names) > 20 else ''}",
                stage="label",
            )
        raw_image, path = _open(
            row[self.image_column], f"{where} image", self._allowed, self.max_pixels, self._base
        )
        image = to_rgb(raw_image, f"{where} image", path)
        mask = None
        if self.mask_column and row[self.mask_column] is not None:
            try:
                m, _ = _open(
                    row[self.mask_column], f"{where} mask", self._allowed, self.max_pixels, self._base
                )
            except RejectedInput as e:
                raise RejectedInput(e.reason, stage="mask", path=e.path) from e
            mask = fit_mask(mask_bits(m), image.size, f"of {where}", path, orientation(raw_image))
        bg_label = self._bg_label(row[self.group_column]) if self.group_column else -1
        caption = ""
        if self.caption_column and isinstance(row[self.caption_column], str):
            caption = row[self.caption_column]
        meta: dict[str, Any] = {
            "object": self.class_names[label],
            "recipe": {
                "hub": self.data_dir,
                "revision": self.revision or self.commit,
                "split": raw,
                "row": int(index),
            },
        }
        if path:
            meta["file"] = path
        return Sample(
            id=self.item_id(split, index),
            split=split,
            index=index,
            image=image,
            label=label,
            mask=mask,
            bg_label=bg_label,
            caption=caption,
            path=path,
            meta=meta,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "data_dir": self.data_dir,
            "hub": {
                "dataset": self.data_dir,
                "revision": self.revision,
                "commit": self.commit,
                "local": _is_local(self.data_dir),
            },
            "image_column": self.image_column,
            "label_column": self.label_column,
            "label_type": self.label_kind,
            "mask_column": self.mask_column,
            "group_column": self.group_column,
            "caption_column": self.caption_column,
            # group value -> bg_label (None: the column's integers are the bg_labels)
            "groups": None
            if self.group_names is None
            else (
                dict(self._group_map)
                if self._group_map is not None
                else {n: i for i, n in enumerate(self.group_names)}
            ),
            "classes": self.class_names,
            "split_names": dict(self.raw_splits),
            "rows": {s: len(ds) for s, ds in self._rows.items()},
            "max_image_pixels": self.max_pixels,
        }
