"""From the dataset to training batches: anchors, their positives, their stored negatives.

A training item is one original (the anchor) with

* a positive: one of its stored ``kind=positive`` rows (same ``source_id``), chosen per epoch; or,
  when it has none but has a mask, an on-the-fly composite of its object on another class's
  tile-filled background;
* up to ``max_negatives`` stored ``kind=negative`` rows (same ``source_id``; a subset drawn per epoch
  when it has more), padded and masked.

Images are decoded once into a uint8 cache at the training resolution (when they fit in
``cache_gb``) and handed out as uint8 tensors; augmentation runs batched on the accelerator
(:class:`BatchAugment`), so the data side stays cheap even on two CPU cores.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from augment.imageops import paste, tile_fill, to_mask
from augment.seeding import item_rng


def decode(entry: dict | Image.Image | None, mode: str = "RGB") -> Image.Image | None:
    """A PIL image from a ``datasets`` Image value (decoded, or ``{"bytes", "path"}``)."""
    if entry is None:
        return None
    if isinstance(entry, Image.Image):
        return entry.convert(mode)
    if entry.get("bytes") is not None:
        return Image.open(io.BytesIO(entry["bytes"])).convert(mode)
    return Image.open(entry["path"]).convert(mode)


def to_uint8_tensor(image: Image.Image | np.ndarray, resolution: int | None) -> torch.Tensor:
    """(3, R, R) uint8 tensor, resized (bilinear) when ``resolution`` differs from the image size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def resize_uint8(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a uint8 batch (B, 3, H, W) to (resolution, resolution), antialiased, staying uint8."""
    if x.shape[-2:] == (resolution, resolution):
        return x
    y = F.interpolate(
        x.float(), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
    )
    return y.round_().clamp_(0, 255).to(torch.uint8)


class ImageStore:
    """Rows of a ``datasets.Dataset`` as uint8 tensors at one resolution, decoded once if they fit."""

    def __init__(self, dataset, resolution: int, cache_gb: float = 4.0):
        self.raw = (
            dataset.select_columns(["image", "mask"])
            .cast_column("image", _undecoded())
            .cast_column("mask", _undecoded())
        )
        self.resolution = resolution
        n = len(dataset)
        self.cached = n * 3 * resolution * resolution <= cache_gb * 2**30
        self._cache = torch.zeros(n, 3, resolution, resolution, dtype=torch.uint8) if self.cached else None
        self._filled = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.raw)

    def image(self, row: int) -> torch.Tensor:
        if self.cached and self._filled[row]:
            return self._cache[row]
        t = to_uint8_tensor(decode(self.raw[row]["image"]), self.resolution)
        if self.cached:
            self._cache[row] = t
            self._filled[row] = True
        return t

    def pil(self, row: int) -> tuple[Image.Image, Image.Image | None]:
        """Full-resolution image and mask of a row (for on-the-fly composites)."""
        entry = self.raw[row]
        return decode(entry["image"]), decode(entry["mask"], "L")

    def warm(self, rows: Sequence[int]) -> None:
        """Decode ``rows`` into the cache now (one pass before training)."""
        for r in rows:
            self.image(r)


def _undecoded():
    from datasets import Image as ImageFeature

    return ImageFeature(decode=False)


@dataclass
class Index:
    """Row indices of a split: originals and, per original, its positive and negative rows."""

    originals: np.ndarray
    labels: np.ndarray
    bg_labels: np.ndarray
    has_mask: np.ndarray
    positives: list[list[int]]
    negatives: list[list[int]]
    positive_bg: dict[int, int]

    @classmethod
    def build(cls, dataset) -> Index:
        cols = dataset.select_columns(["id", "kind", "source_id", "label", "bg_label"]).to_dict()
        mask_present = [
            m is not None for m in dataset.select_columns(["mask"]).cast_column("mask", _undecoded())["mask"]
        ]
        row_of = {}
        originals = []
        for i, (rid, kind) in enumerate(zip(cols["id"], cols["kind"])):
            if kind == "original":
                row_of[rid] = len(originals)
                originals.append(i)
        pos: list[list[int]] = [[] for _ in originals]
        neg: list[list[int]] = [[] for _ in originals]
        positive_bg = {}
        orphans = defaultdict(int)
        for i, (kind, src) in enumerate(zip(cols["kind"], cols["source_id"])):
            if kind not in ("positive", "negative"):
                continue
            k = row_of.get(src)
            if k is None:
                orphans[kind] += 1
                continue
            if kind == "positive":
                pos[k].append(i)
                bg = cols["bg_label"][i]
                positive_bg[i] = bg if bg >= 0 else -1
            else:
                neg[k].append(i)
        if orphans:
            raise ValueError(f"rows whose source_id is not an original of the same split: {dict(orphans)}")
        originals_arr = np.asarray(originals, dtype=np.int64)
        labels = np.asarray(cols["label"], dtype=np.int64)[originals_arr]
        bg = np.asarray(cols["bg_label"], dtype=np.int64)[originals_arr]
        return cls(
            originals=originals_arr,
            labels=labels,
            bg_labels=bg,
            has_mask=np.asarray(mask_present, dtype=bool)[originals_arr],
            positives=pos,
            negatives=neg,
            positive_bg=positive_bg,
        )


class CounterfactualTrainSet(torch.utils.data.Dataset):
    """Anchors with a positive and stored negatives (see the module docstring).

    Each item is a dict of tensors: ``anchor`` (3, R, R) uint8, ``label``, ``index`` (its row k),
    ``positive`` (3, R, R),
    ``positive_bg`` (the key its features are pushed under), ``has_positive``, ``negatives``
    (max_negatives, 3, R, R) and ``negative_valid`` (max_negatives,) bool.
    """

    def __init__(
        self,
        dataset,
        resolution: int,
        seed: int = 0,
        max_negatives: int = 2,
        need_positives: bool = True,
        need_negatives: bool = True,
        cache_gb: float = 4.0,
    ):
        self.index = Index.build(dataset)
        if len(self.index.originals) == 0:
            raise ValueError("the training split has no kind=original rows")
        self.store = ImageStore(dataset, resolution, cache_gb)
        self.resolution = resolution
        self.seed = seed
        self.epoch = 0
        self.max_negatives = max_negatives if need_negatives else 0
        self.need_positives = need_positives
        labels = self.index.labels
        self.num_classes = int(dataset.features["label"].num_classes)
        self._by_other_class = {
            y: np.flatnonzero((labels != y) & self.index.has_mask) for y in range(self.num_classes)
        }
        self.on_the_fly = 0  # anchors that need composite positives
        if need_positives:
            self.on_the_fly = int(
                sum(1 for k in range(len(self)) if not self.index.positives[k] and self.index.has_mask[k])
            )

    def __len__(self) -> int:
        return len(self.index.originals)

    def set_epoch(self, epoch: int) -> None:
        """Positives are re-drawn per epoch (deterministically from the seed and the epoch)."""
        self.epoch = epoch

    def warm(self) -> None:
        rows = list(self.index.originals)
        if self.need_positives:
            rows += [r for p in self.index.positives for r in p]
        if self.max_negatives:
            rows += [r for n in self.index.negatives for r in n]
        self.store.warm(rows)

    def anchor_bg_key(self, k: int) -> int:
        bg = self.index.bg_labels[k]
        return int(bg if bg >= 0 else self.index.labels[k])

    def has_counterfactual_positive(self, k: int) -> bool:
        """Whether anchor ``k`` gets a counterfactual positive: a stored one, or a composite from its mask."""
        if self.index.positives[k]:
            return True
        pool = self._by_other_class.get(int(self.index.labels[k]))
        return bool(self.index.has_mask[k]) and pool is not None and pool.size > 0

    def _composite_positive(self, k: int, rng: np.random.Generator) -> tuple[torch.Tensor, int] | None:
        label = int(self.index.labels[k])
        pool = self._by_other_class.get(label)
        if pool is None or pool.size == 0 or not self.index.has_mask[k]:
            return None
        j = int(pool[rng.integers(pool.size)])
        img, mask = self.store.pil(int(self.index.originals[k]))
        bg_img, bg_mask = self.store.pil(int(self.index.originals[j]))
        a, m = np.asarray(img), to_mask(mask)
        b = np.asarray(bg_img.resize(img.size, Image.BILINEAR))
        bm = to_mask(bg_mask.resize(img.size, Image.NEAREST))
        out = paste(a, m, tile_fill(b, bm))
        return to_uint8_tensor(out, self.resolution), self.anchor_bg_key(j)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        idx = self.index
        label = int(idx.labels[k])
        item = {
            "anchor": self.store.image(int(idx.originals[k])),
            "label": torch.tensor(label),
            "index": torch.tensor(k),  # the row, for per-row state such as the saliency positives' cache
        }
        if not self.need_positives and not self.max_negatives:
            return item
        rng = item_rng(self.seed, f"epoch{self.epoch}/{k}")
        r = self.resolution
        positive, pos_bg, has_pos = torch.zeros(3, r, r, dtype=torch.uint8), label, False
        if self.need_positives:
            if idx.positives[k]:
                row = idx.positives[k][int(rng.integers(len(idx.positives[k])))]
                positive, has_pos = self.store.image(row), True
                bg = idx.positive_bg[row]
                pos_bg = bg if bg >= 0 else label
            else:
                made = self._composite_positive(k, rng)
                if made is not None:
                    (positive, pos_bg), has_pos = made, True
        item.update(
            positive=positive,
            positive_bg=torch.tensor(pos_bg),
            has_positive=torch.tensor(has_pos),
            anchor_bg=torch.tensor(self.anchor_bg_key(k)),  # FairKL's same/different-background split
        )
        if self.max_negatives:
            negs = torch.zeros(self.max_negatives, 3, r, r, dtype=torch.uint8)
            valid = torch.zeros(self.max_negatives, dtype=torch.bool)
            rows = idx.negatives[k]
            if len(rows) > self.max_negatives:  # a fresh subset every epoch
                rows = [
                    rows[i] for i in sorted(rng.choice(len(rows), self.max_negatives, replace=False).tolist())
                ]
            for s, row in enumerate(rows):
                negs[s] = self.store.image(row)
                valid[s] = True
            item.update(negatives=negs, negative_valid=valid)
        return item


class BatchAugment(torch.nn.Module):
    """Batched, on-device augmentation and normalisation of uint8 images.

    Random resized crop (area ``scale``, aspect ``ratio``) and horizontal flip in one
    ``grid_sample``, then brightness / contrast / saturation jitter, then ``(x - mean) / std``.
    Each image of the batch gets its own draw from the global torch RNG (saved by checkpoints).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        jitter: float = 0.4,
    ):
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.scale, self.ratio, self.flip, self.jitter = scale, ratio, flip, jitter
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (x / 255 - mean) / std as one multiply-add on 0..255 values
        scale = (1.0 / (255.0 * self.std)).to(x.device)
        return scale, (-self.mean / self.std).to(x.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float, no augmentation."""
        scale, shift = self._affine(x)
        return torch.addcmul(shift, x.float(), scale)

    def geometry(self, b: int, device) -> torch.Tensor:
        """Random resized crop + flip for ``b`` images: (b, 4) = (x scale, x shift, y scale, y shift).

        Coordinates are normalised to [-1, 1]; a negative x scale is a horizontal flip.
        """
        area = torch.empty(b, device=device).uniform_(*self.scale)
        log_r = torch.empty(b, device=device).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r)
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop size as a fraction of the side
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (torch.rand(b, device=device) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, device=device) * 2 - 1) * (1 - h)
        sign = (
            torch.where(torch.rand(b, device=device) < 0.5, -1.0, 1.0)
            if self.flip
            else torch.ones(b, device=device)
        )
        return torch.stack([w * sign, cx, h, cy], dim=1)

    @staticmethod
    def sampling_grid(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The (b, H, W, 2) ``grid_sample`` grid of :meth:`geometry`'s crops (an axis-aligned affine_grid)."""
        dev = params.device
        xs = (torch.arange(width, device=dev, dtype=torch.float32) * 2 + 1) / width - 1
        ys = (torch.arange(height, device=dev, dtype=torch.float32) * 2 + 1) / height - 1
        gx = params[:, 0, None, None] * xs[None, None, :] + params[:, 1, None, None]  # (b, 1, W)
        gy = params[:, 2, None, None] * ys[None, :, None] + params[:, 3, None, None]  # (b, H, 1)
        b = params.shape[0]
        return torch.stack([gx.expand(b, height, width), gy.expand(b, height, width)], dim=-1)

    def forward(
        self, x: torch.Tensor, crops: torch.Tensor | None = None, jitter: bool = True
    ) -> torch.Tensor:
        """Augment and normalise uint8 images (B, 3, H, W); ``crops`` reuses :meth:`geometry`'s draw.

        The three jitters are folded into one per-image affine map of the pixels (saturation first,
        then brightness and contrast about the image's mean grey), followed by one clamp, so the
        augmentation costs a few passes over the batch instead of one per operation.
        """
        b, device = x.shape[0], x.device
        if b == 0:
            return self.normalize(x)
        x = x.float()
        if crops is None:
            crops = self.geometry(b, device)
        grid = self.sampling_grid(crops, x.shape[-2], x.shape[-1])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if jitter and self.jitter > 0:
            j = self.jitter
            brightness, contrast, saturation = torch.empty(3, b, 1, 1, 1, device=device).uniform_(
                1 - j, 1 + j
            )
            grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
            mean = grey.mean(dim=(2, 3), keepdim=True)
            x = torch.lerp(grey.expand_as(x), x, saturation)  # saturation * x + (1 - saturation) * grey
            x = x.mul_(brightness * contrast).add_(brightness * mean * (1 - contrast))
        x = x.clamp_(0, 255)
        scale, shift = self._affine(x)
        return torch.addcmul(shift, x, scale)
