"""What the diffusion generators share: loading, working resolution, masks, seeded batches, recipes.

The generators in :mod:`.inpaint` and :mod:`.edit` all work the same way:

1. every input image (any size) is resized to one square working resolution (a multiple of 8,
   default the pipeline's native size ``unet.config.sample_size * vae_scale_factor``), and the region
   to repaint is carried to that resolution *conservatively* (a working pixel is repainted when any
   original pixel under it is), so nothing of what is meant to change leaks through at the edges;
2. items go through the pipeline in groups of ``batch_size``, one call per group, each item with its
   own CPU ``torch.Generator`` seeded with its seed: the noise an item gets does not depend on the
   batch it falls in (see :func:`generators`);
3. the outputs are resized back to each item's own size and the pixels that must not change are
   copied back from the input, exactly.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__, trust
from ..imageops import mask_image as as_mask_image
from ..imageops import to_array, to_mask

__all__ = [
    "DiffusionGeneratorBase",
    "commit_from_path",
    "cover_mask",
    "generators",
    "load_pipeline",
    "native_resolution",
    "package",
    "prepare",
    "resize_image",
    "to_uint8",
]

_SNAPSHOT = re.compile(r"[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/]|$)")


def commit_from_path(path: str | None) -> str | None:
    """The Hub commit of a model loaded from the Hub cache (``.../snapshots/<commit>/...``), else None."""
    if not path:
        return None
    found = _SNAPSHOT.search(str(path))
    return found.group(1) if found else None


def native_resolution(pipe) -> int:
    """The size a Stable-Diffusion-shaped pipeline was trained at: UNet sample size x VAE factor."""
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))


def resize_image(arr: np.ndarray, size: int | tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """An RGB uint8 array resized to ``size`` (an int for a square, or ``(H, W)``); unchanged if equal."""
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), resample))


def cover_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``mask`` at ``size``, grown rather than shrunk: True wherever some True pixel of ``mask``
    contributes to the resized pixel (bilinear with PIL's antialiasing support, then ``> 0``)."""
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape == (h, w):
        return mask.copy()
    small = Image.fromarray(mask.astype(np.uint8) * 255, "L").resize((w, h), Image.BILINEAR)
    return np.asarray(small) > 0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output (``output_type="np"``: floats in [0, 1], (B, H, W, 3)) as uint8, rounded as
    diffusers rounds for PIL output."""
    images = np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0)
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def generators(seeds: Sequence[int]) -> list:
    """One CPU ``torch.Generator`` per item, seeded with its seed.

    diffusers draws each item's initial noise (and VAE posterior samples) from that item's own
    generator when given a list, so an item's noise is the same in any batch. CPU generators give the
    same noise on every device (the tensors are moved to the pipeline's device).
    """
    import torch

    return [torch.Generator("cpu").manual_seed(int(s) & 0xFFFF_FFFF_FFFF_FFFF) for s in seeds]


def load_pipeline(loader, model_id_or_path: str, what: str, device, dtype, revision, **load_kwargs):
    """``loader.from_pretrained`` (an AutoPipeline class or ``DiffusionPipeline``) on the process's device
    and dtype (``augment.runtime``: bfloat16 on a GPU unless ``dtype`` says otherwise, float32 on CPU).

    The safety checker is loaded when the model has one (nothing here turns it off). Returns
    ``(pipe, info)``, ``info`` being what the recipes and the dataset card record.
    """
    from ..runtime import check_model_ref, resolve_device, resolve_dtype

    model_id_or_path = check_model_ref(model_id_or_path, what)
    device = resolve_device(device)
    torch_dtype = dtype if not isinstance(dtype, str | None) else resolve_dtype(device, dtype)
    with warnings.catch_warnings():  # newer diffusers also take ``dtype``; ``torch_dtype`` works in all
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = loader.from_pretrained(
            model_id_or_path,
            revision=revision,
            torch_dtype=torch_dtype,
            **trust.model_kwargs(),
            **load_kwargs,
        )
    pipe.to(device)
    info = {
        "model": model_id_or_path,
        "revision": revision,
        "commit": commit_from_path(getattr(pipe.unet.config, "_name_or_path", None)),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "device": str(device),
    }
    return pipe, info


class DiffusionGeneratorBase:
    """Holds a pipeline and its settings, runs seeded batches, restores pixels, writes recipes.

    Subclasses set ``name`` and implement :meth:`_call` (one pipeline call on a batch of working-size
    images). ``calls`` counts pipeline calls.
    """

    name = "diffusion"

    def __init__(
        self,
        pipe,
        steps: int,
        guidance: float,
        batch_size: int,
        resolution: int | None,
        info: dict[str, Any] | None,
        progress: bool = False,
    ):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipe = pipe
        self.steps, self.guidance, self.batch_size = int(steps), float(guidance), int(batch_size)
        self.resolution = int(resolution) if resolution else native_resolution(pipe)
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        self.progress = progress
        self.calls = 0
        info = dict(info or {})
        info.setdefault("model", getattr(pipe, "name_or_path", None))
        info.setdefault("revision", None)
        info.setdefault("commit", commit_from_path(getattr(pipe.unet.config, "_name_or_path", None)))
        info.setdefault("dtype", str(pipe.unet.dtype).replace("torch.", ""))
        info.setdefault("device", str(pipe.device))
        self.info = info
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    # -- provenance ---------------------------------------------------------------------------

    @property
    def has_safety_checker(self) -> bool:
        return getattr(self.pipe, "safety_checker", None) is not None

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.name,
            "model": self.info.get("model"),
            "revision": self.info.get("revision"),
            "commit": self.info.get("commit"),
            "dtype": self.info.get("dtype"),
            "device": self.info.get("device"),
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(getattr(self.pipe, "scheduler", None)).__name__,
            "safety_checker": self.has_safety_checker,
            "steps": self.steps,
            "guidance": self.guidance,
            "batch_size": self.batch_size,
            "resolution": self.resolution,
            "seeding": "one CPU torch.Generator per item, seeded with the item's seed",
            "package_version": __version__,
        }

    def _recipe(self, operation: str, prompt: str | None, seed: int, nsfw, **extra) -> dict[str, Any]:
        return {
            "generator": self.name,
            "operation": operation,
            "model": self.info.get("model"),
            "revision": self.info.get("revision") or self.info.get("commit"),
            "prompt": prompt,
            **extra,
            "seed": int(seed),
            "steps": self.steps,
            "guidance": self.guidance,
            "resolution": self.resolution,
            "nsfw": nsfw,
            "package_version": __version__,
        }

    # -- running --------------------------------------------------------------------------------

    def _call(self, images: list[Image.Image], masks: list[Image.Image] | None, prompts, gens, **kw):
        """One pipeline call; returns ``(uint8 array (B, r, r, 3), nsfw flags or None per item)``."""
        raise NotImplementedError

    @staticmethod
    def _check_lengths(n: int, **lists) -> None:
        for key, values in lists.items():
            if values is not None and len(values) != n:
                raise ValueError(f"{key} has {len(values)} entries for {n} images")

    @staticmethod
    def _nsfw(out, n: int) -> list:
        flags = getattr(out, "nsfw_content_detected", None)
        return [bool(f) for f in flags] if flags is not None else [None] * n

    def _run(
        self,
        arrays: list[np.ndarray],
        repaint: list[np.ndarray] | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        finish: Callable[[int, int, np.ndarray, Any], tuple[Any, Any, dict]],
        progress: bool | None,
        variants: Sequence[dict[str, Any]] = ({},),
    ) -> list[tuple[Any, Any, dict]]:
        """Generate every item in groups of ``batch_size`` and hand each output, resized back to its
        item's own size, to ``finish(item, variant, generated, nsfw)``.

        One pipeline call per group and per variant (``variants``: extra keyword arguments for
        :meth:`_call`, e.g. one per img2img strength); results come item-major (all variants of item
        0, then item 1, ...). ``repaint[i]``: the region the pipeline repaints, at the item's own size,
        carried to the working size with :func:`cover_mask` (None for pipelines without a mask). The
        progress bar counts items.
        """
        from tqdm.auto import tqdm

        r = self.resolution
        results = []
        show = self.progress if progress is None else progress
        with tqdm(total=len(arrays), desc=self.name, unit="img", disable=not show) as bar:
            for s in range(0, len(arrays), self.batch_size):
                idx = range(s, min(s + self.batch_size, len(arrays)))
                work = [Image.fromarray(resize_image(arrays[i], r)) for i in idx]
                masks = None if repaint is None else [as_mask_image(cover_mask(repaint[i], r)) for i in idx]
                texts = [prompts[i] for i in idx]
                per_variant = []
                for kw in variants:
                    per_variant.append(
                        self._call(work, masks, texts, generators([seeds[i] for i in idx]), **kw)
                    )
                    self.calls += 1
                for k, i in enumerate(idx):
                    h, w = arrays[i].shape[:2]
                    for v, (out, nsfw) in enumerate(per_variant):
                        results.append(finish(i, v, resize_image(out[k], (h, w)), nsfw[k]))
                bar.update(len(idx))
        return results


def prepare(images: Sequence, masks: Sequence | None) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """RGB uint8 arrays and boolean masks at each image's size (None stays None)."""
    arrays = [to_array(im) for im in images]
    if masks is None:
        return arrays, [None] * len(arrays)
    out = []
    for a, m in zip(arrays, masks):
        if m is None:
            out.append(None)
            continue
        m = to_mask(m)
        if m.shape != a.shape[:2]:
            raise ValueError(f"mask of shape {m.shape} for an image of size {a.shape[:2]}")
        out.append(m)
    return arrays, out


def package(results, output_type: str):
    """``(images, masks, recipes)`` lists from ``(image array, mask array or None, recipe)`` triples."""
    from .output import CounterfactualOutput

    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    images, masks, recipes = [], [], []
    for img, msk, recipe in results:
        if output_type == "pil":
            images.append(Image.fromarray(img))
            masks.append(None if msk is None else as_mask_image(msk))
        else:
            images.append(img)
            masks.append(msk)
        recipes.append(recipe)
    return CounterfactualOutput(images=images, masks=masks, recipes=recipes)
