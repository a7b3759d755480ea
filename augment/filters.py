"""Reject bad counterfactuals before they are written: the generation job's last check on each image.

Five filters, each giving a readable reason when it rejects an image (``None`` keeps it):

==============  ==================================================================================
black           (near-)black or constant images, e.g. what a diffusion pipeline returns when its
                safety checker blanks an output: mean pixel value < ``black_mean`` or the largest
                per-channel standard deviation < ``black_std``
nsfw            images whose recipe says ``"nsfw": True`` (the diffusers safety checker's flag)
mask_area       a counterfactual whose object mask covers more than ``max_area_ratio`` times, or less
                than ``1 / max_area_ratio`` times, the area of the anchor's object mask (the object
                was lost, cut or swollen by the edit); skipped for rows without an object (label -1)
                and where either mask is unknown
semantic        ALIA's semantic filter: a CLIP model rejects an image closer to one of
                ``semantic_negatives`` ("a painting", "a black image", ...) than to
                "a photo of a {label}"
confidence      ALIA's confidence filter: a classifier trained on the originals rejects an edit that
                destroyed the class (probability of the true class below ``confidence_low``) and an
                edit that changed nothing (probability above ``confidence_high``, with the original
                also above it when the original images are given)
==============  ==================================================================================

The cheap filters run first; the model filters only see the images still kept, in batches.
Usage::

    filters = Filters.from_config(FilterConfig(semantic_model="openai/clip-vit-base-patch32"))
    reasons = filters(images, labels, class_names, masks, anchor_masks, recipes)
    kept = [im for im, r in zip(images, reasons) if r is None]
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from . import trust

__all__ = [
    "ClassifierProbe",
    "FilterConfig",
    "Filters",
    "SemanticFilter",
    "add_filter_arguments",
    "black_reason",
    "mask_area_reason",
    "nsfw_reason",
]

DEFAULT_NEGATIVES = (
    "a painting",
    "a drawing",
    "a cartoon",
    "a black image",
    "a blurry image",
    "a text document",
)


@dataclass
class FilterConfig:
    """Which filters run and their thresholds (see the module docstring)."""

    black: bool = True
    black_mean: float = 8.0
    black_std: float = 2.0
    nsfw: bool = True
    mask_area: bool = True
    max_area_ratio: float = 2.0
    semantic_model: str | None = None
    semantic_negatives: tuple[str, ...] = DEFAULT_NEGATIVES
    confidence_classifier: str | None = None
    confidence_low: float = 0.1
    confidence_high: float = 0.95
    batch_size: int = 32

    def __post_init__(self):
        self.semantic_negatives = tuple(self.semantic_negatives)
        if self.max_area_ratio < 1:
            raise ValueError(f"max_area_ratio must be >= 1, got {self.max_area_ratio}")
        if not 0 <= self.confidence_low <= 1 or not 0 <= self.confidence_high <= 1:
            raise ValueError(
                f"confidence_low and confidence_high are probabilities in [0, 1], got "
                f"{self.confidence_low} and {self.confidence_high}"
            )
        if self.confidence_low > self.confidence_high:
            raise ValueError(
                f"confidence_low ({self.confidence_low}) must not exceed confidence_high ({self.confidence_high})"
            )
        if self.semantic_model and not self.semantic_negatives:
            raise ValueError("the semantic filter needs at least one negative prompt")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FilterConfig:
        """The config from the flags of :func:`add_filter_arguments` (attributes ``filter_*``)."""
        values = {}
        for f in fields(cls):
            key = f"filter_{f.name}"
            if hasattr(args, key):
                values[f.name] = getattr(args, key)
        return cls(**values)


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the filters' flags to a command line (read back with :meth:`FilterConfig.from_args`)."""
    d = FilterConfig()
    g = parser.add_argument_group(
        "filters",
        "Generated images are checked before they are written; a rejected image goes to the "
        "'rejected' table with the reason.",
    )
    g.add_argument(
        "--no-black-filter", dest="filter_black", action="store_false", help="keep black/constant images"
    )
    g.add_argument(
        "--black-mean",
        dest="filter_black_mean",
        type=float,
        default=d.black_mean,
        help="reject an image whose mean pixel value (0-255) is below this",
    )
    g.add_argument(
        "--black-std",
        dest="filter_black_std",
        type=float,
        default=d.black_std,
        help="reject an image whose largest per-channel standard deviation is below this (constant)",
    )
    g.add_argument(
        "--no-nsfw-filter",
        dest="filter_nsfw",
        action="store_false",
        help="keep images the safety checker flagged",
    )
    g.add_argument(
        "--no-mask-area-filter",
        dest="filter_mask_area",
        action="store_false",
        help="keep counterfactuals whose object area changed a lot",
    )
    g.add_argument(
        "--max-area-ratio",
        dest="filter_max_area_ratio",
        type=float,
        default=d.max_area_ratio,
        help="reject when the object mask's area differs from the anchor's by more than this factor",
    )
    g.add_argument(
        "--semantic-filter-model",
        dest="filter_semantic_model",
        metavar="ID_OR_PATH",
        help="CLIP model (e.g. openai/clip-vit-base-patch32) for ALIA's semantic filter",
    )
    g.add_argument(
        "--semantic-negatives",
        dest="filter_semantic_negatives",
        nargs="+",
        default=list(d.semantic_negatives),
        metavar="TEXT",
        help="texts an image must not be closer to than to 'a photo of a {label}'",
    )
    g.add_argument(
        "--confidence-filter-classifier",
        dest="filter_confidence_classifier",
        metavar="DIR",
        help="a classifier trained on the originals (scripts/train.py) for ALIA's confidence filter",
    )
    g.add_argument(
        "--confidence-low",
        dest="filter_confidence_low",
        type=float,
        default=d.confidence_low,
        help="reject an edit whose true-class probability is below this (the class was destroyed)",
    )
    g.add_argument(
        "--confidence-high",
        dest="filter_confidence_high",
        type=float,
        default=d.confidence_high,
        help="reject an edit whose true-class probability is above this (nothing changed); 1 turns it off",
    )
    g.add_argument(
        "--filter-batch-size",
        dest="filter_batch_size",
        type=int,
        default=d.batch_size,
        help="images per batch of the model filters",
    )


# ----------------------------------------------------------------------------------------------
# Cheap filters: pure functions of one image
# ----------------------------------------------------------------------------------------------


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    return arr if arr.ndim == 3 else arr[..., None]


def black_reason(image: Image.Image | np.ndarray, min_mean: float = 8.0, min_std: float = 2.0) -> str | None:
    """Why ``image`` is black or constant, or None. The std is taken per channel, so a saturated
    single colour counts as constant too."""
    arr = _rgb_array(image).astype(np.float32)
    mean = float(arr.mean())
    if mean < min_mean:
        return f"black image (mean {mean:.1f} < {min_mean:g})"
    std = float(arr.reshape(-1, arr.shape[-1]).std(axis=0).max())
    if std < min_std:
        return f"constant image (std {std:.2f} < {min_std:g})"
    return None


def nsfw_reason(recipe: dict[str, Any] | None) -> str | None:
    """Why the recipe marks the image unsafe, or None."""
    if recipe and recipe.get("nsfw") is True:
        return "flagged NSFW by the safety checker"
    return None


def _area(mask: Image.Image | np.ndarray) -> float:
    from .imageops import to_mask

    m = to_mask(mask)
    return float(m.mean()) if m.size else 0.0


def mask_area_reason(
    mask: Image.Image | np.ndarray | None,
    anchor_mask: Image.Image | np.ndarray | None,
    max_ratio: float = 2.0,
) -> str | None:
    """Why the object's area changed too much against the anchor's, or None.

    Areas are fractions of each image, so masks of different sizes compare. Unknown masks (None) and
    an anchor without object pixels are not judged.
    """
    if mask is None or anchor_mask is None:
        return None
    anchor = _area(anchor_mask)
    if anchor == 0:
        return None
    area = _area(mask)
    if area == 0:
        return f"object mask is empty (the anchor's object covers {anchor:.1%})"
    ratio = area / anchor
    if ratio > max_ratio or ratio < 1 / max_ratio:
        return (
            f"object area changed x{ratio:.2f} ({area:.1%} of the image vs {anchor:.1%} in the anchor; "
            f"allowed x{1 / max_ratio:.2f} to x{max_ratio:.2f})"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Model filters
# ----------------------------------------------------------------------------------------------


class ClassifierProbe:
    """A trained classifier (``debias.models.load_classifier``) giving class probabilities for PIL
    images of any size, batched, preprocessed exactly as :func:`debias.evaluate.predict` does."""

    def __init__(
        self, model, preprocessing, device: str = "cpu", path: str | None = None, batch_size: int = 64
    ):
        self.model = model.to(device).eval()
        self.preprocessing = preprocessing
        self.device = device
        self.path = path
        self.batch_size = batch_size
        from debias.data import BatchAugment

        self._norm = BatchAugment(preprocessing.mean, preprocessing.std).to(device)

    @classmethod
    def load(cls, path: str, device: str | None = None, batch_size: int = 64) -> ClassifierProbe:
        from debias.models import load_classifier

        from .runtime import resolve_device

        looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.path.isabs(path)
        if looks_local and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(
                f"classifier {path}: no such folder (train one with scripts/train.py --method erm)"
            )
        model, pre = load_classifier(os.path.expanduser(path) if looks_local else path)
        return cls(model, pre, resolve_device(device), path=path, batch_size=batch_size)

    @property
    def class_names(self) -> list[str] | None:
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [id2label[i] for i in sorted(id2label)] if id2label else None

    def describe(self) -> dict[str, Any]:
        return {"classifier": self.path, "preprocessing": self.preprocessing.to_dict()}

    def probabilities(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """(N, K) softmax probabilities."""
        import torch

        from debias.data import resize_uint8

        res = self.preprocessing.resolution
        out = []
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                batch = []
                for im in images[s : s + self.batch_size]:
                    arr = np.array(im.convert("RGB") if isinstance(im, Image.Image) else im, dtype=np.uint8)
                    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
                    batch.append(resize_uint8(x, res))
                x = torch.cat(batch).to(self.device)
                logits = self.model(pixel_values=self._norm.normalize(x)).logits
                out.append(logits.float().softmax(-1).cpu().numpy())
        if not out:
            k = int(getattr(self.model.config, "num_labels", 0))
            return np.zeros((0, k), dtype=np.float32)
        return np.concatenate(out)


def _pooled(output) -> Any:
    """transformers 5 returns a model output from ``get_*_features``; older versions a tensor."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class SemanticFilter:
    """CLIP zero-shot check: is an image closer to a negative text than to "a photo of a {label}"?

    ``model``: a transformers CLIP-like model with ``get_image_features`` and ``get_text_features``
    (CLIPModel, SiglipModel, ...), loaded with ``AutoModel``.
    """

    def __init__(self, model, tokenizer, image_processor, negatives: Sequence[str], device="cpu", ref=None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.negatives = list(negatives)
        self.device = device
        self.ref = ref or {}
        self._text_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_pretrained(
        cls, model_id: str, negatives: Sequence[str] = DEFAULT_NEGATIVES, device=None, revision=None
    ) -> SemanticFilter:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from .runtime import check_model_ref, resolve_device

        model_id = check_model_ref(model_id, "semantic filter model")
        device = resolve_device(device)
        model = AutoModel.from_pretrained(model_id, revision=revision, **trust.model_kwargs())
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(
                f"semantic filter model {model_id} ({type(model).__name__}) is not an image-text model "
                "with get_image_features/get_text_features (use a CLIP or SigLIP model)"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, **trust.code_kwargs())
        image_processor = AutoImageProcessor.from_pretrained(
            model_id, revision=revision, **trust.code_kwargs()
        )
        ref = {"model": model_id, "revision": revision or getattr(model.config, "_commit_hash", None)}
        return cls(model, tokenizer, image_processor, negatives, device=device, ref=ref)

    def describe(self) -> dict[str, Any]:
        return {**self.ref, "negatives": list(self.negatives), "positive": "a photo of a {label}"}

    def _max_length(self) -> int:
        """The tokenizer's limit, capped by the text tower's position embeddings."""
        limit = int(min(getattr(self.tokenizer, "model_max_length", 77) or 77, 10_000))
        text_config = getattr(self.model.config, "text_config", None)
        positions = getattr(text_config, "max_position_embeddings", None)
        return min(limit, int(positions)) if positions else limit

    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, (len(texts), D); cached per text."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            enc = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self._max_length(), return_tensors="pt"
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                emb = _pooled(self.model.get_text_features(**enc)).float()
            emb = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
            self._text_cache.update(zip(missing, emb))
        return np.stack([self._text_cache[t] for t in texts])

    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings, (N, D)."""
        import torch

        out = []
        for s in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[s : s + batch_size]]
            pixels = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                emb = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    @staticmethod
    def positive_text(label: int, label_names: Sequence[str]) -> str:
        """ "a photo of a {label}" (underscores as spaces); "a photo" for rows without an object."""
        if 0 <= label < len(label_names):
            return f"a photo of a {label_names[label].replace('_', ' ')}"
        return "a photo"

    def __call__(
        self, images: Sequence[Image.Image], labels: Sequence[int], label_names: Sequence[str], batch_size=32
    ) -> list[str | None]:
        if not images:
            return []
        img = self.image_embeddings(images, batch_size)
        neg = self.text_embeddings(self.negatives)
        positives = [self.positive_text(int(y), label_names) for y in labels]
        pos = self.text_embeddings(positives)
        pos_sim = (img * pos).sum(-1)
        neg_sim = img @ neg.T
        reasons: list[str | None] = []
        for i in range(len(images)):
            # a negative worded exactly as the image's own prompt cannot be "closer" than it
            same = [k for k, t in enumerate(self.negatives) if t == positives[i]]
            neg_sim[i, same] = -np.inf
            j = int(neg_sim[i].argmax())
            if neg_sim[i, j] > pos_sim[i]:
                reasons.append(
                    f'semantic filter: closer to "{self.negatives[j]}" (cosine {neg_sim[i, j]:.3f}) '
                    f'than to "{positives[i]}" ({pos_sim[i]:.3f})'
                )
            else:
                reasons.append(None)
        return reasons


# ----------------------------------------------------------------------------------------------
# The filter chain
# ----------------------------------------------------------------------------------------------


class Filters:
    """Run the configured filters over a batch of generated images (see the module docstring).

    ``counts`` keeps how many images each filter rejected (``checked`` counts every image seen).
    """

    def __init__(self, config: FilterConfig | None = None, device: str | None = None):
        self.config = config or FilterConfig()
        self.device = device
        self.counts: Counter = Counter()
        self.semantic: SemanticFilter | None = None
        self.probe: ClassifierProbe | None = None
        if self.config.semantic_model:
            self.semantic = SemanticFilter.from_pretrained(
                self.config.semantic_model, self.config.semantic_negatives, device=device
            )
        if self.config.confidence_classifier:
            self.probe = ClassifierProbe.load(
                self.config.confidence_classifier, device=device, batch_size=self.config.batch_size
            )

    @classmethod
    def from_config(
        cls, config: FilterConfig | dict[str, Any] | None = None, device: str | None = None, **overrides
    ) -> Filters:
        """Filters from a :class:`FilterConfig`, a dict of its fields, or defaults, with ``overrides``."""
        if isinstance(config, FilterConfig):
            values = asdict(config)
        else:
            values = dict(config or {})
        values.update(overrides)
        return cls(FilterConfig(**values), device=device)

    def describe(self) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {
            "black": {"mean_below": c.black_mean, "std_below": c.black_std} if c.black else False,
            "nsfw": c.nsfw,
            "mask_area": {"max_ratio": c.max_area_ratio} if c.mask_area else False,
            "semantic": self.semantic.describe() if self.semantic else False,
            "confidence": (
                {**self.probe.describe(), "low": c.confidence_low, "high": c.confidence_high}
                if self.probe
                else False
            ),
        }
        return out

    def __call__(
        self,
        images: Sequence[Image.Image],
        labels: Sequence[int],
        label_names: Sequence[str],
        masks: Sequence[Image.Image | np.ndarray | None] | None = None,
        anchor_masks: Sequence[Image.Image | np.ndarray | None] | None = None,
        recipes: Sequence[dict[str, Any] | None] | None = None,
        anchor_images: Sequence[Image.Image | None] | None = None,
    ) -> list[str | None]:
        """One entry per image: None to keep it, else why it is rejected.

        ``masks``: the object mask of each output (None: unknown); ``anchor_masks``: the object mask of
        the image it was made from; ``recipes``: each output's recipe; ``anchor_images``: the originals,
        used by the confidence filter's "changed nothing" rule when given. Labels are the class of
        the object each output shows (-1: no object).
        """
        n = len(images)
        masks = list(masks) if masks is not None else [None] * n
        anchor_masks = list(anchor_masks) if anchor_masks is not None else [None] * n
        recipes = list(recipes) if recipes is not None else [None] * n
        for name, seq in (
            ("labels", labels),
            ("masks", masks),
            ("anchor_masks", anchor_masks),
            ("recipes", recipes),
        ):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} images")
        if anchor_images is not None and len(anchor_images) != n:
            raise ValueError(f"anchor_images has {len(anchor_images)} entries for {n} images")
        c = self.config
        reasons: list[str | None] = [None] * n
        self.counts["checked"] += n

        def reject(i: int, what: str, reason: str | None) -> None:
            if reason is not None and reasons[i] is None:
                reasons[i] = reason
                self.counts[what] += 1

        for i in range(n):
            if c.nsfw:
                reject(i, "nsfw", nsfw_reason(recipes[i]))
            if c.black and reasons[i] is None:
                reject(i, "black", black_reason(images[i], c.black_mean, c.black_std))
            if c.mask_area and reasons[i] is None and int(labels[i]) >= 0:
                reject(i, "mask_area", mask_area_reason(masks[i], anchor_masks[i], c.max_area_ratio))
        if self.semantic is not None:
            keep = [i for i in range(n) if reasons[i] is None]
            found = self.semantic(
                [images[i] for i in keep], [int(labels[i]) for i in keep], label_names, c.batch_size
            )
            for i, r in zip(keep, found):
                reject(i, "semantic", r)
        if self.probe is not None:
            keep = [i for i in range(n) if reasons[i] is None and 0 <= int(labels[i])]
            for i, r in zip(
                keep,
                self._confidence(
                    [images[i] for i in keep],
                    [int(labels[i]) for i in keep],
                    label_names,
                    [anchor_images[i] for i in keep] if anchor_images is not None else None,
                ),
            ):
                reject(i, "confidence", r)
        return reasons

    def _confidence(self, images, labels, label_names, anchors) -> list[str | None]:
        if not images:
            return []
        c = self.config
        probs = self.probe.probabilities(images)
        if probs.shape[1] != len(label_names):
            raise ValueError(
                f"the confidence filter's classifier has {probs.shape[1]} classes, the dataset {len(label_names)}"
            )
        anchor_p = None
        if anchors is not None:
            have = [k for k, a in enumerate(anchors) if a is not None]
            anchor_p = [None] * len(anchors)
            if have:
                ap = self.probe.probabilities([anchors[k] for k in have])
                for k, row in zip(have, ap):
                    anchor_p[k] = float(row[labels[k]])
        out: list[str | None] = []
        for k, (row, y) in enumerate(zip(probs, labels)):
            p = float(row[y])
            name = label_names[y]
            if p < c.confidence_low:
                top = int(row.argmax())
                out.append(
                    f"confidence filter: the edit destroyed the class (p({name}) = {p:.3f} < "
                    f"{c.confidence_low:g}; the classifier sees {label_names[top]} at {row[top]:.3f})"
                )
            elif p > c.confidence_high and c.confidence_high < 1:
                ap = anchor_p[k] if anchor_p is not None else None
                if anchor_p is None or ap is None:
                    out.append(
                        f"confidence filter: the edit changed nothing the classifier cares about "
                        f"(p({name}) = {p:.3f} > {c.confidence_high:g})"
                    )
                elif ap > c.confidence_high:
                    out.append(
                        f"confidence filter: the edit changed nothing the classifier cares about "
                        f"(p({name}) = {p:.3f}, original {ap:.3f}, both > {c.confidence_high:g})"
                    )
                else:
                    out.append(None)
            else:
                out.append(None)
        return out
