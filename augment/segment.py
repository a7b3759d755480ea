"""Foreground masks from SAM, prompted with boxes from a given mask or from a text-grounded detector.

Two modes (``--mask-source``; ``given`` is handled by the pipeline, which keeps the source's masks):

* ``sam``: one box per image, the box of the given mask (:func:`box_from_mask`) when there is one,
  otherwise the detector's boxes for the label. An item with neither gets an ``error``, never an
  exception.
* ``grounded``: the detector is asked for the label and every foreground phrase of the image; the
  label's boxes (at most ``max_boxes``, score >= ``box_threshold``) become SAM masks whose union is the
  object mask, and each phrase's boxes give that phrase's mask. Given masks are not used in this mode.

SAM runs through one of two backends with the same two methods, ``embed(images)`` (the image
encoder, once per image, batched over images) and ``masks_from_boxes(embedded, boxes_per_image)``
(prompt encoder + mask decoder, all the boxes of an image in one call on its stored embedding):

* :class:`TransformersSam`: ``SamModel`` (``facebook/sam-vit-base``/``-large``/``-huge`` or a folder) and
  its processor. SAM 2 (``Sam2Model``) and SAM-HQ are refused with a clear error: SAM 2's processor
  needs torchvision (which this project cannot install) and SAM-HQ's decoder takes extra inputs.
* :class:`SegmentAnythingSam`: the original ``segment-anything`` package and a ``.pth`` checkpoint
  (``--sam-checkpoint PATH --sam-type vit_h|vit_l|vit_b``). Its package ``__init__`` imports
  torchvision, so only its model code is loaded (see :func:`import_segment_anything`) and the
  preprocessing (longest side 1024, bilinear, the model's pixel mean/std, zero padding) is done here.

The detector (:class:`TextDetector`) is any transformers zero-shot object detector of the OWLv2/OWL-ViT
or GroundingDINO families. Each query (label or phrase) is scored on its own: OWL gives one logit per
(box, query); GroundingDINO one per (box, text token), and a phrase's score is the highest over the
tokens of that phrase in the dot-separated prompt. Per query the candidate boxes are sorted by score,
near-duplicates are removed by greedy non-maximum suppression (IoU > ``nms_iou``) and the best
``top_k`` are returned, below the threshold too, so that a rejection can name the best score.

Post-processing (:class:`PostProcess`) runs on every mask at the original image size: fill holes,
dilate, then reject masks that are empty, too small or too large.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import trust

__all__ = [
    "PostProcess",
    "SegmentResult",
    "Segmenter",
    "TextDetector",
    "TransformersSam",
    "SegmentAnythingSam",
    "SEGMENT_ANYTHING_TYPES",
    "box_from_mask",
    "union_masks",
    "fill_holes",
    "dilate",
    "postprocess",
    "mask_area",
    "import_segment_anything",
]

MODES = ("sam", "grounded")
MASK_SOURCES = ("given", *MODES)

# --sam-type -> a builder: a function name in segment_anything.build_sam, or a callable returning an
# (untrained) ``segment_anything.modeling.Sam``. Tests register tiny architectures here.
SEGMENT_ANYTHING_TYPES: dict[str, str | Callable[[], Any]] = {
    "vit_h": "build_sam_vit_h",
    "vit_l": "build_sam_vit_l",
    "vit_b": "build_sam_vit_b",
}


# ----------------------------------------------------------------------------------------------
# mask helpers


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


@dataclass
class PostProcess:
    """Settings of mask post-processing, applied in this order at the original image size.

    ``fill_holes``: background regions that are not 4-connected to the image border become foreground
    (:func:`fill_holes`). ``dilate``: grow the mask by this many pixels with a disk (Euclidean distance
    <= ``dilate``; :func:`dilate`). ``min_area`` / ``max_area``: an object mask covering less than
    ``min_area`` (or nothing at all) or more than ``max_area`` of the image is rejected.
    """

    fill_holes: bool = True
    dilate: int = 0
    min_area: float = 0.005
    max_area: float = 0.95

    def __post_init__(self):
        if self.dilate < 0:
            raise ValueError(f"dilate must be >= 0 pixels, got {self.dilate}")
        if not 0.0 <= self.min_area <= self.max_area <= 1.0:
            raise ValueError(
                f"need 0 <= min_area <= max_area <= 1, got min_area={self.min_area}, max_area={self.max_area}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "dilate_shape": "disk (Euclidean distance <= dilate pixels)",
            "hole_connectivity": 4,
            "order": ["fill_holes", "dilate", "area bounds"],
        }


def mask_area(mask: np.ndarray) -> float:
    """The fraction of the image a mask covers (0.0 for a mask with no pixels)."""
    mask = np.asarray(mask, dtype=bool)
    return float(mask.mean()) if mask.size else 0.0


def box_from_mask(mask: np.ndarray) -> list[float] | None:
    """``[x0, y0, x1, y1]`` of the foreground in pixels; ``x1``/``y1`` are exclusive edges (last index + 1).

    A single pixel at row 3, column 5 gives ``[5, 3, 6, 4]``. None for an empty mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def union_masks(masks: Sequence[np.ndarray], shape) -> np.ndarray:
    """The pixel-wise OR of ``masks`` (each of ``shape``); all False of ``shape`` for no masks."""
    out = np.zeros(tuple(shape), dtype=bool)
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.shape != out.shape:
            raise ValueError(f"mask of shape {m.shape} in a union of shape {out.shape}")
        out |= m
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not connected to the image border become foreground.

    Connectivity of the background is 4 (up, down, left, right): a region enclosed by a foreground
    outline that is only 8-connected (diagonal steps) is a hole and gets filled. A region that touches
    the border, such as the inside of a U standing on the image edge, is not a hole.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return ndimage.binary_fill_holes(mask, structure=ndimage.generate_binary_structure(2, 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow ``mask`` by a disk of ``radius`` pixels: a pixel becomes foreground when some foreground
    pixel lies within Euclidean distance ``radius`` of it (radius 1 adds the 4 neighbours, radius 2 a
    13-pixel disk). Computed with an exact Euclidean distance transform, so the cost does not grow
    with the radius."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def _shape_mask(mask: np.ndarray, settings: PostProcess) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if settings.fill_holes:
        mask = fill_holes(mask)
    if settings.dilate:
        mask = dilate(mask, settings.dilate)
    return mask


def postprocess(mask: np.ndarray, settings: PostProcess) -> tuple[np.ndarray, str | None]:
    """``(mask after fill_holes and dilate, rejection reason or None)``.

    The reason gives the area found and the bound it broke, e.g. ``"mask covers 0.2% of the image
    (min 0.5%)"``, ``"mask is empty"``, ``"mask covers 98.4% of the image (max 95%)"``. The area
    bounds are inclusive: a mask of exactly ``min_area`` or ``max_area`` is kept.
    """
    mask = _shape_mask(mask, settings)
    area = mask_area(mask)
    if not mask.any():
        return mask, "mask is empty"
    if area < settings.min_area:
        return mask, f"mask covers {_pct(area)} of the image (min {_pct(settings.min_area)})"
    if area > settings.max_area:
        return mask, f"mask covers {_pct(area)} of the image (max {_pct(settings.max_area)})"
    return mask, None


def _as_bool_mask(mask) -> np.ndarray:
    """A given mask (bool, 0/1 or 0/255 integers, floats in [0, 1], or a PIL image) as bool HxW."""
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype.kind == "f":
        return arr >= 0.5
    return arr > 0


def _clip_box(box: Sequence[float], width: int, height: int) -> list[float] | None:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 < 1 or y1 - y0 < 1:  # thinner than a pixel inside the image: not an object
        return None
    return [x0, y0, x1, y1]


def _nms(boxes, scores, iou: float, top_k: int) -> list[int]:
    """Greedy non-maximum suppression: indices (best first) of at most ``top_k`` boxes, each
    overlapping every better kept box by IoU <= ``iou``."""
    import torch

    order = torch.argsort(scores, descending=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    ious = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-9)
    kept: list[int] = []
    for i in range(len(order)):
        if all(ious[i, j] <= iou for j in kept):
            kept.append(i)
            if len(kept) == top_k:
                break
    return [int(order[i]) for i in kept]


# ----------------------------------------------------------------------------------------------
# SAM backends


def _model_ref(model_id: str, config, revision: str | None) -> dict[str, Any]:
    return {
        "model": model_id,
        "revision": revision,
        "commit": getattr(config, "_commit_hash", None) if config is not None else None,
    }


@dataclass
class Embedded:
    """What ``embed`` returns: the image embeddings of a batch and what is needed to map boxes in and
    masks out. ``sizes``: (height, width) of each original image; ``input_sizes``: (height, width) of
    each resized image inside the padded model input."""

    embeddings: Any
    sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]


def _scale_boxes(boxes: Sequence[Sequence[float]], size, input_size) -> list[list[float]]:
    (h, w), (nh, nw) = size, input_size
    sx, sy = nw / w, nh / h
    return [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]


class _SamBackend:
    """The loop both SAM backends share: per image, its boxes mapped into the model's input frame and
    decoded together on the stored embedding (:meth:`_decode`, one call per image)."""

    def masks_from_boxes(self, embedded: Embedded, boxes_per_image: Sequence[Sequence]) -> list[np.ndarray]:
        """Per image a bool array ``(len(boxes), H, W)`` at the original size (``(0, H, W)`` for no boxes)."""
        out = []
        for i, boxes in enumerate(boxes_per_image):
            h, w = embedded.sizes[i]
            if not boxes:
                out.append(np.zeros((0, h, w), dtype=bool))
                continue
            out.append(
                self._decode(embedded, i, _scale_boxes(boxes, embedded.sizes[i], embedded.input_sizes[i]))
            )
        return out

    def _decode(self, embedded: Embedded, i: int, scaled: list[list[float]]) -> np.ndarray:
        raise NotImplementedError


class TransformersSam(_SamBackend):
    """SAM through transformers (``SamModel`` + ``SamProcessor``): the vision encoder runs once per
    image (``get_image_embeddings``, batched over images); each image's boxes are then decoded
    together in one prompt-only forward (``image_embeddings=``) and upscaled to the original size
    with the processor's ``post_process_masks`` (threshold 0 on the mask logits)."""

    backend = "transformers"

    def __init__(self, model, processor, device: str | None = None, dtype=None, ref: dict | None = None):
        import torch

        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self.ref = ref or _model_ref(getattr(model, "name_or_path", "") or "", model.config, None)
        if getattr(model.config, "model_type", "sam") != "sam":
            raise ValueError(
                f"{self.ref.get('model')!r} is a {model.config.model_type!r} model; TransformersSam supports "
                "SamModel (model_type 'sam'); SAM 2 needs torchvision for its processor and is not supported"
            )

    @classmethod
    def from_pretrained(
        cls, model_id: str, revision: str | None = None, device: str | None = None, dtype=None
    ):
        from transformers import AutoModelForMaskGeneration, AutoProcessor

        from .runtime import check_model_ref, resolve_device, resolve_dtype

        model_id = check_model_ref(model_id, "--sam")
        device = resolve_device(device)
        torch_dtype = dtype if not isinstance(dtype, str | None) else resolve_dtype(device, dtype)
        model = AutoModelForMaskGeneration.from_pretrained(
            model_id, revision=revision, dtype=torch_dtype, **trust.model_kwargs()
        )
        processor = AutoProcessor.from_pretrained(model_id, revision=revision, **trust.code_kwargs())
        model.to(device)
        return cls(model, processor, device, torch_dtype, _model_ref(model_id, model.config, revision))

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            **self.ref,
            "class": type(self.model).__name__,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def embed(self, images: Sequence) -> Embedded:
        import torch

        enc = self.processor(images=list(images), return_tensors="pt")
        pixel_values = enc["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(pixel_values)
        return Embedded(
            embeddings,
            [tuple(int(v) for v in s) for s in enc["original_sizes"].tolist()],
            [tuple(int(v) for v in s) for s in enc["reshaped_input_sizes"].tolist()],
        )

    def _decode(self, embedded: Embedded, i: int, scaled: list[list[float]]) -> np.ndarray:
        import torch

        # float32 boxes: the model normalises them to [0, 1] before casting to its own dtype
        input_boxes = torch.tensor([scaled], dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            pred = self.model(
                image_embeddings=embedded.embeddings[i : i + 1],
                input_boxes=input_boxes,
                multimask_output=False,
            ).pred_masks  # (1, boxes, 1, h', w') logits
        masks = self.processor.post_process_masks(
            [pred[0].float().cpu()], [embedded.sizes[i]], [embedded.input_sizes[i]]
        )[0]
        return masks[:, 0].numpy().astype(bool)


def import_segment_anything():
    """``segment_anything.build_sam`` without running the package ``__init__`` (which imports
    torchvision through its predictor and mask generator).

    When the package was already imported normally it is used as is. Otherwise a bare package module
    with the installed package's ``__path__`` stands in while ``build_sam`` and ``modeling`` load, and
    is removed afterwards, so a later ``import segment_anything`` (where torchvision works) still runs
    the real ``__init__``. Raises ImportError with the install command when the package is missing.
    """
    if "segment_anything.build_sam" in sys.modules:
        return sys.modules["segment_anything.build_sam"]
    if "segment_anything" in sys.modules:
        return importlib.import_module("segment_anything.build_sam")
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "--sam-checkpoint needs the segment-anything package: pip install segment-anything "
            "(or use a transformers SAM with --sam facebook/sam-vit-huge)"
        )
    bare = types.ModuleType("segment_anything")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    bare.__package__ = "segment_anything"
    sys.modules["segment_anything"] = bare
    try:
        return importlib.import_module("segment_anything.build_sam")
    finally:
        if sys.modules.get("segment_anything") is bare:
            del sys.modules["segment_anything"]


class SegmentAnythingSam(_SamBackend):
    """SAM from the original ``segment-anything`` package (``Sam`` module with ``image_encoder``,
    ``prompt_encoder``, ``mask_decoder``), with this module's own preprocessing in place of its
    torchvision-based ``ResizeLongestSide``: resize so the longest side is the encoder's ``img_size``
    (new side ``int(side * scale + 0.5)``, PIL bilinear), normalise with the model's pixel mean/std and
    zero-pad to a square (``Sam.preprocess``). float16/bfloat16 run under ``torch.autocast`` (weights
    stay float32). Each image is encoded once; its boxes go through the
    prompt encoder and mask decoder in one call (the decoder repeats the embedding per box itself) and
    are upscaled with ``Sam.postprocess_masks``, thresholded at ``Sam.mask_threshold``."""

    backend = "segment-anything"

    def __init__(self, sam, device: str | None = None, dtype=None, ref: dict | None = None):
        import torch

        self.model = sam.eval()
        self.device = torch.device(device) if device else next(sam.parameters()).device
        self.dtype = dtype or torch.float32  # the compute dtype; the weights stay float32
        self.ref = ref or {"model": None, "revision": None, "commit": None}

    def _autocast(self):
        """float16/bfloat16 run under autocast: the package's prompt encoder builds float32 tensors
        itself, so casting the weights would break it."""
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, sam_type: str = "vit_h", device: str | None = None, dtype=None):

        from .runtime import resolve_device, resolve_dtype

        if sam_type not in SEGMENT_ANYTHING_TYPES:
            raise ValueError(f"--sam-type must be one of {sorted(SEGMENT_ANYTHING_TYPES)}, got {sam_type!r}")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"--sam-checkpoint {checkpoint!r} is not a file")
        builder = SEGMENT_ANYTHING_TYPES[sam_type]
        if isinstance(builder, str):
            builder = getattr(import_segment_anything(), builder)
        else:
            import_segment_anything()  # a clear ImportError when the package is missing
        device = resolve_device(device)
        torch_dtype = dtype if not isinstance(dtype, str | None) else resolve_dtype(device, dtype)
        sam = builder()
        state = trust.load_weights(checkpoint, "--sam-checkpoint")
        sam.load_state_dict(state)
        sam.to(device=device)
        ref = {"model": str(checkpoint), "revision": None, "commit": None, "sam_type": sam_type}
        return cls(sam, device, torch_dtype, ref)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            **self.ref,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def image_size(self) -> int:
        return int(self.model.image_encoder.img_size)

    def _input_size(self, h: int, w: int) -> tuple[int, int]:
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def embed(self, images: Sequence) -> Embedded:
        import torch
        from PIL import Image

        batch, sizes, input_sizes = [], [], []
        for image in images:
            image = image.convert("RGB") if image.mode != "RGB" else image
            w, h = image.size
            nh, nw = self._input_size(h, w)
            resized = np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
            x = torch.from_numpy(resized).permute(2, 0, 1).to(self.device)
            batch.append(self.model.preprocess(x))  # normalise (pixel mean/std in 0..255) and pad
            sizes.append((h, w))
            input_sizes.append((nh, nw))
        with torch.inference_mode(), self._autocast():
            embeddings = self.model.image_encoder(torch.stack(batch))
        return Embedded(embeddings, sizes, input_sizes)

    def _decode(self, embedded: Embedded, i: int, scaled: list[list[float]]) -> np.ndarray:
        import torch

        boxes = torch.tensor(scaled, dtype=torch.float32, device=self.device)
        with torch.inference_mode(), self._autocast():
            sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes, masks=None)
            low_res, _ = self.model.mask_decoder(
                image_embeddings=embedded.embeddings[i : i + 1],
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            masks = self.model.postprocess_masks(
                low_res.float(), input_size=embedded.input_sizes[i], original_size=embedded.sizes[i]
            )
        return (masks[:, 0] > self.model.mask_threshold).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# detector


def _center_to_corners(boxes):
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _clean_query(text: str) -> str:
    """Lower-case, one space, no dots (GroundingDINO separates phrases with dots)."""
    return " ".join(text.replace(".", " ").lower().split())


class TextDetector:
    """A transformers zero-shot object detector (``AutoModelForZeroShotObjectDetection``).

    ``detect(images, queries)`` returns, per image, ``{query: [(box, score), ...]}`` with boxes as
    ``[x0, y0, x1, y1]`` in original pixels (clipped to the image; boxes less than a pixel wide or high
    inside the image are dropped), best first,
    after greedy NMS at ``nms_iou``, at most ``top_k`` per query, whatever their score.

    Families: ``owlv2`` / ``owlvit`` (the queries of each image as a list; OWLv2 predicts boxes on the
    image padded to a square at the bottom/right, so boxes scale by the longest side; OWL-ViT by width
    and height) and ``grounding-dino`` / ``mm-grounding-dino`` (one lower-case prompt ``"a dog. grass."``;
    a query's score for a box is the highest token probability inside that query's span).
    """

    pre_nms = 100  # candidates per query that go into NMS (the highest-scoring ones)

    FAMILIES = {
        "owlv2": "owl",
        "owlvit": "owl",
        "grounding-dino": "grounding-dino",
        "mm-grounding-dino": "grounding-dino",
    }

    def __init__(
        self,
        model,
        processor,
        device: str | None = None,
        dtype=None,
        ref: dict | None = None,
        top_k: int = 4,
        nms_iou: float = 0.5,
    ):
        import torch

        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.dtype = dtype or next(model.parameters()).dtype
        self.ref = ref or _model_ref(getattr(model, "name_or_path", "") or "", model.config, None)
        self.top_k = top_k
        self.nms_iou = nms_iou
        model_type = getattr(model.config, "model_type", None)
        if model_type not in self.FAMILIES:
            raise ValueError(
                f"unsupported detector {self.ref.get('model')!r} (model_type {model_type!r}); "
                f"supported: {sorted(self.FAMILIES)}"
            )
        self.model_type = model_type
        self.family = self.FAMILIES[model_type]

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        revision: str | None = None,
        device: str | None = None,
        dtype=None,
        top_k: int = 4,
        nms_iou: float = 0.5,
    ):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from .runtime import check_model_ref, resolve_device, resolve_dtype

        model_id = check_model_ref(model_id, "--detector")
        device = resolve_device(device)
        torch_dtype = dtype if not isinstance(dtype, str | None) else resolve_dtype(device, dtype)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(
            model_id, revision=revision, dtype=torch_dtype, **trust.model_kwargs()
        )
        processor = AutoProcessor.from_pretrained(model_id, revision=revision, **trust.code_kwargs())
        model.to(device)
        ref = _model_ref(model_id, model.config, revision)
        return cls(model, processor, device, torch_dtype, ref, top_k=top_k, nms_iou=nms_iou)

    def describe(self) -> dict[str, Any]:
        return {
            **self.ref,
            "class": type(self.model).__name__,
            "family": self.model_type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "nms_iou": self.nms_iou,
        }

    def detect(self, images: Sequence, queries: Sequence[Sequence[str]]) -> list[dict[str, list]]:
        import torch

        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images but {len(queries)} query lists")
        if not images:
            return []
        queries = [list(dict.fromkeys(_clean_query(q) for q in qs if _clean_query(q))) for qs in queries]
        sizes = [(im.size[1], im.size[0]) for im in images]
        if self.family == "owl":
            boxes, scores = self._owl(images, queries, sizes)
        else:
            boxes, scores = self._grounding_dino(images, queries, sizes)
        results = []
        for i, qs in enumerate(queries):
            h, w = sizes[i]
            per_query: dict[str, list] = {}
            clipped = [_clip_box(b, w, h) for b in boxes[i].tolist()]
            valid = [j for j, b in enumerate(clipped) if b is not None]
            cand = torch.tensor([clipped[j] for j in valid], dtype=torch.float32).reshape(-1, 4)
            for q_index, q in enumerate(qs):
                s = scores[i][valid, q_index].float()
                top = torch.topk(s, min(self.pre_nms, len(valid))).indices  # NMS on the best only
                keep = _nms(cand[top], s[top], self.nms_iou, self.top_k)
                per_query[q] = [(cand[top[k]].tolist(), float(s[top[k]])) for k in keep]
            results.append(per_query)
        return results

    def _owl(self, images, queries, sizes):
        import torch

        padded = [qs if qs else [" "] for qs in queries]
        enc = self.processor(text=padded, images=list(images), return_tensors="pt", truncation=True)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model(**enc)
        probs = torch.sigmoid(out.logits.float()).cpu()  # (images, boxes, queries)
        boxes = _center_to_corners(out.pred_boxes.float().cpu())
        scale = []
        for h, w in sizes:
            if self.model_type == "owlv2":
                side = max(h, w)
                scale.append([side, side, side, side])
            else:
                scale.append([w, h, w, h])
        boxes = boxes * torch.tensor(scale, dtype=boxes.dtype)[:, None, :]
        return boxes, probs

    def _grounding_dino(self, images, queries, sizes):
        import torch

        texts, spans = [], []
        for qs in queries:
            text, qspans = "", []
            for q in qs or ["object"]:
                start = len(text)
                text += q
                qspans.append((start, len(text)))
                text += ". "
            texts.append(text.strip())
            spans.append(qspans)
        enc = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        offsets = [self.processor.tokenizer(t, return_offsets_mapping=True)["offset_mapping"] for t in texts]
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = torch.sigmoid(out.logits.float()).cpu()  # (images, boxes, text positions)
        boxes = _center_to_corners(out.pred_boxes.float().cpu())
        scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=boxes.dtype)
        boxes = boxes * scale[:, None, :]
        per_query = []
        for i, qspans in enumerate(spans):
            cols = []
            for start, end in qspans:
                tokens = [
                    t
                    for t, (a, b) in enumerate(offsets[i])
                    if b > a and a >= start and b <= end and t < probs.shape[2]
                ]
                if tokens:
                    cols.append(probs[i][:, tokens].max(dim=1).values)
                else:  # the phrase fell outside the model's text length
                    cols.append(torch.zeros(probs.shape[1]))
            per_query.append(torch.stack(cols, dim=1))
        return boxes, per_query


# ----------------------------------------------------------------------------------------------
# the segmenter


@dataclass
class SegmentResult:
    """The segmentation of one image.

    ``mask``: bool HxW at the original image size, post-processed; None when rejected (``error`` says
    why). ``boxes``: the object boxes SAM was prompted with (image pixels, xyxy), ``box_scores`` their
    detector scores (empty for a box from a given mask). ``box_source``: ``"given-mask"``,
    ``"detector"``, or ``"none"`` (no mask and no detector: nothing to take a box from). ``area``: the
    fraction of the image the post-processed mask covers (also when it was rejected for its area).
    ``phrase_masks``/``phrase_boxes``/``phrase_scores`` (grounded mode): per foreground phrase with at
    least one box passing the threshold, its mask (union over its boxes, fill holes and dilate, no
    area rejection), boxes and scores; phrases with no box are absent from all three. When the object
    itself has no box, SAM is not run and the phrase dicts are empty.
    """

    mask: np.ndarray | None
    boxes: list[list[float]] = field(default_factory=list)
    box_source: str = "none"
    area: float = 0.0
    phrase_masks: dict[str, np.ndarray] = field(default_factory=dict)
    phrase_boxes: dict[str, list[list[float]]] = field(default_factory=dict)
    phrase_scores: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    box_scores: list[float] = field(default_factory=list)


class Segmenter:
    """Masks for a batch of labelled images (see the module docstring for the modes).

    ``sam``: a :class:`TransformersSam` or :class:`SegmentAnythingSam` (anything with ``embed``,
    ``masks_from_boxes`` and ``describe``). ``detector``: a :class:`TextDetector` (anything with
    ``detect(images, queries)`` and ``describe``) or None. Images go through the detector and SAM's
    encoder ``batch_size`` at a time; each image is encoded once, however many boxes it has, and
    images without any box are not encoded at all.
    """

    def __init__(
        self,
        mode: str,
        sam,
        detector=None,
        post: PostProcess | None = None,
        batch_size: int = 8,
        box_threshold: float = 0.1,
        max_boxes: int = 4,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if mode == "grounded" and detector is None:
            raise ValueError("grounded mode needs a detector")
        if batch_size < 1 or max_boxes < 1:
            raise ValueError(f"batch_size and max_boxes must be >= 1, got {batch_size}, {max_boxes}")
        self.mode = mode
        self.sam = sam
        self.detector = detector
        self.post = post or PostProcess()
        self.batch_size = batch_size
        self.box_threshold = box_threshold
        self.max_boxes = max_boxes
        if detector is not None and getattr(detector, "top_k", max_boxes) < max_boxes:
            detector.top_k = max_boxes

    def describe(self) -> dict[str, Any]:
        """What the dataset card records: mode, models (id, requested revision, resolved commit),
        thresholds and post-processing."""
        return {
            "mode": self.mode,
            "sam": self.sam.describe()
            if hasattr(self.sam, "describe")
            else {"class": type(self.sam).__name__},
            "detector": self.detector.describe() if self.detector is not None else None,
            "box_threshold": self.box_threshold,
            "max_boxes": self.max_boxes,
            "postprocess": self.post.describe(),
        }

    # -- box selection --------------------------------------------------------------------------

    def _pick(self, query: str, found: list) -> tuple[list[list[float]], list[float], str | None]:
        """The boxes of ``found`` passing the threshold (at most max_boxes), or why there are none."""
        kept = [(b, s) for b, s in found if s >= self.box_threshold][: self.max_boxes]
        if kept:
            return [list(map(float, b)) for b, _ in kept], [float(s) for _, s in kept], None
        if not found:
            return [], [], f"detector found no box for {query!r}"
        best = max(s for _, s in found)
        return [], [], f"detector found no box for {query!r} (best score {best:.3g} < {self.box_threshold:g})"

    def _plan(self, image, label: str, phrases: Sequence[str], given, detections) -> dict[str, Any]:
        """Object boxes, box source, error and phrase boxes of one item, before SAM runs."""
        plan: dict[str, Any] = {"boxes": [], "scores": [], "source": "none", "error": None, "phrases": {}}
        w, h = image.size
        if self.mode == "sam" and given is not None:
            mask = _as_bool_mask(given)
            plan["source"] = "given-mask"
            if mask.shape != (h, w):
                plan["error"] = f"given mask is {mask.shape[1]}x{mask.shape[0]}, image is {w}x{h}"
                return plan
            box = box_from_mask(mask)
            if box is not None:
                plan["boxes"] = [box]
                return plan
            if self.detector is None:
                plan["error"] = "given mask is empty and there is no detector to find a box"
                return plan
        if self.detector is None:
            plan["error"] = f"no given mask and no detector to find a box for {label!r}"
            return plan
        plan["source"] = "detector"
        found = detections or {}
        label_q = _clean_query(label)
        plan["boxes"], plan["scores"], plan["error"] = self._pick(label_q, found.get(label_q, []))
        if self.mode == "grounded" and plan["boxes"]:
            for phrase in phrases:
                boxes, scores, _ = self._pick(phrase, found.get(_clean_query(phrase), []))
                if boxes:
                    plan["phrases"][phrase] = (boxes, scores)
        return plan

    def _queries(self, label: str, phrases: Sequence[str], given) -> list[str] | None:
        """The detector queries of one item, or None when it needs no detection."""
        if self.detector is None:
            return None
        if self.mode == "sam":
            if given is not None and _as_bool_mask(given).any():
                return None
            return [label]
        return [label, *phrases]

    # -- running --------------------------------------------------------------------------------

    def __call__(
        self,
        images: list,
        labels: list[str],
        phrases: list[list[str]] | None = None,
        given_masks: list[np.ndarray | None] | None = None,
        progress: bool = False,
    ) -> list[SegmentResult]:
        from tqdm.auto import tqdm

        n = len(images)
        phrases = phrases if phrases is not None else [[] for _ in range(n)]
        given_masks = given_masks if given_masks is not None else [None] * n
        if not (len(labels) == len(phrases) == len(given_masks) == n):
            raise ValueError(
                f"{n} images, {len(labels)} labels, {len(phrases)} phrase lists, {len(given_masks)} masks"
            )
        results: list[SegmentResult] = []
        with tqdm(total=n, desc="segment", unit="img", disable=not progress) as bar:
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                results.extend(
                    self._batch(
                        [im.convert("RGB") if im.mode != "RGB" else im for im in images[start:stop]],
                        labels[start:stop],
                        [list(p or []) for p in phrases[start:stop]],
                        given_masks[start:stop],
                    )
                )
                bar.update(stop - start)
        return results

    def _batch(self, images, labels, phrases, given) -> list[SegmentResult]:
        queries = [self._queries(lab, ph, g) for lab, ph, g in zip(labels, phrases, given)]
        need = [i for i, q in enumerate(queries) if q is not None]
        detections: list[dict | None] = [None] * len(images)
        if need:
            found = self.detector.detect([images[i] for i in need], [queries[i] for i in need])
            for i, d in zip(need, found):
                detections[i] = d
        plans = [
            self._plan(images[i], labels[i], phrases[i], given[i], detections[i]) for i in range(len(images))
        ]
        # every box of an image (object first, then each phrase's) in one SAM call on one embedding
        to_run = [i for i, p in enumerate(plans) if p["boxes"]]
        masks_of: dict[int, np.ndarray] = {}
        if to_run:
            prompts = []
            for i in to_run:
                boxes = list(plans[i]["boxes"])
                for pb, _ in plans[i]["phrases"].values():
                    boxes.extend(pb)
                prompts.append(boxes)
            embedded = self.sam.embed([images[i] for i in to_run])
            for i, m in zip(to_run, self.sam.masks_from_boxes(embedded, prompts)):
                masks_of[i] = m
        return [self._result(plans[i], images[i], masks_of.get(i)) for i in range(len(images))]

    def _result(self, plan: dict, image, masks: np.ndarray | None) -> SegmentResult:
        w, h = image.size
        res = SegmentResult(
            mask=None,
            boxes=plan["boxes"],
            box_source=plan["source"],
            box_scores=plan["scores"],
            error=plan["error"],
        )
        if masks is None:
            return res
        k = len(plan["boxes"])
        shaped, reason = postprocess(union_masks(masks[:k], (h, w)), self.post)
        res.area = mask_area(shaped)
        if reason is None:
            res.mask = shaped
        else:
            res.error = reason
        for phrase, (pb, ps) in plan["phrases"].items():
            res.phrase_masks[phrase] = _shape_mask(union_masks(masks[k : k + len(pb)], (h, w)), self.post)
            res.phrase_boxes[phrase] = pb
            res.phrase_scores[phrase] = ps
            k += len(pb)
        return res

    # -- construction from command-line flags ---------------------------------------------------

    @classmethod
    def from_flags(
        cls,
        mask_source: str,
        sam: str | None = None,
        detector: str | None = None,
        sam_checkpoint: str | None = None,
        sam_type: str = "vit_h",
        device: str | None = None,
        dtype: str | None = None,
        post: PostProcess | None = None,
        batch_size: int = 8,
        box_threshold: float = 0.1,
        max_boxes: int = 4,
        revision: str | None = None,
        detector_revision: str | None = None,
    ) -> Segmenter | None:
        """The segmenter that ``--mask-source`` and the model flags ask for.

        Returns None for ``mask_source="given"`` (the pipeline keeps the source's masks; no model is
        loaded, whatever else is passed). Raises ValueError for an unknown mask source, for ``sam``/
        ``grounded`` without ``sam`` or ``sam_checkpoint`` or with both, for ``grounded`` without a
        detector, and for an unknown ``sam_type``; FileNotFoundError for a missing checkpoint;
        ImportError when ``sam_checkpoint`` is given and segment-anything is not installed. Flag errors
        are all checked before any model loads. ``revision`` applies to the Hub ids of both models
        (``detector_revision`` overrides it for the detector).
        """
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"unknown mask source {mask_source!r}; choose one of {list(MASK_SOURCES)}")
        if mask_source == "given":
            return None
        if sam and sam_checkpoint:
            raise ValueError(
                "give either --sam (a transformers SAM) or --sam-checkpoint (segment-anything), not both"
            )
        if not sam and not sam_checkpoint:
            raise ValueError(
                f"--mask-source {mask_source} needs a SAM: --sam ID_OR_PATH (e.g. facebook/sam-vit-base) "
                "or --sam-checkpoint PATH with --sam-type vit_h|vit_l|vit_b"
            )
        if mask_source == "grounded" and not detector:
            raise ValueError(
                "--mask-source grounded needs --detector ID_OR_PATH "
                "(e.g. google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny)"
            )
        if sam_checkpoint:
            if sam_type not in SEGMENT_ANYTHING_TYPES:
                raise ValueError(
                    f"--sam-type must be one of {sorted(SEGMENT_ANYTHING_TYPES)}, got {sam_type!r}"
                )
            if not Path(sam_checkpoint).is_file():
                raise FileNotFoundError(f"--sam-checkpoint {sam_checkpoint!r} is not a file")
        if batch_size < 1 or max_boxes < 1:
            raise ValueError(f"batch size and max boxes must be >= 1, got {batch_size} and {max_boxes}")
        if sam_checkpoint:
            sam_backend = SegmentAnythingSam.from_checkpoint(
                sam_checkpoint, sam_type, device=device, dtype=dtype
            )
        else:
            sam_backend = TransformersSam.from_pretrained(sam, revision=revision, device=device, dtype=dtype)
        det = None
        if detector:
            det = TextDetector.from_pretrained(
                detector,
                revision=detector_revision if detector_revision is not None else revision,
                device=device,
                dtype=dtype,
                top_k=max_boxes,
            )
        return cls(
            mask_source,
            sam_backend,
            detector=det,
            post=post,
            batch_size=batch_size,
            box_threshold=box_threshold,
            max_boxes=max_boxes,
        )


# ----------------------------------------------------------------------------------------------
# command-line flags shared by generate.py and personalize.py


def add_mask_arguments(group, choices: Sequence[str], default: str, what: str = "label") -> None:
    """The mask flags (``--mask-source``, ``--sam``, ``--detector``, post-processing) on an argparse group.

    ``choices``: the mask sources the command accepts (``given`` / ``none`` plus :data:`MODES`);
    ``what``: what the detector is asked for (named in the help).
    """
    group.add_argument("--mask-source", choices=list(choices), default=default, help="where masks come from")
    group.add_argument(
        "--sam", metavar="ID_OR_PATH", help="transformers SAM, e.g. facebook/sam-vit-base, or a folder"
    )
    group.add_argument(
        "--sam-checkpoint",
        metavar="PATH",
        help="an original segment-anything checkpoint (sam_vit_h_4b8939.pth, ...) instead of --sam",
    )
    group.add_argument(
        "--sam-type", default="vit_h", choices=sorted(SEGMENT_ANYTHING_TYPES), help="--sam-checkpoint's type"
    )
    group.add_argument(
        "--detector",
        metavar="ID_OR_PATH",
        help=f"text-grounded detector that finds the {what}'s boxes: google/owlv2-base-patch16-ensemble, "
        "IDEA-Research/grounding-dino-tiny, or a folder",
    )
    group.add_argument("--box-threshold", type=float, default=0.1, help="lowest detector score kept")
    group.add_argument("--max-boxes", type=int, default=4, help="boxes kept per query (best first)")
    group.add_argument("--segment-batch-size", type=int, default=8, help="images per SAM/detector batch")
    group.add_argument("--no-fill-holes", dest="fill_holes", action="store_false", help="keep holes in masks")
    group.add_argument("--dilate", type=int, default=0, help="grow masks by this many pixels")
    group.add_argument(
        "--min-mask-area",
        type=float,
        default=0.005,
        help="reject an image whose mask covers less than this fraction of it",
    )
    group.add_argument(
        "--max-mask-area",
        type=float,
        default=0.95,
        help="reject an image whose mask covers more than this fraction of it",
    )


def segmenter_from_config(config, mask_source: str | None = None) -> Segmenter | None:
    """:meth:`Segmenter.from_flags` with the attributes :func:`add_mask_arguments` sets (and
    ``device``/``dtype``) read from ``config``; None when the mask source needs no model."""
    source = mask_source if mask_source is not None else config.mask_source
    if source not in MODES:
        return None
    return Segmenter.from_flags(
        source,
        sam=config.sam,
        detector=config.detector,
        sam_checkpoint=config.sam_checkpoint,
        sam_type=config.sam_type,
        device=config.device,
        dtype=config.dtype,
        post=PostProcess(
            fill_holes=config.fill_holes,
            dilate=config.dilate,
            min_area=config.min_mask_area,
            max_area=config.max_mask_area,
        ),
        batch_size=getattr(config, "segment_batch_size", 8),
        box_threshold=config.box_threshold,
        max_boxes=config.max_boxes,
    )
