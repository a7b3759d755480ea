"""The generation job: a source in, a counterfactual dataset folder out.

``python scripts/generate.py --source synthetic --output DIR`` reads every split of the source, runs
the language and segmentation stage over its originals (:mod:`augment.annotate`: caption, phrases,
mask), writes each usable image as an ``original`` row and, for the counterfactual splits (``train``
by default), derives rows from it:

* ``positive``: the object on the background of an image of another class (CLAD's x+);
* ``negative`` / remove: the anchor's background with the object removed (label -1);
* ``negative`` / replace: the anchor's background with another class's object in the object's box.

Every random choice is drawn from a generator seeded by ``(--seed, row id)``, so a row does not depend
on the batch it falls in or on what else is generated. Inputs a stage refuses are recorded in the
``rejected`` table with the reason.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from prompts import CAPTION_BACKGROUND, CAPTION_LABEL, CAPTION_SCENE, EDIT_TEXTURE, render

from . import __version__, trust
from .annotate import Annotation, Annotator
from .dataset import DatasetWriter, Row, dataset_features, parquet_bytes, phrase_mask_record
from .filters import FilterConfig, add_filter_arguments
from .imageops import mask_coverage_problem
from .inputs import DEFAULT_MAX_PIXELS
from .runtime import process_state
from .seeding import item_rng, item_seed
from .segment import MASK_SOURCES, add_mask_arguments, segmenter_from_config
from .sources import RejectedInput, Sample, Source, build_source
from .synthesize.composite import CompositeGenerator
from .workfolder import WORK, WorkFolder, fault_point, inspect_output

NEGATIVE_KINDS = ("remove", "replace")
SOURCES = ("folder", "bgchallenge", "hardimagenet", "hub")  # the sources read from --data-dir
POSITIVE_GENERATORS = ("composite", "inpaint", "edit", "texture", "saliency")


@dataclass
class GenerateConfig:
    """Settings of one generation run (the command-line flags of ``scripts/generate.py``)."""

    output: str
    source: str = "synthetic"
    data_dir: str | None = None
    mask_dir: str | None = None
    classes: list[str] | None = None
    # bgchallenge / hub sources
    bg_mask_fallback: str = "none"
    splits: list[str] | None = None
    image_column: str = "image"
    label_column: str = "label"
    mask_column: str | None = None
    group_column: str | None = None
    caption_column: str | None = None
    revision: str | None = None
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    trust_remote_code: bool = False
    allow_bin_weights: bool = False
    limit: int | None = None
    seed: int = 0
    counterfactual_splits: list[str] = field(default_factory=lambda: ["train"])
    num_positives: int = 1
    negatives: list[str] = field(default_factory=lambda: list(NEGATIVE_KINDS))
    positives: str = "composite"
    # --positives texture: where the new texture comes from (augment/synthesize/texture.py)
    texture_source: str = "dataset"
    shard_size: int = 2000
    overwrite: bool = False
    # synthetic source
    bias: str = "background"
    num_classes: int = 9
    image_size: int = 64
    rho: float = 0.95
    train_per_class: int = 300
    validation_per_class: int = 50
    test_per_class: int = 100
    max_rotation: float = 180.0
    # language and segmentation stage
    captioner: str | None = None
    caption_batch_size: int = 16
    caption_max_new_tokens: int = 30
    caption_num_beams: int = 1
    llm: str | None = None
    llm_batch_size: int = 8
    llm_max_new_tokens: int = 96
    llm_max_repairs: int = 2
    mask_source: str = "given"
    sam: str | None = None
    sam_checkpoint: str | None = None
    sam_type: str = "vit_h"
    detector: str | None = None
    box_threshold: float = 0.1
    max_boxes: int = 4
    segment_batch_size: int = 8
    fill_holes: bool = True
    dilate: int = 0
    min_mask_area: float = 0.005
    max_mask_area: float = 0.95
    chunk_size: int = 256
    # diffusion counterfactuals (augment/synthesize/inpaint.py, edit.py)
    negative_generator: str = "composite"
    edit_kind: str = "instruct"
    inpaint_model: str = "stabilityai/stable-diffusion-2-inpainting"
    edit_model: str = "timbrooks/instruct-pix2pix"
    img2img_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    image_guidance: float | None = None
    strengths: list[float] | None = None
    negative_prompt: str | None = None
    diffusion_batch_size: int = 4
    resolution: int | None = None
    inpaint_dilate: int = 4
    # saliency positives (augment/synthesize/saliency.py)
    classifier: str | None = None
    saliency_threshold: float = 0.5
    saliency_negatives: bool = False
    saliency_layer: str | None = None
    # filters of diffusion outputs: an augment.filters.FilterConfig (None: its defaults)
    filters: Any = None
    device: str | None = None
    dtype: str | None = None
    progress: bool = True

    def source_kwargs(self) -> dict[str, Any]:
        if self.source != "synthetic" and self.bias != "background":
            raise ValueError(f"--bias {self.bias} applies to --source synthetic only, not {self.source}")
        if self.source == "synthetic":
            return {
                "bias": self.bias,
                "num_classes": self.num_classes,
                "image_size": self.image_size,
                "rho": self.rho,
                "train_per_class": self.train_per_class,
                "validation_per_class": self.validation_per_class,
                "test_per_class": self.test_per_class,
                "max_rotation": self.max_rotation,
                "seed": self.seed,
            }
        if self.source in SOURCES and not self.data_dir:
            raise ValueError(f"--source {self.source} needs --data-dir")
        if self.source == "folder":
            return {
                "data_dir": self.data_dir,
                "mask_dir": self.mask_dir,
                "classes": self.classes,
                "max_pixels": self.max_image_pixels,
            }
        if self.source == "bgchallenge":
            return {
                "data_dir": self.data_dir,
                "mask_fallback": self.bg_mask_fallback,
                "classes": self.classes,
            }
        if self.source == "hardimagenet":
            return {"data_dir": self.data_dir, "mask_dir": self.mask_dir, "classes": self.classes}
        if self.source == "hub":
            return {
                "data_dir": self.data_dir,
                "image_column": self.image_column,
                "label_column": self.label_column,
                "mask_column": self.mask_column,
                "group_column": self.group_column,
                "caption_column": self.caption_column,
                "splits": self.splits,
                "revision": self.revision,
                "classes": self.classes,
                "max_pixels": self.max_image_pixels,
            }
        raise ValueError(f"unknown --source {self.source!r}; choose one of synthetic, {', '.join(SOURCES)}")


def select_indices(labels: np.ndarray, limit: int | None) -> list[int]:
    """All indices, or at most ``limit`` of them taken round-robin over classes (balanced, deterministic)."""
    n = len(labels)
    if limit is None or limit >= n:
        return list(range(n))
    rank = np.zeros(n, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, y in enumerate(labels.tolist()):
        rank[i] = seen.get(y, 0)
        seen[y] = rank[i] + 1
    order = np.lexsort((labels, rank))  # by rank within class, then class
    return sorted(order[:limit].tolist())


def scene_caption(obj: str, background: str | None) -> str:
    """``a photo of a {obj} on {background}``, or ``a photo of a {obj}`` when the background has no name."""
    return (
        render(CAPTION_SCENE, object=obj, background=background)
        if background
        else render(CAPTION_LABEL, label=obj)
    )


def background_name(sample: Sample) -> str | None:
    """Words for the background of ``sample``: the source's name for it, else its first background phrase."""
    return sample.meta.get("background") or next(iter(sample.meta.get("bg_phrases") or []), None)


def background_class(sample: Sample) -> int:
    """The class whose background ``sample`` carries: its ``bg_label`` when known, else its label."""
    return sample.bg_label if sample.bg_label >= 0 else sample.label


class _SampleCache:
    """An LRU of decoded samples (and refusals), bounded in bytes: partners are fetched repeatedly.

    ``annotations`` (index -> :class:`~augment.annotate.Annotation`) are applied to every sample it
    returns, so a sample decoded again after eviction carries its caption, phrases and mask.
    """

    def __init__(self, source: Source, split: str, budget_mb: float = 1024.0):
        self.source, self.split = source, split
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self._items: OrderedDict[int, tuple[Sample | RejectedInput, int]] = OrderedDict()
        self.annotations: dict[int, Annotation] = {}

    def annotate(self, index: int, annotation: Annotation) -> None:
        self.annotations[index] = annotation
        if index in self._items and isinstance(self._items[index][0], Sample):
            annotation.apply(self._items[index][0])

    @staticmethod
    def _nbytes(item: Sample | RejectedInput) -> int:
        if isinstance(item, RejectedInput):
            return 256
        w, h = item.image.size
        return w * h * (4 if item.mask is not None else 3) + 512

    def get(self, index: int) -> Sample:
        if index in self._items:
            self._items.move_to_end(index)
            item = self._items[index][0]
        else:
            try:
                item = self.source.load(self.split, index)
                if index in self.annotations:
                    self.annotations[index].apply(item)
            except RejectedInput as e:
                item = e
            size = self._nbytes(item)
            self._items[index] = (item, size)
            self.used += size
            while self.used > self.budget and len(self._items) > 1:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed
        if isinstance(item, RejectedInput):
            raise item
        return item


@dataclass
class _Job:
    """A derived row waiting for a batched diffusion generator."""

    anchor: Sample
    row_id: str
    kind: str  # positive | negative
    op: str  # positive | remove | replace | swap | img2img
    prompt: str
    label: int
    bg_label: int
    caption: str
    bg_phrases: list[str]
    extra: dict[str, Any]
    alt: str = ""
    strengths: tuple[float, ...] = ()


class CounterfactualBuilder:
    """Chooses partners (backgrounds, objects, prompts) for anchors and runs the generators on them.

    ``positive_generator`` / ``negative_generator``: a diffusion generator
    (:class:`~augment.synthesize.inpaint.InpaintGenerator`, an edit generator) or None for the
    cut-and-paste :class:`~augment.synthesize.composite.CompositeGenerator`. Diffusion jobs of a chunk
    of anchors are collected first and run together, so the generator sees full batches; each row's
    seed depends only on ``(--seed, row id)``. ``filters`` (:class:`~augment.filters.Filters`) check
    every diffusion output; a refused image is a ``filter`` rejection with the reason.
    """

    max_partner_attempts = 16

    def __init__(
        self,
        source: Source,
        split: str,
        indices: list[int],
        config: GenerateConfig,
        cache: _SampleCache,
        positive_generator=None,
        negative_generator=None,
        filters=None,
    ):
        self.source, self.split, self.config = source, split, config
        labels = source.labels(split)
        self.pool = np.asarray(indices, dtype=np.int64)
        self.pool_labels = labels[self.pool]
        self.cache = cache
        self.generator = CompositeGenerator()
        self.positive_generator = positive_generator
        self.negative_generator = negative_generator
        self.filters = filters
        # --positives texture: negatives carry the anchor's texture, cut by this (None otherwise)
        self.texture_cutter = None
        if positive_generator is not None and positive_generator.name == "texture":
            from .synthesize.texture import TextureGenerator

            self.texture_cutter = (
                positive_generator if isinstance(positive_generator, TextureGenerator) else TextureGenerator()
            )
        # with a diffusion generator, anchors are built a chunk at a time (full batches)
        self.batched = positive_generator is not None or negative_generator is not None

    def _partner(self, anchor: Sample, role: str) -> tuple[Sample | None, str]:
        """A usable item of another class with a mask, chosen by the row's own seed."""
        candidates = self.pool[(self.pool_labels != anchor.label) & (self.pool_labels >= 0)]
        if candidates.size == 0:
            return None, "no image of another class to take a partner from"
        rng = item_rng(self.config.seed, f"{anchor.id}/{role}")
        tried = []
        for _ in range(min(self.max_partner_attempts, candidates.size)):
            j = int(candidates[rng.integers(candidates.size)])
            try:
                partner = self.cache.get(j)
            except RejectedInput:
                tried.append(j)
                continue
            if partner.mask is None or mask_coverage_problem(partner.mask):
                tried.append(j)
                continue
            return partner, ""
        return None, f"no usable partner with a mask among {len(tried)} tried ({role})"

    def _name(self, sample: Sample) -> str:
        return sample.meta.get("object", self.source.class_names[sample.label])

    def build(self, anchor: Sample) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """Rows derived from ``anchor`` and rejections ``(id, stage, reason)``."""
        return self.build_chunk([anchor])

    def build_chunk(self, anchors: list[Sample]) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """Rows derived from each anchor (composite rows first, then diffusion rows) and rejections."""
        rows: list[Row] = []
        rejections: list[tuple[str, str, str]] = []
        jobs: list[_Job] = []
        saliency = getattr(self.positive_generator, "name", None) == "saliency"
        if saliency:  # needs no mask: every anchor of the chunk in one batch
            more, refused = self._saliency_rows(anchors)
            rows += more
            rejections += refused
        for anchor in anchors:
            where = anchor.path or anchor.id
            if saliency and not self.config.negatives:
                continue
            derived = "composite negatives" if saliency else "counterfactuals"
            if anchor.mask is None and anchor.meta.get("mask_error"):
                continue  # the segmentation stage has recorded why there is no mask
            if anchor.mask is None:
                rejections.append(
                    (
                        anchor.id,
                        "composite",
                        f"{where}: no foreground mask, so no {derived} (give --mask-dir)",
                    )
                )
                continue
            problem = mask_coverage_problem(anchor.mask)
            if problem:  # the original is kept; nothing can be swapped or removed
                rejections.append((anchor.id, "composite", f"{where}: {problem}, so no {derived}"))
                continue
            for k in range(0 if saliency else self.config.num_positives):
                self._plan_positive(anchor, k, rows, rejections, jobs)
            for k, neg in enumerate(self.config.negatives):
                self._plan_negative(anchor, k, neg, rows, rejections, jobs)
        if jobs:
            more, refused = self._run(jobs)
            rows += more
            rejections += refused
        return rows, rejections

    # -- planning -------------------------------------------------------------------------------
    def _alt_background(self, anchor: Sample, k: int) -> tuple[str | None, int, dict[str, Any], str]:
        """The new background of positive ``k``: the anchor's k-th alternative-background phrase, else
        the background of a partner of another class; returns (phrase, bg_label, recipe extra, why not)."""
        alts = anchor.meta.get("alt_phrases") or []
        if alts:
            return alts[k % len(alts)], -1, {"alt_source": "alt_phrases"}, ""
        partner, why = self._partner(anchor, f"positive/{k}")
        if partner is None:
            return None, -1, {}, why
        name = background_name(partner)
        if not name:
            return None, -1, {}, f"partner {partner.id} has no background phrase to prompt with"
        return name, background_class(partner), {"background_source_id": partner.id}, ""

    def _plan_positive(self, anchor, k, rows, rejections, jobs) -> None:
        row_id = f"{anchor.id}/positive/{k}"
        where = anchor.path or anchor.id
        gen = self.positive_generator
        if gen is not None and gen.name == "texture":
            self._plan_texture_positive(anchor, row_id, f"positive/{k}", rows, rejections, jobs)
            return
        if gen is None:
            partner, why = self._partner(anchor, f"positive/{k}")
            if partner is None:
                rejections.append((row_id, "composite", f"{where}: {why}"))
                return
            out = self.generator(
                background_image=[partner.image],
                background_mask=[partner.mask],
                image=[anchor.image],
                mask_image=[anchor.mask],
            )
            rows.append(
                Row(
                    id=row_id,
                    image=out.images[0],
                    mask=out.masks[0],
                    label=anchor.label,
                    bg_label=background_class(partner),
                    kind="positive",
                    source_id=anchor.id,
                    caption=scene_caption(self._name(anchor), background_name(partner)),
                    bg_phrases=list(partner.meta.get("bg_phrases", [])),
                    recipe={
                        **out.recipes[0],
                        "background_source_id": partner.id,
                        "seed": item_seed(self.config.seed, row_id),
                    },
                )
            )
            return
        alt, bg_label, extra, why = self._alt_background(anchor, k)
        if alt is None:
            rejections.append((row_id, gen.name, f"{where}: {why}"))
            return
        common = dict(
            anchor=anchor,
            row_id=row_id,
            kind="positive",
            label=anchor.label,
            bg_label=bg_label,
            caption=scene_caption(self._name(anchor), alt),
            bg_phrases=[alt],
            extra=extra,
        )
        if gen.name == "instruct-pix2pix":
            bg = background_name(anchor)
            if not bg:
                rejections.append(
                    (row_id, gen.name, f"{where}: no background phrase to edit (give --llm or captions)")
                )
                return
            jobs.append(_Job(op="swap", prompt=bg, alt=alt, **common))
        elif gen.name == "img2img":
            jobs.append(
                _Job(op="img2img", prompt=common["caption"], strengths=tuple(gen.strengths), **common)
            )
        else:
            jobs.append(_Job(op="positive", prompt=render(CAPTION_BACKGROUND, background=alt), **common))

    # -- texture counterfactuals (--positives texture) ------------------------------------------
    def _texture_words(self, sample: Sample, name: str | None = None) -> str:
        """``"{texture} {object}"`` when the sample's texture has a name, else the object's name."""
        name = name or self._name(sample)
        return f"{sample.meta['texture']} {name}" if sample.meta.get("texture") else name

    def _plan_texture_positive(self, anchor, row_id, role, rows, rejections, jobs) -> None:
        """The anchor's shape (mask) filled with another class's texture (augment/synthesize/texture.py)."""
        from .sources.synthetic import TEXTURE_WORDS
        from .synthesize.texture import choose_family

        gen, where = self.positive_generator, anchor.path or anchor.id
        seed = item_seed(self.config.seed, row_id)
        source = gen.texture_source
        partner = family = patch = None
        if source in ("dataset", "edit"):
            partner, why = self._partner(anchor, role)
            if partner is None:
                rejections.append((row_id, gen.name, f"{where}: {why}"))
                return
        if source == "dataset":
            patch = gen.patch(partner.image, partner.mask)
            if patch is None:
                rejections.append(
                    (
                        row_id,
                        gen.name,
                        f"{where}: partner {partner.id}'s object is too small to cut a texture from",
                    )
                )
                return
        extra: dict[str, Any] = {"texture_source": source}
        if partner is not None:
            extra["texture_source_id"] = partner.id
        word = partner.meta.get("texture") if partner is not None else None
        if source == "procedural" or (source == "edit" and not word):
            family = choose_family(gen.num_families, {anchor.label, anchor.bg_label}, seed)
            word = TEXTURE_WORDS[family]
        bg_label = family if family is not None else background_class(partner)
        name = self._name(anchor)
        obj = f"{word} {name}" if word else name
        caption = scene_caption(obj, background_name(anchor))
        bg_phrases = list(anchor.meta.get("bg_phrases", []))
        if source == "edit":
            prompt = (
                render(EDIT_TEXTURE, object=name, texture=word)
                if gen.editor.name == "instruct-pix2pix"
                else render(CAPTION_LABEL, label=obj)
            )
            extra["texture"] = word
            jobs.append(
                _Job(
                    anchor=anchor,
                    row_id=row_id,
                    kind="positive",
                    op="texture",
                    prompt=prompt,
                    label=anchor.label,
                    bg_label=bg_label,
                    caption=caption,
                    bg_phrases=bg_phrases,
                    extra=extra,
                )
            )
            return
        out = gen([anchor.image], [anchor.mask], [seed], patches=[patch], families=[family])
        rows.append(
            Row(
                id=row_id,
                image=out.images[0],
                mask=out.masks[0],
                label=anchor.label,
                bg_label=bg_label,
                kind="positive",
                source_id=anchor.id,
                caption=caption,
                bg_phrases=bg_phrases,
                recipe={**out.recipes[0], **extra},
            )
        )

    def _plan_texture_negative(self, anchor, k, neg, rows, rejections) -> None:
        """The anchor's own texture on another class's shape (replace), or alone (remove, label -1)."""
        row_id = f"{anchor.id}/negative/{k}"
        where = anchor.path or anchor.id
        cutter = self.texture_cutter
        patch = cutter.patch(anchor.image, anchor.mask)
        if patch is None:
            rejections.append(
                (row_id, cutter.name, f"{where}: the object is too small to cut its texture from")
            )
            return
        seed = item_seed(self.config.seed, row_id)
        extra: dict[str, Any] = {"negative": neg, "texture_source_id": anchor.id}
        word = anchor.meta.get("texture")
        if neg == "replace":
            partner, why = self._partner(anchor, f"negative/{k}")
            if partner is None:
                rejections.append((row_id, cutter.name, f"{where}: {why}"))
                return
            out = cutter(
                [partner.image], [partner.mask], [seed], patches=[patch], operation="texture_on_shape"
            )
            label, extra["object_source_id"] = partner.label, partner.id
            name = self._name(partner)
            caption = scene_caption(f"{word} {name}" if word else name, background_name(partner))
            bg_phrases = list(partner.meta.get("bg_phrases", []))
        else:
            out = cutter([anchor.image], [None], [seed], patches=[patch])
            label, bg_phrases = -1, []
            caption = render(CAPTION_BACKGROUND, background=f"a {word} texture") if word else ""
        rows.append(
            Row(
                id=row_id,
                image=out.images[0],
                mask=out.masks[0],
                label=label,
                bg_label=background_class(anchor),
                kind="negative",
                source_id=anchor.id,
                caption=caption,
                bg_phrases=bg_phrases,
                recipe={**out.recipes[0], **extra},
            )
        )

    def _plan_negative(self, anchor, k, neg, rows, rejections, jobs) -> None:
        if self.texture_cutter is not None:
            self._plan_texture_negative(anchor, k, neg, rows, rejections)
            return
        row_id = f"{anchor.id}/negative/{k}"
        where = anchor.path or anchor.id
        bg_name = background_name(anchor)
        partner = None
        if neg == "replace":
            partner, why = self._partner(anchor, f"negative/{k}")
            if partner is None:
                stage = "composite" if self.negative_generator is None else self.negative_generator.name
                rejections.append((row_id, stage, f"{where}: {why}"))
                return
        if self.negative_generator is not None:
            if neg == "remove":
                prompt = render(CAPTION_BACKGROUND, background=bg_name or "the background")
                label, caption, extra = (
                    -1,
                    render(CAPTION_BACKGROUND, background=bg_name) if bg_name else "",
                    {},
                )
            else:
                other = self._name(partner)
                prompt = render(CAPTION_LABEL, label=other)
                label, caption = partner.label, scene_caption(other, bg_name)
                extra = {"object_source_id": partner.id}
            jobs.append(
                _Job(
                    anchor=anchor,
                    row_id=row_id,
                    kind="negative",
                    op=neg,
                    prompt=prompt,
                    label=label,
                    bg_label=background_class(anchor),
                    caption=caption,
                    bg_phrases=list(anchor.meta.get("bg_phrases", [])),
                    extra={**extra, "negative": neg, "background_source_id": anchor.id},
                )
            )
            return
        if neg == "remove":
            out = self.generator(background_image=[anchor.image], background_mask=[anchor.mask])
            label, extra = -1, {}
            caption = render(CAPTION_BACKGROUND, background=bg_name) if bg_name else ""
        else:
            out = self.generator(
                background_image=[anchor.image],
                background_mask=[anchor.mask],
                image=[partner.image],
                mask_image=[partner.mask],
                placement="center",
            )
            label, extra = partner.label, {"object_source_id": partner.id}
            caption = scene_caption(self._name(partner), bg_name)
        rows.append(
            Row(
                id=row_id,
                image=out.images[0],
                mask=out.masks[0],
                label=label,
                bg_label=background_class(anchor),
                kind="negative",
                source_id=anchor.id,
                caption=caption,
                bg_phrases=list(anchor.meta.get("bg_phrases", [])),
                recipe={
                    **out.recipes[0],
                    **extra,
                    "negative": neg,
                    "background_source_id": anchor.id,
                    "seed": item_seed(self.config.seed, row_id),
                },
            )
        )

    def _saliency_rows(self, anchors: list[Sample]) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """``--positives saliency``: one positive per anchor (and its complement negative with
        ``--saliency-negatives``); a view on which the classifier loses the label is a rejection."""
        gen = self.positive_generator
        if not anchors:
            return [], []
        if getattr(self, "_fill", None) is None:
            self._fill = self._mean_colour()
        out = gen([a.image for a in anchors], [a.label for a in anchors], self._fill)
        rows, rejections = [], []
        names = self.source.class_names
        neg_k = len(self.config.negatives)  # after the composite negatives' row ids
        for i, anchor in enumerate(anchors):
            pos_id, neg_id = f"{anchor.id}/positive/0", f"{anchor.id}/negative/{neg_k}"
            if not out.kept_prediction[i]:
                why = (
                    f"{anchor.path or anchor.id}: the classifier predicts {out.predictions[i]!r}, not "
                    f"{names[anchor.label]!r}, on the saliency-masked view"
                )
                rejections.append((pos_id, gen.name, why))
                if out.complements is not None:
                    rejections.append((neg_id, gen.name, f"{why}, so its complement is no negative"))
                continue
            recipe = {**out.recipes[i], "seed": item_seed(self.config.seed, pos_id)}
            rows.append(
                Row(
                    id=pos_id,
                    image=out.images[i],
                    mask=out.masks[i],
                    label=anchor.label,
                    bg_label=-1,  # the background is the fill colour, no class's
                    kind="positive",
                    source_id=anchor.id,
                    caption=scene_caption(self._name(anchor), None),
                    recipe=recipe,
                )
            )
            if out.complements is not None:
                rows.append(
                    Row(
                        id=neg_id,
                        image=out.complements[i],
                        mask=None,
                        label=-1,
                        bg_label=background_class(anchor),
                        kind="negative",
                        source_id=anchor.id,
                        caption="",
                        bg_phrases=list(anchor.meta.get("bg_phrases", [])),
                        recipe={
                            **recipe,
                            "negative": "saliency-complement",
                            "background_source_id": anchor.id,
                        },
                    )
                )
        return rows, rejections

    def _mean_colour(self, limit: int = 512) -> list[int]:
        """The mean RGB colour of up to ``limit`` originals of the split (evenly spaced; each image
        weighted equally), the colour the saliency views fill the dropped pixels with."""
        picks = np.unique(np.linspace(0, self.pool.size - 1, min(limit, self.pool.size)).round().astype(int))
        means = []
        for j in picks.tolist():
            try:
                sample = self.cache.get(int(self.pool[j]))
            except RejectedInput:
                continue
            means.append(np.asarray(sample.image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0))
        if not means:
            raise ValueError(f"split {self.split}: no readable original to take the mean colour from")
        return [int(round(c)) for c in np.mean(means, axis=0)]

    # -- running --------------------------------------------------------------------------------
    def _run(self, jobs: list[_Job]) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """Run the diffusion jobs, one generator call per operation, then filter and make rows."""
        made: list[tuple[_Job, Any, Any, dict[str, Any], str]] = []  # job, image, mask, recipe, row id
        for op in ("positive", "swap", "img2img", "texture", "remove", "replace"):
            group = [j for j in jobs if j.op == op]
            if not group:
                continue
            gen = self.positive_generator if group[0].kind == "positive" else self.negative_generator
            images = [j.anchor.image for j in group]
            masks = [j.anchor.mask for j in group]
            seeds = [item_seed(self.config.seed, j.row_id) for j in group]
            prompts = [j.prompt for j in group]
            if op == "swap":
                out = gen.swap_background(images, masks, prompts, [j.alt for j in group], seeds)
            elif op == "img2img":
                out = gen.positive(images, masks, prompts, seeds)
            else:
                out = getattr(gen, op)(images, masks, prompts, seeds)
            per_job = len(out.images) // len(group)
            for i, job in enumerate(group):
                for s in range(per_job):
                    o = i * per_job + s
                    row_id = job.row_id
                    if per_job > 1:  # img2img: one row per strength
                        base, k = row_id.rsplit("/", 1)
                        row_id = f"{base}/{int(k) * per_job + s}"
                    made.append((job, out.images[o], out.masks[o], out.recipes[o], row_id))
        reasons: list[str | None] = [None] * len(made)
        if self.filters is not None and made:
            reasons = self.filters(
                [m[1] for m in made],
                [m[0].label for m in made],
                list(self.source.class_names),
                [m[2] for m in made],
                [m[0].anchor.mask for m in made],
                [m[3] for m in made],
                anchor_images=[m[0].anchor.image for m in made],
            )
        rows, rejections = [], []
        for (job, image, mask, recipe, row_id), reason in zip(made, reasons, strict=True):
            if reason is not None:
                rejections.append((row_id, "filter", f"{job.anchor.path or job.anchor.id}: {reason}"))
                continue
            if isinstance(mask, np.ndarray):
                mask = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
            rows.append(
                Row(
                    id=row_id,
                    image=image,
                    mask=mask,
                    label=job.label,
                    bg_label=job.bg_label,
                    kind=job.kind,
                    source_id=job.anchor.id,
                    caption=job.caption,
                    bg_phrases=job.bg_phrases,
                    recipe={**recipe, **job.extra},
                )
            )
        return rows, rejections


def original_row(sample: Sample) -> Row:
    # the source's own provenance (e.g. where a mask came from), then the annotation stage's
    recipe: dict[str, Any] = {
        "generator": "source",
        **sample.meta.get("recipe", {}),
        **sample.meta.get("annotation", {}),
    }
    if sample.path:
        recipe["file"] = sample.meta.get("file")
    return Row(
        id=sample.id,
        image=sample.image,
        mask=sample.mask,
        label=sample.label,
        bg_label=sample.bg_label,
        kind="original",
        source_id=sample.id,
        caption=sample.caption,
        fg_phrases=list(sample.meta.get("fg_phrases", [])),
        bg_phrases=list(sample.meta.get("bg_phrases", [])),
        alt_phrases=list(sample.meta.get("alt_phrases", [])),
        recipe=recipe,
    )


UNCOMPARED = ("output", "overwrite", "progress")  # flags that do not change what is generated


def run_settings(config: GenerateConfig) -> dict[str, Any]:
    """The settings a rerun on the same ``--output`` must share to resume: every flag but
    :data:`UNCOMPARED`, and the package version (as JSON values)."""
    settings = {k: v for k, v in asdict(config).items() if k not in UNCOMPARED}
    settings["package_version"] = __version__
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


@dataclass
class WorkUnit:
    """``--chunk-size`` consecutive originals (source indices) of one split: the unit of work that is
    shared out between processes and committed to the work folder as a whole."""

    split: str
    k: int
    indices: list[int]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.k:05d}"


def plan_units(source: Source, config: GenerateConfig) -> list[WorkUnit]:
    """Every unit of the run, by split (the source's order), then position in the split."""
    units = []
    for split in source.splits():
        indices = select_indices(source.labels(split), config.limit)
        for k, s in enumerate(range(0, len(indices), config.chunk_size)):
            units.append(WorkUnit(split, k, indices[s : s + config.chunk_size]))
    return units


def check_config(config: GenerateConfig) -> None:
    """Refuse bad flag values (before any model loads or file is written)."""
    if config.num_positives < 0:
        raise ValueError(f"--num-positives must be >= 0, got {config.num_positives}")
    if "inpaint" in config.negatives:  # --negatives inpaint: both kinds, made by inpainting
        config.negatives = [n for n in config.negatives if n != "inpaint"] or list(NEGATIVE_KINDS)
        config.negative_generator = "inpaint"
    bad = [n for n in config.negatives if n not in NEGATIVE_KINDS]
    if bad:
        raise ValueError(
            f"--negatives: unknown kind(s) {bad}; choose from {list(NEGATIVE_KINDS)} (or 'inpaint')"
        )
    if config.positives not in POSITIVE_GENERATORS:
        raise ValueError(f"--positives must be one of {list(POSITIVE_GENERATORS)}, got {config.positives!r}")
    if config.negative_generator not in ("composite", "inpaint"):
        raise ValueError(
            f"--negative-generator must be composite or inpaint, got {config.negative_generator!r}"
        )
    if config.edit_kind not in ("instruct", "img2img"):
        raise ValueError(f"--edit-kind must be instruct or img2img, got {config.edit_kind!r}")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {config.limit}")
    if config.chunk_size < 1:
        raise ValueError(f"--chunk-size must be >= 1, got {config.chunk_size}")
    if config.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {config.shard_size}")


def run(config: GenerateConfig) -> dict[str, Any]:
    """Run the generation job; returns the writer's summary (counts per split, kind and stage).

    Under ``accelerate launch`` every process runs this: the units (:class:`WorkUnit`) still to do are
    shared out round-robin, each process commits its units to the work folder
    (:mod:`augment.workfolder`), and the main process merges them into the dataset folder; the other
    processes return ``{"process_index": i, "units": n}``. A rerun on the same ``--output`` resumes
    (only the units not yet finished are made); a finished dataset with the same settings returns
    ``{"complete": True, ...}`` at once.
    """
    check_config(config)
    state = process_state(config.device)
    rank, world = state.process_index, state.num_processes
    trust.configure(config.trust_remote_code, config.allow_bin_weights)
    source = build_source(config.source, **config.source_kwargs())
    start = time.perf_counter()
    settings_key = run_settings(config)
    status = inspect_output(config.output, settings_key, config.overwrite)  # read-only, every process
    state.wait_for_everyone()
    work = WorkFolder(config.output)
    if status == "complete":
        if state.is_main_process:
            work.drop_trash()
        return {"complete": True, "output": str(config.output)}
    annotator = build_annotator(config, source.class_names)  # loads models: fail before writing
    positive_gen, negative_gen, filters = build_generators(config)
    if state.is_main_process:
        work.start(settings_key, fresh=status == "fresh")
    state.wait_for_everyone()
    units = plan_units(source, config)
    progress = config.progress and state.is_local_main_process

    schema = dataset_features(source.class_names).arrow_schema
    made = 0
    for split in dict.fromkeys(u.split for u in units):
        units_of_split = [u for u in units if u.split == split]
        cache = _SampleCache(source, split)  # one split at a time, as the two stages share it

        # 1. the language and segmentation stage, unit by unit
        todo = [u for u in units_of_split if not work.annotated(u.name)]
        state.wait_for_everyone()  # every process has listed the finished units before any is added
        mine = todo[rank::world]
        bar = tqdm(total=sum(len(u.indices) for u in mine), desc=f"describe {split}", disable=not progress)
        for unit in mine:
            work.save_annotation(unit.name, annotate_unit(annotator, cache, unit))
            bar.update(len(unit.indices))
        bar.close()
        state.wait_for_everyone()

        # 2. originals and counterfactuals, unit by unit
        todo = [u for u in units_of_split if not work.generated(u.name)]
        state.wait_for_everyone()
        mine = todo[rank::world]
        if not mine:
            continue
        for unit in units_of_split:  # partners come from the whole split: every unit's annotations
            for index, annotation in work.load_annotation(unit.name)["annotations"].items():
                cache.annotate(index, annotation)
        pool = [i for u in units_of_split for i in u.indices]
        builder = (
            CounterfactualBuilder(source, split, pool, config, cache, positive_gen, negative_gen, filters)
            if split in config.counterfactual_splits
            else None
        )
        bar = tqdm(total=sum(len(u.indices) for u in mine), desc=f"generate {split}", disable=not progress)
        for unit in mine:
            rows, rejections = generate_unit(source, cache, builder, unit)
            data, _ = parquet_bytes([row.encode() for row in rows], schema)
            manifest = {
                "split": split,
                "unit": unit.k,
                "inputs": len(unit.indices),
                "ids": [row.id for row in rows],
                "rejections": rejections,
            }
            work.commit_unit(unit.name, data, manifest)
            bar.update(len(unit.indices))
        bar.close()
        made += len(mine)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {"process_index": rank, "units": made}

    # 3. the merge, on the main process
    settings = {
        **asdict(config),
        **source.describe(),
        "generator": config.positives,
        "annotation": annotator.describe(),
        "loading": trust.describe(),
        "generators": {
            "positives": positive_gen.describe() if positive_gen is not None else {"generator": "composite"},
            "negatives": negative_gen.describe() if negative_gen is not None else {"generator": "composite"},
            "filters": filters.describe() if filters is not None else None,
        },
    }
    for key in ("progress", "overwrite"):
        settings.pop(key, None)
    summary, rejected = merge_units(
        work,
        units,
        source.class_names,
        config.shard_size,
        settings,
        f"Generated from the `{source.name}` source by scripts/generate.py.",
    )
    inputs = sum(len(u.indices) for u in units)
    originals = sum(c.get("original", 0) for c in summary["splits"].values())
    rejected_inputs = sum(1 for r in rejected if r["stage"] in ("read", "mask", "label"))
    summary["inputs"] = inputs
    summary["originals"] = originals
    summary["rejected_inputs"] = rejected_inputs
    summary["processes"] = world
    summary["resumed"] = status == "resume"
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if originals + rejected_inputs != inputs:  # the accounting every run must satisfy
        raise RuntimeError(
            f"internal error: {inputs} inputs but {originals} written + {rejected_inputs} rejected"
        )
    fault_point("merged")  # the dataset is complete, the work folder not yet removed
    work.finish()
    return summary


def annotate_unit(annotator: Annotator, cache: _SampleCache, unit: WorkUnit) -> dict[str, Any]:
    """Caption, phrases and masks for the originals of one unit: ``annotations`` (source index ->
    :class:`~augment.annotate.Annotation`), ``rejections`` and encoded ``phrase_masks``.
    Unreadable inputs are skipped here; :func:`generate_unit` records them."""
    loaded: list[tuple[int, Sample]] = []
    for index in unit.indices:
        try:
            loaded.append((index, cache.get(index)))
        except RejectedInput:
            continue
    annotations, rejections, phrase_masks = annotator([sample for _, sample in loaded])
    return {
        "annotations": {index: a for (index, _), a in zip(loaded, annotations, strict=True)},
        "rejections": [tuple(r) for r in rejections],
        "phrase_masks": [
            phrase_mask_record(pm.id, pm.phrase, pm.mask, pm.boxes, pm.scores) for pm in phrase_masks
        ],
    }


def generate_unit(
    source: Source, cache: _SampleCache, builder: CounterfactualBuilder | None, unit: WorkUnit
) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """The rows of one unit (each original, then what is derived from it; with a diffusion generator,
    the unit's originals, then their derived rows) and its rejections ``(id, stage, reason)``."""
    rows: list[Row] = []
    rejections: list[tuple[str, str, str]] = []
    anchors = []
    for index in unit.indices:
        try:
            sample = cache.get(index)
        except RejectedInput as e:
            rejections.append((source.item_id(unit.split, index), e.stage, e.reason))
            continue
        rows.append(original_row(sample))
        anchors.append(sample)
        if builder is not None and not builder.batched:  # cut-and-paste: rows right after
            more, refused = builder.build(sample)
            rows += more
            rejections += refused
    if builder is not None and builder.batched:  # diffusion: the unit's jobs together
        more, refused = builder.build_chunk(anchors)
        rows += more
        rejections += refused
    return rows, rejections


def merge_units(
    work: WorkFolder,
    units: list[WorkUnit],
    class_names: list[str],
    shard_size: int,
    settings: dict[str, Any],
    description: str,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Write the dataset folder from the finished units, in the order of a single-process run (per
    split: the annotation stage's rejections and phrase masks, then rows and rejections unit by unit),
    then check the folder's ids against the manifests. Returns the writer's summary and rejections."""
    for entry in work.output.iterdir():  # what an interrupted merge left
        if entry.name != WORK:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    writer = DatasetWriter(work.output, class_names, shard_size=shard_size, keep=(WORK,))
    expected: dict[str, list[str]] = {}
    splits = list(dict.fromkeys(u.split for u in units))
    for split in splits:
        mine = [u for u in units if u.split == split]
        for unit in mine:
            annotated = work.load_annotation(unit.name)
            for rid, stage, reason in annotated["rejections"]:
                writer.reject(rid, split, stage, reason)
            for record in annotated["phrase_masks"]:
                writer.add_phrase_mask_record(split, record)
        ids = expected.setdefault(split, [])
        for unit in mine:
            data, manifest = work.load_unit(unit.name)
            for record in pq.read_table(pa.BufferReader(data)).to_pylist():
                writer.add_record(split, record)
            for rid, stage, reason in manifest["rejections"]:
                writer.reject(rid, split, stage, reason)
            ids += manifest["ids"]
            fault_point("merge")
    if not any(writer.counts.values()):
        raise RuntimeError(no_usable_input(sum(len(u.indices) for u in units), writer.rejected))
    summary = writer.close(settings=settings, description=description)
    for split, ids in expected.items():
        files = sorted((work.output / "data").glob(f"{split}-*-of-*.parquet"))
        written = [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]
        if written != ids:
            raise RuntimeError(
                f"internal error: the merged {split} split of {work.output} has {len(written)} rows, "
                f"the finished units {len(ids)} (or another order); rerun with --overwrite"
            )
    return summary, writer.rejected


def no_usable_input(inputs: int, rejected: list[dict[str, str]], shown: int = 10) -> str:
    """The error of a run that kept nothing: how many inputs, and the first reasons."""
    reasons = [f"[{r['stage']}] {r['reason']}" for r in rejected[:shown]]
    more = f"\n  ... and {len(rejected) - shown} more" if len(rejected) > shown else ""
    listed = "".join(f"\n  {r}" for r in reasons)
    return f"no usable input: all {inputs} inputs were rejected, nothing was written:{listed}{more}"


def build_generators(config: GenerateConfig):
    """The diffusion generators (None = cut-and-paste) and the filters of their outputs.

    One inpainting pipeline serves positives and negatives when both use it.
    """
    knobs = {
        k: v
        for k, v in {
            "steps": config.steps,
            "guidance": config.guidance,
            "negative_prompt": config.negative_prompt,
            "batch_size": config.diffusion_batch_size,
            "resolution": config.resolution,
        }.items()
        if v is not None
    }
    common = {"device": config.device, "dtype": config.dtype}
    inpaint = None

    def inpainter():
        nonlocal inpaint
        if inpaint is None:
            from .synthesize.inpaint import InpaintGenerator

            extra = {"strength": config.strength} if config.strength is not None else {}
            inpaint = InpaintGenerator.from_pretrained(
                config.inpaint_model, **common, **knobs, **extra, dilate=config.inpaint_dilate
            )
        return inpaint

    positive = negative = None
    if config.positives == "texture":
        positive = build_texture_generator(config, common, knobs)
        if positive.texture_source != "edit":  # no model, nothing to filter
            return positive, None, None
    elif config.positives == "saliency":
        from .synthesize.saliency import SaliencyGenerator

        if config.num_positives != 1:
            raise ValueError(
                "--positives saliency makes one positive per original (the view is deterministic); "
                f"--num-positives must be 1, got {config.num_positives}"
            )
        positive = SaliencyGenerator.from_pretrained(
            config.classifier,
            device=config.device,
            threshold=config.saliency_threshold,
            layer=config.saliency_layer,
            negatives=config.saliency_negatives,
        )
    elif config.positives == "inpaint":
        positive = inpainter()
    elif config.positives == "edit" and config.edit_kind == "instruct":
        from .synthesize.edit import InstructEditGenerator

        extra = {"image_guidance": config.image_guidance} if config.image_guidance is not None else {}
        knobs_edit = {k: v for k, v in knobs.items() if k != "negative_prompt"}
        positive = InstructEditGenerator.from_pretrained(config.edit_model, **common, **knobs_edit, **extra)
    elif config.positives == "edit":
        from .synthesize.edit import Img2ImgGenerator

        extra = {"strengths": tuple(config.strengths)} if config.strengths else {}
        positive = Img2ImgGenerator.from_pretrained(config.img2img_model, **common, **knobs, **extra)
    if config.negative_generator == "inpaint" and config.negatives:
        negative = inpainter()
    filters = None
    if (positive is not None and config.positives != "saliency") or negative is not None:
        from .filters import Filters

        filters = Filters.from_config(config.filters, device=config.device)
    return positive, negative, filters


def build_texture_generator(config: GenerateConfig, common: dict[str, Any], knobs: dict[str, Any]):
    """``--positives texture``: a :class:`~.synthesize.texture.TextureGenerator` (dataset or procedural
    textures) or, with ``--texture-source edit``, a :class:`~.synthesize.texture.TextureEditGenerator`
    around the ``--edit-kind`` model."""
    from .sources.synthetic import BACKGROUND_NAMES
    from .synthesize.texture import TEXTURE_SOURCES, TextureEditGenerator, TextureGenerator

    if config.texture_source not in TEXTURE_SOURCES:
        raise ValueError(
            f"--texture-source must be one of {list(TEXTURE_SOURCES)}, got {config.texture_source!r}"
        )
    if config.negative_generator != "composite":
        raise ValueError(
            "--positives texture makes its own negatives (the anchor's texture on another class's shape); "
            f"--negative-generator {config.negative_generator} does not apply"
        )
    families = (
        min(config.num_classes, len(BACKGROUND_NAMES))
        if config.source == "synthetic"
        else len(BACKGROUND_NAMES)
    )
    if config.texture_source != "edit":
        return TextureGenerator(config.texture_source, num_families=max(2, families))
    from .synthesize.edit import Img2ImgGenerator, InstructEditGenerator

    if config.edit_kind == "instruct":
        extra = {"image_guidance": config.image_guidance} if config.image_guidance is not None else {}
        knobs = {k: v for k, v in knobs.items() if k != "negative_prompt"}
        editor = InstructEditGenerator.from_pretrained(config.edit_model, **common, **knobs, **extra)
    else:
        extra = {"strengths": tuple(config.strengths)} if config.strengths else {}
        editor = Img2ImgGenerator.from_pretrained(config.img2img_model, **common, **knobs, **extra)
    return TextureEditGenerator(editor, num_families=max(2, families))


def build_annotator(config: GenerateConfig, class_names: list[str]) -> Annotator:
    """The caption / extract / segment models the flags ask for, loaded once for the whole run."""
    if config.mask_source not in MASK_SOURCES:
        raise ValueError(f"--mask-source must be one of {list(MASK_SOURCES)}, got {config.mask_source!r}")
    if config.mask_source == "given" and (config.sam or config.sam_checkpoint or config.detector):
        raise ValueError(
            "--sam/--sam-checkpoint/--detector are only used with --mask-source sam or grounded; "
            "with --mask-source given the source's masks are used"
        )
    segmenter = segmenter_from_config(config)  # first: its flag errors show before the LLM loads
    captioner = extractor = None
    if config.captioner:
        from .describe import Captioner

        captioner = Captioner.from_pretrained(
            config.captioner,
            device=config.device,
            dtype=config.dtype,
            batch_size=config.caption_batch_size,
            max_new_tokens=config.caption_max_new_tokens,
            num_beams=config.caption_num_beams,
        )
    if config.llm:
        from .extract import LLMExtractor

        extractor = LLMExtractor.from_pretrained(
            config.llm,
            device=config.device,
            dtype=config.dtype,
            max_new_tokens=config.llm_max_new_tokens,
            batch_size=config.llm_batch_size,
            max_repairs=config.llm_max_repairs,
        )
    return Annotator(class_names, captioner=captioner, extractor=extractor, segmenter=segmenter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description=(
            "Build a counterfactual dataset (originals, positives, negatives) from the built-in synthetic "
            "benchmark or an image folder, written as a Hugging Face dataset folder."
        ),
        epilog=(
            "Resuming: work is committed to OUTPUT/.work/ one unit (--chunk-size originals of a split) "
            "at a time, atomically. If the job dies (even killed), run the same command again: finished "
            "units are kept, the rest is made, and the dataset is the one an uninterrupted run writes. "
            "A rerun with other settings is refused (naming them) unless --overwrite. A rerun on a "
            "finished dataset with the same settings says so and exits 0. "
            "Several processes: 'accelerate launch --multi_gpu --num_processes N scripts/generate.py "
            "...' (or a multi-node accelerate launch; OUTPUT must then be on a shared filesystem) shares "
            "the units out, each process loads the models on its own GPU, and the main process merges "
            "the units; the dataset is the same, row for row, whatever N is."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=["synthetic", *SOURCES],
        default="synthetic",
        help="where the labelled images come from: the built-in benchmark; an image folder "
        "<split>/<class>/<file>; the Background Challenge's released layout; Hard ImageNet (ImageNet "
        "folders + its masks); any Hugging Face dataset (a Hub name or a local folder)",
    )
    p.add_argument(
        "--data-dir",
        help="folder: root of <split>/<class>/<file>; bgchallenge: the root holding original/, "
        "fg_mask/, ...; hardimagenet: the ImageNet root (<split>/<wnid>/<file>); hub: a dataset name or folder",
    )
    p.add_argument(
        "--mask-dir",
        help="folder: root of masks at the same relative paths (PNG, non-zero = object); "
        "hardimagenet: the mask root (<split>/<wnid>_<file>)",
    )
    p.add_argument(
        "--classes",
        nargs="+",
        help="the class list or a subset of it (default: every class the source has)",
    )
    g = p.add_argument_group("bgchallenge and hub sources")
    g.add_argument(
        "--bg-mask-fallback",
        choices=["none", "grabcut"],
        default="none",
        help="bgchallenge: masks for images with neither fg_mask nor only_fg files (grabcut: OpenCV "
        "GrabCut from a centred box; or leave them to --mask-source sam|grounded)",
    )
    g.add_argument("--splits", nargs="+", help="hub: the splits to read (default: all)")
    g.add_argument("--image-column", default="image", help="hub: the image column")
    g.add_argument("--label-column", default="label", help="hub: the class column")
    g.add_argument("--mask-column", help="hub: a foreground-mask column, if any")
    g.add_argument(
        "--group-column",
        help="hub: a column whose value becomes bg_label (e.g. Waterbirds' place attribute)",
    )
    g.add_argument("--caption-column", help="hub: a caption column, if any (else --captioner or the label)")
    g.add_argument("--revision", help="hub: the dataset revision (branch, tag or commit)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="folder and hub sources: an image (or mask) with more pixels (width x height) is rejected "
        "with the reason, a guard against decompression bombs; 0 = no limit",
    )
    p.add_argument("--output", required=True, help="dataset folder to write")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete --output first and start afresh (without it, an unfinished job with the same "
        "settings is resumed and anything else refused)",
    )
    p.add_argument(
        "--limit", type=int, help="at most N originals per split, balanced over classes (quick runs)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="run seed; every row's randomness derives from it and the row id"
    )
    p.add_argument(
        "--counterfactual-splits",
        nargs="+",
        default=["train"],
        help="splits that get positives and negatives",
    )
    p.add_argument(
        "--positives",
        default="composite",
        choices=POSITIVE_GENERATORS,
        help="positive generator: composite (cut-and-paste onto another class's background), inpaint "
        "(keep the object, repaint the background from an alternative-background phrase), edit "
        "(--edit-kind instruct: 'turn the background of {bg} into {alt}'; img2img: DA-Fusion strengths), "
        "texture (keep the object's shape, replace its texture: see --texture-source), "
        "saliency (ExCon: the --classifier's Grad-CAM of the label, the rest filled with the mean colour; "
        "needs no mask)",
    )
    p.add_argument(
        "--texture-source",
        choices=["dataset", "procedural", "edit"],
        default="dataset",
        help="--positives texture: the object's shape is kept and its inside refilled with another class's "
        "texture, cut from inside the object of an image of another class (dataset), drawn by the built-in "
        "benchmark's texture renderers (procedural), or painted by --edit-kind's model from a texture prompt "
        "and kept inside the mask only (edit); negatives then carry the anchor's texture on another class's "
        "shape (replace) or alone (remove)",
    )
    p.add_argument("--num-positives", type=int, default=1, help="positives per original")
    p.add_argument(
        "--negatives",
        nargs="*",
        default=list(NEGATIVE_KINDS),
        help="negative kinds per original: remove (object removed), replace (another class's object); "
        "'inpaint' alone means both, made by --negative-generator inpaint",
    )
    p.add_argument(
        "--negative-generator",
        default="composite",
        choices=["composite", "inpaint"],
        help="how negatives are made: tile-fill / paste, or inpainting the object (its box for replace)",
    )
    p.add_argument("--shard-size", type=int, default=2000, help="rows per parquet shard")
    g = p.add_argument_group("synthetic source")
    g.add_argument(
        "--bias",
        choices=["background", "texture"],
        default="background",
        help="the shortcut: class-correlated backgrounds behind the shapes, or class-correlated textures "
        "filling them on plain backgrounds (bg_label = texture family; extra test splits cue_conflict, "
        "silhouette, texture_only)",
    )
    g.add_argument("--num-classes", type=int, default=9, help="classes (= background families)")
    g.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    g.add_argument(
        "--rho",
        type=float,
        default=0.95,
        help="P(background family = class) in every split (texture family with --bias texture)",
    )
    g.add_argument("--train-per-class", type=int, default=300)
    g.add_argument("--validation-per-class", type=int, default=50)
    g.add_argument("--test-per-class", type=int, default=100)
    g.add_argument(
        "--max-rotation",
        type=float,
        default=180.0,
        help="objects are rotated by up to this many degrees either way",
    )
    g = p.add_argument_group(
        "captions (stage 1 of the language and segmentation stage)",
        "Without --captioner the dataset's own captions are used, else 'a photo of a {label}'.",
    )
    g.add_argument(
        "--captioner",
        metavar="ID_OR_PATH",
        help="transformers image-to-text model, e.g. Salesforce/blip-image-captioning-large, "
        "microsoft/git-large-coco, or a local folder",
    )
    g.add_argument("--caption-batch-size", type=int, default=16, help="images per captioning batch")
    g.add_argument("--caption-max-new-tokens", type=int, default=30, help="caption length limit")
    g.add_argument("--caption-num-beams", type=int, default=1, help="1 = greedy; >1 = beam search")
    g = p.add_argument_group(
        "phrases (stage 2)",
        "Foreground, background and alternative-background phrases per image. Without --llm a "
        "deterministic caption parser: the label word is the object, the words after "
        "on/in/at/near/with/under are the background.",
    )
    g.add_argument(
        "--llm",
        metavar="ID_OR_PATH",
        help="transformers chat LLM, e.g. Qwen/Qwen2.5-1.5B-Instruct, or a local folder; prompt "
        "from prompts/extract_v1.json",
    )
    g.add_argument("--llm-batch-size", type=int, default=8, help="conversations per generate call")
    g.add_argument("--llm-max-new-tokens", type=int, default=96, help="answer length limit")
    g.add_argument(
        "--llm-max-repairs",
        type=int,
        default=2,
        help="times a bad answer is sent back with the reason before the caption parser takes over",
    )
    g = p.add_argument_group(
        "masks (stage 3)",
        "given: the source's masks. sam: SAM prompted with a box from the given mask (or from "
        "--detector for images without one). grounded: --detector finds boxes for the label and "
        "each foreground phrase, SAM turns them into masks (per-phrase masks go to the "
        "phrase_masks configuration).",
    )
    add_mask_arguments(g, MASK_SOURCES, "given")
    g = p.add_argument_group(
        "diffusion (--positives inpaint|edit, --negative-generator inpaint)",
        "Any diffusers pipeline id or folder. Each image's seed comes from --seed and its row id, so "
        "an image does not depend on the batch it falls in. Defaults of steps/guidance/strength are "
        "the generator's (inpaint 30 steps, guidance 7.5, strength 1.0).",
    )
    g.add_argument(
        "--inpaint-model",
        default="stabilityai/stable-diffusion-2-inpainting",
        metavar="ID_OR_PATH",
        help="inpainting pipeline (AutoPipelineForInpainting), e.g. "
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
    )
    g.add_argument(
        "--edit-kind",
        choices=["instruct", "img2img"],
        default="instruct",
        help="--positives edit, and --positives texture --texture-source edit",
    )
    g.add_argument("--edit-model", default="timbrooks/instruct-pix2pix", metavar="ID_OR_PATH")
    g.add_argument(
        "--img2img-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", metavar="ID_OR_PATH"
    )
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--strength", type=float, help="inpainting strength (1.0 = repaint fully)")
    g.add_argument("--image-guidance", type=float, help="instruct-pix2pix image guidance")
    g.add_argument("--strengths", type=float, nargs="+", help="img2img strengths (default 0.25 0.5 0.75 1.0)")
    g.add_argument("--negative-prompt", help="negative prompt (default: the generator's)")
    g.add_argument("--diffusion-batch-size", type=int, default=4, help="images per pipeline call")
    g.add_argument("--resolution", type=int, help="working resolution (default: the model's native size)")
    g.add_argument(
        "--inpaint-dilate", type=int, default=4, help="pixels added around an object before it is removed"
    )
    g = p.add_argument_group(
        "saliency positives (--positives saliency)",
        "ExCon views from a trained classifier: pixels whose Grad-CAM importance for the label (normalised per "
        "image to [0, 1]) is <= --saliency-threshold are replaced by the split's mean colour. A view on which "
        "the classifier no longer predicts the label is recorded as a rejection (stage saliency), not written.",
    )
    g.add_argument(
        "--classifier", metavar="DIR", help="an output folder of scripts/train.py (the model that explains)"
    )
    g.add_argument(
        "--saliency-threshold",
        type=float,
        default=0.5,
        help="importance at or below which pixels are replaced",
    )
    g.add_argument(
        "--saliency-negatives",
        action="store_true",
        help="also write the complement (the salient pixels replaced, the rest kept) as a kind=negative row "
        "beside each positive written",
    )
    g.add_argument(
        "--saliency-layer",
        help="Grad-CAM module name (default: the deepest convolutional stage whose map is at least 4 x 4)",
    )
    add_filter_arguments(p)
    g = p.add_argument_group("running the models")
    g.add_argument(
        "--device", help="torch device for all models (default: Accelerate's, a GPU when there is one)"
    )
    g.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="model precision (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    g.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="originals per round of description and generation (each model batches within it); also "
        "the unit of work shared between processes and committed at once (a crash loses at most the "
        "units in flight)",
    )
    trust.add_arguments(p.add_argument_group("loading models and datasets"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if not k.startswith("filter_")}
    return GenerateConfig(**values, filters=FilterConfig.from_args(args))


def cli(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        summary = run(config)
    # OSError: a model id or folder that cannot load; ImportError: segment-anything not installed
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        print(f"generate.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    if summary.get("complete"):
        print(f"{config.output} is complete (made with the same settings); nothing to do")
    elif "process_index" not in summary:  # the main process (the others made units only)
        print(json.dumps(summary, indent=2))
        print(f"wrote {config.output} (load it with datasets.load_dataset({config.output!r}))")
    return 0
