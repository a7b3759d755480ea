"""Inpainting counterfactuals: a diffusers inpainting pipeline repaints part of each image.

The three kinds of row CLAD needs, from one inpainting model (``stabilityai/stable-diffusion-2-inpainting``,
an SDXL inpainting model, or a local folder; anything ``AutoPipelineForInpainting`` loads):

* :meth:`InpaintGenerator.positive`: the object (mask True) is kept pixel for pixel and everything
  else is repainted from a prompt such as ``"a photo of {alt}"`` (a new background);
* :meth:`InpaintGenerator.remove`: the object's mask, dilated by ``dilate`` pixels, is repainted from
  the background phrase, so that no object is left (ASPIRE's object removal); every pixel outside the
  dilated mask is the input's;
* :meth:`InpaintGenerator.replace`: the object's box (dilated) is repainted from ``"a photo of a
  {other class}"``; outside the box the input is kept. Where the new object lies is not known, so the
  output mask is None.

Images of any size are resized to the working resolution for the pipeline and back afterwards (see
:mod:`.diffusion_common`); the kept pixels are copied from the input at its own size, so they are
exact whatever the model does. Items are generated in batches with one seeded generator each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..imageops import box_mask, mask_bbox
from ..segment import dilate as dilate_mask
from .diffusion_common import DiffusionGeneratorBase, load_pipeline, package, prepare, to_uint8
from .output import CounterfactualOutput

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "InpaintGenerator"]

DEFAULT_NEGATIVE_PROMPT = "blurry, distorted, deformed, low quality, text, watermark"

OPERATIONS = ("positive", "remove", "replace")


class InpaintGenerator(DiffusionGeneratorBase):
    """Positives, object removals and object replacements with an inpainting pipeline.

    Args:
        pipe: a diffusers inpainting pipeline (``StableDiffusionInpaintPipeline``,
            ``StableDiffusionXLInpaintPipeline``, ...); its own progress bar is turned off.
        steps, guidance, strength, negative_prompt: passed to every pipeline call
            (``num_inference_steps``, ``guidance_scale``, ``strength``, ``negative_prompt``; an empty
            negative prompt or None means none).
        batch_size: items per pipeline call.
        resolution: the square working size (a multiple of 8); default the pipeline's native size.
        dilate: pixels the object mask is grown by (a disk) before removal, and the object box is grown
            by before replacement.
        info: what to record about the model (``model``, ``revision``, ``commit``, ``dtype``, ``device``);
            :meth:`from_pretrained` fills it in.
        progress: show one progress bar over the items (each method's ``progress`` overrides it).
    """

    name = "inpaint"

    def __init__(
        self,
        pipe,
        steps: int = 30,
        guidance: float = 7.5,
        strength: float = 1.0,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        batch_size: int = 4,
        resolution: int | None = None,
        dilate: int = 4,
        info: dict[str, Any] | None = None,
        progress: bool = False,
    ):
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if int(steps * strength) < 1:
            raise ValueError(
                f"steps x strength must leave at least one denoising step ({steps} x {strength})"
            )
        if dilate < 0:
            raise ValueError(f"dilate must be >= 0 pixels, got {dilate}")
        super().__init__(pipe, steps, guidance, batch_size, resolution, info, progress)
        self.strength = float(strength)
        self.negative_prompt = negative_prompt or None
        self.dilate = int(dilate)

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> InpaintGenerator:
        """Load a Hub id or a folder with ``AutoPipelineForInpainting`` on the process's device (bfloat16
        on a GPU unless ``dtype`` says otherwise, float32 on CPU); ``kwargs`` go to the constructor."""
        from diffusers import AutoPipelineForInpainting

        pipe, info = load_pipeline(
            AutoPipelineForInpainting, model_id_or_path, "--inpaint-model", device, dtype, revision
        )
        return cls(pipe, info=info, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "strength": self.strength,
            "negative_prompt": self.negative_prompt,
            "dilate": self.dilate,
        }

    # -- the three operations -----------------------------------------------------------------

    def positive(
        self,
        images: Sequence,
        masks: Sequence,
        prompts: Sequence[str],
        seeds: Sequence[int],
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Keep each object (mask True) exactly and repaint everything else from ``prompts[i]``.

        Output masks are the input object masks.
        """
        return self._operation("positive", images, masks, prompts, seeds, progress, output_type)

    def remove(
        self,
        images: Sequence,
        masks: Sequence,
        prompts: Sequence[str],
        seeds: Sequence[int],
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Repaint each object's mask, dilated by ``dilate`` pixels, from ``prompts[i]`` (the
        background phrase); every pixel outside the dilated mask is the input's. Output masks are empty.
        """
        return self._operation("remove", images, masks, prompts, seeds, progress, output_type)

    def replace(
        self,
        images: Sequence,
        masks: Sequence,
        prompts: Sequence[str],
        seeds: Sequence[int],
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Repaint each object's box (grown by ``dilate`` pixels) from ``prompts[i]``, e.g. ``"a photo
        of a {other class}"``; pixels outside the box are the input's. Output masks are None (where the
        new object is, is not known)."""
        return self._operation("replace", images, masks, prompts, seeds, progress, output_type)

    # -- internals ------------------------------------------------------------------------------

    def regions(self, operation: str, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(repaint, output mask)`` at the image's size for one object mask."""
        if operation == "positive":
            return ~mask, mask
        if operation == "remove":
            return dilate_mask(mask, self.dilate), np.zeros_like(mask)
        if operation == "replace":
            return box_mask(mask.shape, mask_bbox(mask, self.dilate)), None
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")

    def _operation(self, operation, images, masks, prompts, seeds, progress, output_type):
        n = len(images)
        self._check_lengths(n, masks=masks, prompts=prompts, seeds=seeds)
        if masks is None or any(m is None for m in masks):
            raise ValueError(f"{operation} needs an object mask for every image")
        arrays, obj_masks = prepare(images, masks)
        plans = [self.regions(operation, m) for m in obj_masks]
        repaint = [p[0] for p in plans]

        def finish(i: int, _v: int, generated: np.ndarray, nsfw) -> tuple:
            out = np.where(repaint[i][..., None], generated, arrays[i])  # kept pixels copied exactly
            extra: dict[str, Any] = {}
            if operation != "positive":
                extra["dilate"] = self.dilate
            if operation == "replace":
                extra["mask"] = "unknown: the new object's extent is not known"
            if not repaint[i].any():
                extra["note"] = "empty object mask: nothing repainted"
            recipe = self._recipe(
                operation,
                prompts[i],
                seeds[i],
                nsfw,
                negative_prompt=self.negative_prompt,
                strength=self.strength,
                **extra,
            )
            return out, plans[i][1], recipe

        results = self._run(arrays, repaint, prompts, seeds, finish, progress)
        return package(results, output_type)

    def _call(self, images, masks, prompts, gens):
        n = len(images)
        out = self.pipe(
            prompt=list(prompts),
            image=images,
            mask_image=masks,
            height=self.resolution,
            width=self.resolution,
            strength=self.strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            negative_prompt=[self.negative_prompt] * n if self.negative_prompt else None,
            generator=gens,
            output_type="np",
        )
        return to_uint8(out.images), self._nsfw(out, n)
