"""The language and segmentation stage: caption, phrases and foreground mask for every original.

The generation job runs it over each split's originals before any counterfactual is made, in chunks,
so that every model sees full batches:

1. **caption** (:mod:`augment.describe`): an image-to-text model when ``--captioner`` is given, else
   the dataset's caption, else ``"a photo of a {label}"``;
2. **extract** (:mod:`augment.extract`): foreground / background / alternative-background phrases,
   with an LLM (``--llm``) or the caption parser;
3. **segment** (:mod:`augment.segment`): with ``--mask-source sam`` or ``grounded``, a SAM mask
   replaces the source's mask, and the per-phrase masks are kept for the discovery stage.

What each step did is kept per image (:class:`Annotation`) and goes into the rows' ``recipe``; the
settings of each step go once into the dataset card. A step that cannot serve an image records a
rejection with the reason (stage ``extract`` or ``segment``); the original row is still written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .describe import choose_captions
from .extract import CaptionParser, Extraction
from .sources import Sample

__all__ = ["Annotation", "Annotator", "PhraseMask"]


@dataclass
class Annotation:
    """What the stage found for one original. ``mask`` is None when the source's mask stands."""

    caption: str
    fg: list[str] = field(default_factory=list)
    bg: list[str] = field(default_factory=list)
    alt: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    replaces_mask: bool = False
    mask_bits: np.ndarray | None = None  # np.packbits of the bool mask (8x smaller while waiting)
    mask_shape: tuple[int, int] | None = None
    mask_error: str | None = None

    @staticmethod
    def pack(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        return np.packbits(mask.astype(bool), axis=None), (int(mask.shape[0]), int(mask.shape[1]))

    def mask_image(self) -> Image.Image | None:
        if self.mask_bits is None or self.mask_shape is None:
            return None
        h, w = self.mask_shape
        bits = np.unpackbits(self.mask_bits, count=h * w).reshape(h, w)
        return Image.fromarray(bits * np.uint8(255), mode="L")

    def apply(self, sample: Sample) -> Sample:
        """``sample`` with this annotation's caption, phrases and (when it replaces it) mask."""
        sample.caption = self.caption
        sample.meta["fg_phrases"], sample.meta["bg_phrases"] = list(self.fg), list(self.bg)
        sample.meta["alt_phrases"] = list(self.alt)
        sample.meta["annotation"] = self.recipe
        if self.replaces_mask:
            sample.mask = self.mask_image()
            if self.mask_error:
                sample.meta["mask_error"] = self.mask_error
        return sample


@dataclass
class PhraseMask:
    """The mask of one foreground phrase of one original (the ``phrase_masks`` configuration)."""

    id: str
    phrase: str
    mask: Image.Image
    boxes: list[list[float]]
    scores: list[float]


def object_name(sample: Sample, class_names: Sequence[str]) -> str:
    """The words for the labelled object: the source's name for it, else the class name."""
    return sample.meta.get("object") or class_names[sample.label]


class Annotator:
    """Runs caption -> extract -> segment over a chunk of samples (see the module docstring).

    ``captioner``: a :class:`~augment.describe.Captioner` or None; ``extractor``: an
    :class:`~augment.extract.LLMExtractor` or None (the caption parser); ``segmenter``: a
    :class:`~augment.segment.Segmenter` or None (the source's masks).
    """

    def __init__(self, class_names: Sequence[str], captioner=None, extractor=None, segmenter=None):
        self.class_names = list(class_names)
        self.captioner = captioner
        self.extractor = extractor if extractor is not None else CaptionParser()
        self.segmenter = segmenter
        # per-row recipe entries, made once: which model did each step
        self._caption_ref = _model_ref(captioner.describe()) if captioner is not None else {}
        self._extract_ref = _model_ref(self.extractor.describe())
        self._segment_ref: dict[str, Any] = {}
        if segmenter is not None:
            seg = segmenter.describe()
            self._segment_ref = {"source": seg["mode"]} | {
                k: _model_ref(seg[k]) for k in ("sam", "detector") if seg.get(k)
            }

    def describe(self) -> dict[str, Any]:
        """The stage's settings for the dataset card."""
        return {
            "caption": self.captioner.describe()
            if self.captioner is not None
            else {"captioner": None, "rule": "the dataset's caption, else 'a photo of a {label}'"},
            "extract": self.extractor.describe(),
            "segment": self.segmenter.describe() if self.segmenter is not None else {"mask_source": "given"},
        }

    def __call__(
        self, samples: Sequence[Sample]
    ) -> tuple[list[Annotation], list[tuple[str, str, str]], list[PhraseMask]]:
        """Annotations (one per sample, in order), rejections ``(id, stage, reason)``, phrase masks."""
        if not samples:
            return [], [], []
        labels = [object_name(s, self.class_names) for s in samples]
        model_captions = self.captioner([s.image for s in samples]) if self.captioner is not None else None
        captions, origins = choose_captions([s.caption for s in samples], labels, model_captions)
        # a caption made from the label alone names no background: nothing to extract, not a failure
        described = [i for i, o in enumerate(origins) if not o.endswith("label")]
        extractions = [Extraction(method="no-caption") for _ in samples]
        found = self.extractor([captions[i] for i in described], [labels[i] for i in described])
        for i, ex in zip(described, found, strict=True):
            extractions[i] = ex
        rejections: list[tuple[str, str, str]] = []
        annotations = []
        for s, caption, origin, ex in zip(samples, captions, origins, extractions, strict=True):
            where = s.path or s.id
            recipe: dict[str, Any] = {
                "caption": {"origin": origin, **(self._caption_ref if origin == "model" else {})},
                "extract": {
                    "method": ex.method,
                    **({"attempts": ex.attempts} if ex.attempts else {}),
                    **({"error": ex.error} if ex.error else {}),
                    **(self._extract_ref if ex.method.startswith("llm") else {}),
                },
            }
            if ex.rejected:
                rejections.append((s.id, "extract", f"{where}: {ex.error}"))
            annotations.append(Annotation(caption, ex.foreground, ex.background, ex.alt, recipe))
        phrase_masks: list[PhraseMask] = []
        if self.segmenter is not None:
            results = self.segmenter(
                [s.image for s in samples],
                labels,
                phrases=[a.fg for a in annotations],
                given_masks=[np.asarray(s.mask) > 0 if s.mask is not None else None for s in samples],
            )
            for s, a, r in zip(samples, annotations, results, strict=True):
                a.replaces_mask = True
                a.recipe["mask"] = {
                    **self._segment_ref,
                    "box_source": r.box_source,
                    "boxes": [[round(float(v), 1) for v in b] for b in r.boxes],
                    "area": round(float(r.area), 4),
                }
                if r.box_scores:
                    a.recipe["mask"]["box_scores"] = [round(float(v), 4) for v in r.box_scores]
                if r.error or r.mask is None:
                    a.mask_error = r.error or "no mask"
                    a.recipe["mask"]["error"] = a.mask_error
                    rejections.append((s.id, "segment", f"{s.path or s.id}: {a.mask_error}"))
                else:
                    a.mask_bits, a.mask_shape = Annotation.pack(r.mask)
                for phrase, pm in r.phrase_masks.items():
                    phrase_masks.append(
                        PhraseMask(
                            s.id,
                            phrase,
                            Image.fromarray(pm.astype(np.uint8) * 255, mode="L"),
                            [list(map(float, b)) for b in r.phrase_boxes.get(phrase, [])],
                            [float(v) for v in r.phrase_scores.get(phrase, [])],
                        )
                    )
        else:
            for a in annotations:
                a.recipe["mask"] = {"source": "given"}
        return annotations, rejections, phrase_masks


def _model_ref(settings: dict[str, Any]) -> dict[str, Any]:
    """The short reference to a model that each row's recipe carries (the card has the rest)."""
    keys = ("model", "revision", "commit", "checkpoint", "sam_type", "template")
    return {k: settings[k] for k in keys if settings.get(k) is not None}
