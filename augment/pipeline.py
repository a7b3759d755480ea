"""The generation job: a source in, a counterfactual dataset folder out.

``python scripts/generate.py --source synthetic --output DIR`` reads every split of the source, writes
each usable image as an ``original`` row and, for the counterfactual splits (``train`` by default),
derives rows from it:

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
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from prompts import CAPTION_BACKGROUND, CAPTION_LABEL, CAPTION_SCENE, render

from .dataset import DatasetWriter, Row
from .seeding import item_rng, item_seed
from .sources import RejectedInput, Sample, Source, build_source
from .synthesize.composite import CompositeGenerator

NEGATIVE_KINDS = ("remove", "replace")


@dataclass
class GenerateConfig:
    """Settings of one generation run (the command-line flags of ``scripts/generate.py``)."""

    output: str
    source: str = "synthetic"
    data_dir: str | None = None
    mask_dir: str | None = None
    classes: list[str] | None = None
    limit: int | None = None
    seed: int = 0
    counterfactual_splits: list[str] = field(default_factory=lambda: ["train"])
    num_positives: int = 1
    negatives: list[str] = field(default_factory=lambda: list(NEGATIVE_KINDS))
    positives: str = "composite"
    shard_size: int = 2000
    overwrite: bool = False
    # synthetic source
    num_classes: int = 9
    image_size: int = 64
    rho: float = 0.95
    train_per_class: int = 300
    validation_per_class: int = 50
    test_per_class: int = 100
    max_rotation: float = 180.0
    progress: bool = True

    def source_kwargs(self) -> dict[str, Any]:
        if self.source == "synthetic":
            return {
                "num_classes": self.num_classes,
                "image_size": self.image_size,
                "rho": self.rho,
                "train_per_class": self.train_per_class,
                "validation_per_class": self.validation_per_class,
                "test_per_class": self.test_per_class,
                "max_rotation": self.max_rotation,
                "seed": self.seed,
            }
        if self.source == "folder":
            if not self.data_dir:
                raise ValueError("--source folder needs --data-dir")
            return {"data_dir": self.data_dir, "mask_dir": self.mask_dir, "classes": self.classes}
        raise ValueError(f"unknown --source {self.source!r}")


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


def background_class(sample: Sample) -> int:
    """The class whose background ``sample`` carries: its ``bg_label`` when known, else its label."""
    return sample.bg_label if sample.bg_label >= 0 else sample.label


class _SampleCache:
    """An LRU of decoded samples (and refusals), bounded in bytes: partners are fetched repeatedly."""

    def __init__(self, source: Source, split: str, budget_mb: float = 1024.0):
        self.source, self.split = source, split
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self._items: OrderedDict[int, tuple[Sample | RejectedInput, int]] = OrderedDict()

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


class CounterfactualBuilder:
    """Chooses partners (backgrounds, objects) for an anchor and runs the generator on them."""

    max_partner_attempts = 16

    def __init__(self, source: Source, split: str, indices: list[int], config: GenerateConfig):
        self.source, self.split, self.config = source, split, config
        labels = source.labels(split)
        self.pool = np.asarray(indices, dtype=np.int64)
        self.pool_labels = labels[self.pool]
        self.cache = _SampleCache(source, split)
        self.generator = CompositeGenerator()

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
            if partner.mask is None or not np.asarray(partner.mask).any():
                tried.append(j)
                continue
            return partner, ""
        return None, f"no usable partner with a mask among {len(tried)} tried ({role})"

    def build(self, anchor: Sample) -> tuple[list[Row], list[tuple[str, str, str]]]:
        """Rows derived from ``anchor`` and rejections ``(id, stage, reason)``."""
        rows: list[Row] = []
        rejections: list[tuple[str, str, str]] = []
        where = anchor.path or anchor.id
        if anchor.mask is None:
            return rows, [
                (
                    anchor.id,
                    "composite",
                    f"{where}: no foreground mask, so no counterfactuals (give --mask-dir)",
                )
            ]
        if not np.asarray(anchor.mask).any():
            return rows, [
                (anchor.id, "composite", f"{where}: the foreground mask is empty, so no counterfactuals")
            ]
        obj_name = anchor.meta.get("object", self.source.class_names[anchor.label])
        for k in range(self.config.num_positives):
            row_id = f"{anchor.id}/positive/{k}"
            partner, why = self._partner(anchor, f"positive/{k}")
            if partner is None:
                rejections.append((row_id, "composite", f"{where}: {why}"))
                continue
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
                    caption=scene_caption(obj_name, partner.meta.get("background")),
                    recipe={
                        **out.recipes[0],
                        "background_source_id": partner.id,
                        "seed": item_seed(self.config.seed, row_id),
                    },
                )
            )
        for k, neg in enumerate(self.config.negatives):
            row_id = f"{anchor.id}/negative/{k}"
            bg_name = anchor.meta.get("background")
            if neg == "remove":
                out = self.generator(background_image=[anchor.image], background_mask=[anchor.mask])
                label, mask, extra = -1, out.masks[0], {}
                caption = render(CAPTION_BACKGROUND, background=bg_name) if bg_name else ""
            else:
                partner, why = self._partner(anchor, f"negative/{k}")
                if partner is None:
                    rejections.append((row_id, "composite", f"{where}: {why}"))
                    continue
                out = self.generator(
                    background_image=[anchor.image],
                    background_mask=[anchor.mask],
                    image=[partner.image],
                    mask_image=[partner.mask],
                    placement="center",
                )
                label, mask, extra = partner.label, out.masks[0], {"object_source_id": partner.id}
                other = partner.meta.get("object", self.source.class_names[partner.label])
                caption = scene_caption(other, bg_name)
            rows.append(
                Row(
                    id=row_id,
                    image=out.images[0],
                    mask=mask,
                    label=label,
                    bg_label=background_class(anchor),
                    kind="negative",
                    source_id=anchor.id,
                    caption=caption,
                    recipe={
                        **out.recipes[0],
                        **extra,
                        "negative": neg,
                        "background_source_id": anchor.id,
                        "seed": item_seed(self.config.seed, row_id),
                    },
                )
            )
        return rows, rejections


def original_row(sample: Sample) -> Row:
    return Row(
        id=sample.id,
        image=sample.image,
        mask=sample.mask,
        label=sample.label,
        bg_label=sample.bg_label,
        kind="original",
        source_id=sample.id,
        caption=sample.caption,
        recipe={"generator": "source", "file": sample.meta.get("file")}
        if sample.path
        else {"generator": "source"},
    )


def run(config: GenerateConfig) -> dict[str, Any]:
    """Run the generation job; returns the writer's summary (counts per split, kind and stage)."""
    if config.num_positives < 0:
        raise ValueError(f"--num-positives must be >= 0, got {config.num_positives}")
    bad = [n for n in config.negatives if n not in NEGATIVE_KINDS]
    if bad:
        raise ValueError(f"--negatives: unknown kind(s) {bad}; choose from {list(NEGATIVE_KINDS)}")
    if config.positives != "composite":
        raise ValueError(f"--positives {config.positives!r} is not available; this version has: composite")
    if config.limit is not None and config.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {config.limit}")
    source = build_source(config.source, **config.source_kwargs())
    writer = DatasetWriter(
        config.output, source.class_names, shard_size=config.shard_size, overwrite=config.overwrite
    )
    start = time.perf_counter()
    inputs = 0
    for split in source.splits():
        indices = select_indices(source.labels(split), config.limit)
        inputs += len(indices)
        builder = (
            CounterfactualBuilder(source, split, indices, config)
            if split in config.counterfactual_splits
            else None
        )
        for index in tqdm(indices, desc=f"generate {split}", disable=not config.progress, unit="img"):
            item_id = source.item_id(split, index)
            try:
                sample = builder.cache.get(index) if builder else source.load(split, index)
            except RejectedInput as e:
                writer.reject(item_id, split, e.stage, e.reason)
                continue
            writer.add(split, original_row(sample))
            if builder is None:
                continue
            rows, rejections = builder.build(sample)
            for row in rows:
                writer.add(split, row)
            for rid, stage, reason in rejections:
                writer.reject(rid, split, stage, reason)
    settings = {**asdict(config), **source.describe(), "generator": config.positives}
    settings.pop("progress", None)
    summary = writer.close(
        settings=settings, description=f"Generated from the `{source.name}` source by scripts/generate.py."
    )
    originals = sum(c.get("original", 0) for c in summary["splits"].values())
    rejected_inputs = sum(1 for r in writer.rejected if r["stage"] in ("read", "mask", "label"))
    summary["inputs"] = inputs
    summary["originals"] = originals
    summary["rejected_inputs"] = rejected_inputs
    summary["seconds"] = round(time.perf_counter() - start, 2)
    if originals + rejected_inputs != inputs:  # the accounting every run must satisfy
        raise RuntimeError(
            f"internal error: {inputs} inputs but {originals} written + {rejected_inputs} rejected"
        )
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description=(
            "Build a counterfactual dataset (originals, positives, negatives) from the built-in synthetic "
            "benchmark or an image folder, written as a Hugging Face dataset folder."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=["synthetic", "folder"],
        default="synthetic",
        help="where the labelled images come from",
    )
    p.add_argument("--data-dir", help="folder source: root of <split>/<class>/<file>")
    p.add_argument(
        "--mask-dir", help="folder source: root of masks at the same relative paths (PNG, non-zero = object)"
    )
    p.add_argument(
        "--classes", nargs="+", help="folder source: the class list (default: the class folders of train)"
    )
    p.add_argument("--output", required=True, help="dataset folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
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
    p.add_argument("--positives", default="composite", choices=["composite"], help="positive generator")
    p.add_argument("--num-positives", type=int, default=1, help="positives per original")
    p.add_argument(
        "--negatives",
        nargs="*",
        default=list(NEGATIVE_KINDS),
        help="negative kinds per original: remove (object removed), replace (another class's object)",
    )
    p.add_argument("--shard-size", type=int, default=2000, help="rows per parquet shard")
    g = p.add_argument_group("synthetic source")
    g.add_argument("--num-classes", type=int, default=9, help="classes (= background families)")
    g.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    g.add_argument("--rho", type=float, default=0.95, help="P(background family = class) in every split")
    g.add_argument("--train-per-class", type=int, default=300)
    g.add_argument("--validation-per-class", type=int, default=50)
    g.add_argument("--test-per-class", type=int, default=100)
    g.add_argument(
        "--max-rotation",
        type=float,
        default=180.0,
        help="objects are rotated by up to this many degrees either way",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    args = build_parser().parse_args(argv)
    return GenerateConfig(**vars(args))


def cli(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        summary = run(config)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"wrote {config.output} (load it with datasets.load_dataset({config.output!r}))")
    return 0
