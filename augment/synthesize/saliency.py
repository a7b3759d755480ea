"""Saliency positives (ExCon) offline: Grad-CAM-masked views from a trained classifier.

``scripts/generate.py --positives saliency --classifier DIR`` (DIR: an output folder of
``scripts/train.py``) keeps, per original, the pixels whose normalised Grad-CAM importance for its
label is above ``threshold`` and replaces the others by the split's mean colour
(:func:`debias.excon.excon_views`). No mask is needed. A view on which the classifier no longer
predicts the label is not written: the builder records it as a ``saliency`` rejection with the
prediction it got (the trainer, which can fall back to an augmented view of the anchor, does that
online with ``--saliency-positives``). With ``negatives`` the complement (the salient pixels replaced,
the rest kept) is returned too, for a ``kind=negative`` row beside each accepted positive.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .output import CounterfactualOutput


@dataclass
class SaliencyOutput(CounterfactualOutput):
    """Per input: the masked view (``images``), the kept pixels (``masks``, L images: 255 = kept),
    ``recipes``, ``kept_prediction`` and, with negatives, the complement views (``complements``)."""

    kept_prediction: list[bool] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    complements: list[Image.Image] | None = None


class SaliencyGenerator:
    """Grad-CAM-masked views of images of known classes (see the module docstring).

    Args:
        probe: a :class:`~augment.filters.ClassifierProbe` (the trained classifier and its preprocessing).
        threshold: pixels whose Grad-CAM value (in [0, 1] per image) is <= ``threshold`` are replaced.
        layer: Grad-CAM layer name (default: the deepest convolutional stage whose map is >= 4 x 4).
        negatives: also make the complement views.
    """

    name = "saliency"

    def __init__(self, probe, threshold: float = 0.5, layer: str | None = None, negatives: bool = False):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"--saliency-threshold must be in [0, 1), got {threshold}")
        self.probe, self.threshold, self.layer, self.negatives = probe, threshold, layer, negatives
        if layer is not None and layer not in dict(probe.model.named_modules()):
            raise ValueError(
                f"--saliency-layer {layer!r}: the classifier {probe.path} has no module of that name"
            )

    @classmethod
    def from_pretrained(
        cls, path: str | None, device: str | None = None, batch_size: int = 64, **kwargs
    ) -> SaliencyGenerator:
        """Load the classifier folder ``path`` written by ``scripts/train.py``."""
        from ..filters import ClassifierProbe

        if not path:
            raise ValueError("--positives saliency needs --classifier (an output folder of scripts/train.py)")
        return cls(ClassifierProbe.load(path, device=device, batch_size=batch_size), **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.name,
            **self.probe.describe(),
            "threshold": self.threshold,
            "cam_layer": self.layer,
            "negatives": self.negatives,
        }

    def check_inputs(self, image: Sequence[Image.Image], labels: Sequence[int], fill: Sequence[int]) -> None:
        if len(image) != len(labels):
            raise ValueError(f"image and labels differ in length: {len(image)} vs {len(labels)}")
        names = self.probe.class_names
        bad = [y for y in labels if y < 0 or (names is not None and y >= len(names))]
        if bad:
            raise ValueError(f"labels {bad[:5]} are not classes of the classifier {self.probe.path}")
        if len(fill) != 3:
            raise ValueError(f"fill must be an RGB colour, got {fill}")

    def __call__(
        self, image: Sequence[Image.Image], labels: Sequence[int], fill: Sequence[int]
    ) -> SaliencyOutput:
        """Views of ``image`` (PIL, any sizes; those of one size share a batch) for ``labels``."""
        import torch

        from debias.data import resize_uint8
        from debias.excon import cam_layer, excon_views

        self.check_inputs(image, labels, fill)
        probe = self.probe
        res = probe.preprocessing.resolution

        def normalize(x: torch.Tensor) -> torch.Tensor:
            return probe._norm.normalize(resize_uint8(x, res))

        arrays = [np.array(im.convert("RGB"), dtype=np.uint8) for im in image]
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, a in enumerate(arrays):
            by_size[a.shape[:2]].append(i)
        n = len(arrays)
        views: list[Any] = [None] * n
        keeps: list[Any] = [None] * n
        comps: list[Any] = [None] * n
        kept: list[bool] = [False] * n
        preds: list[int] = [0] * n
        for idx in by_size.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
            if self.layer is None:
                self.layer = cam_layer(probe.model, normalize(x[:1].to(probe.device)))
            out = excon_views(
                probe.model,
                x,
                [labels[i] for i in idx],
                normalize,
                fill,
                self.threshold,
                layer=self.layer,
                negatives=self.negatives,
                batch_size=probe.batch_size,
            )
            masked = torch.where(
                out.keep[:, None], x, torch.as_tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)
            )
            for j, i in enumerate(idx):
                views[i] = Image.fromarray(masked[j].permute(1, 2, 0).numpy())
                keeps[i] = Image.fromarray(out.keep[j].numpy().astype(np.uint8) * 255, mode="L")
                kept[i] = bool(out.kept_prediction[j])
                preds[i] = int(out.predictions[j])
                if out.complements is not None:
                    comps[i] = Image.fromarray(out.complements[j].permute(1, 2, 0).numpy())
        names = probe.class_names
        pred_names = [names[p] if names is not None else str(p) for p in preds]
        recipes = [
            {
                "generator": self.name,
                "classifier": probe.path,
                "cam_layer": self.layer,
                "threshold": self.threshold,
                "fill": [int(c) for c in fill],
                "kept_fraction": round(float(np.asarray(keeps[i]).mean() / 255.0), 4),
                "prediction": pred_names[i],
                "kept_prediction": kept[i],
            }
            for i in range(n)
        ]
        return SaliencyOutput(
            images=views,
            masks=keeps,
            recipes=recipes,
            kept_prediction=kept,
            predictions=pred_names,
            complements=comps if self.negatives else None,
        )
