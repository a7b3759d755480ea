"""The typed output every generator returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class CounterfactualOutput:
    """Generated images with their foreground masks (None where unknown) and provenance records."""

    images: list[Image.Image]
    masks: list[Image.Image | None]
    recipes: list[dict[str, Any]] = field(default_factory=list)
