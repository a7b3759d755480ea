"""The record every source yields, and the error a source raises for an input it cannot use."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

# split names as the writer orders them; other names follow, sorted
SPLIT_ORDER = ("train", "validation", "test")
# what folders and datasets call their validation split
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def canonical_split(name: str) -> str:
    """``val``, ``valid`` and ``dev`` (any case) are ``validation``; other names are kept."""
    return SPLIT_ALIASES.get(name.lower(), name)


def order_splits(names) -> list[str]:
    """``names`` in the order train, validation, test, then the others sorted."""
    names = set(names)
    return [s for s in SPLIT_ORDER if s in names] + sorted(names - set(SPLIT_ORDER))


class RejectedInput(Exception):
    """An input a stage cannot use. The pipeline records it in the ``rejected`` table and moves on.

    ``reason`` must name the file (when there is one) and say what is wrong with it.
    """

    def __init__(self, reason: str, stage: str = "read", path: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.path = path


@dataclass
class Sample:
    """One labelled image as a source delivers it.

    ``image`` is RGB; ``mask`` (mode ``L``, foreground 255) is None when the source has none;
    ``bg_label`` is the class whose background the image carries (-1 when unknown).
    """

    id: str
    split: str
    index: int
    image: Image.Image
    label: int
    mask: Image.Image | None = None
    bg_label: int = -1
    caption: str = ""
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """A labelled image collection addressed by (split, index).

    Random access (``load``) lets generators fetch a background from any other item without holding
    the dataset in memory; ``labels`` gives every item's class without decoding images.
    """

    name: str
    class_names: list[str]

    @abstractmethod
    def splits(self) -> list[str]:
        """Split names present, in the order they are written."""

    @abstractmethod
    def size(self, split: str) -> int:
        """Number of input items in ``split`` (usable or not)."""

    @abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """Class index of every item in ``split`` (-1 where the class is unknown or invalid)."""

    @abstractmethod
    def load(self, split: str, index: int) -> Sample:
        """Decode item ``index`` of ``split``. Raises :class:`RejectedInput` for unusable input."""

    def item_id(self, split: str, index: int) -> str:
        """The stable id of an original: ``{source}/{split}/{index}``."""
        return f"{self.name}/{split}/{index}"

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the dataset card."""
        return {"source": self.name}
