"""Whole-image edits that keep the object: instruction edits (ASPIRE, ALIA) and img2img (DA-Fusion).

* :class:`InstructEditGenerator`: an instruction-following editor (``timbrooks/instruct-pix2pix``)
  told ``"turn the background of {background} into {alt}"`` (template
  :data:`prompts.EDIT_BACKGROUND`), ASPIRE's background edit;
* :class:`Img2ImgGenerator`: any img2img pipeline run at several strengths (DA-Fusion uses 0.25, 0.5,
  0.75 and 1.0) from a prompt such as ``"a photo of a {class}"``; one output per item and strength.

Both repaint the whole image, then copy the object's pixels (mask True) back from the input, exactly,
at the input's own size, so the positives keep the object while the rest changes. Images of any
size are resized to the working resolution and back (see :mod:`.diffusion_common`); items are
batched with one seeded generator each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from prompts import EDIT_BACKGROUND, render

from .diffusion_common import DiffusionGeneratorBase, load_pipeline, package, prepare, to_uint8
from .inpaint import DEFAULT_NEGATIVE_PROMPT
from .output import CounterfactualOutput

__all__ = ["DA_FUSION_STRENGTHS", "InstructEditGenerator", "Img2ImgGenerator"]

DA_FUSION_STRENGTHS = (0.25, 0.5, 0.75, 1.0)


def _restore(generated: np.ndarray, original: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return generated if mask is None else np.where(mask[..., None], original, generated)


class InstructEditGenerator(DiffusionGeneratorBase):
    """Background swaps with an InstructPix2Pix pipeline; object pixels restored exactly.

    Args:
        pipe: ``StableDiffusionInstructPix2PixPipeline`` (or the SDXL one); its progress bar is turned off.
        steps, guidance, image_guidance: ``num_inference_steps``, ``guidance_scale`` (text) and
            ``image_guidance_scale`` (faithfulness to the input image) of every call.
        batch_size, resolution, info, progress: as for :class:`~.inpaint.InpaintGenerator`.
        template: the instruction template (a name under ``prompts/`` with fields ``{background}`` and
            ``{alt}``); recorded in every recipe.
    """

    name = "instruct-pix2pix"

    def __init__(
        self,
        pipe,
        steps: int = 20,
        guidance: float = 7.5,
        image_guidance: float = 1.5,
        batch_size: int = 4,
        resolution: int | None = None,
        info: dict[str, Any] | None = None,
        progress: bool = False,
        template: str = EDIT_BACKGROUND,
    ):
        super().__init__(pipe, steps, guidance, batch_size, resolution, info, progress)
        self.image_guidance = float(image_guidance)
        self.template = template
        render(template, background="", alt="")  # fail now on a missing or malformed template

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> InstructEditGenerator:
        """Load an InstructPix2Pix model (Hub id or folder) with ``DiffusionPipeline``, which picks the
        class named in its ``model_index.json``; ``kwargs`` go to the constructor."""
        from diffusers import DiffusionPipeline

        pipe, info = load_pipeline(
            DiffusionPipeline, model_id_or_path, "--edit-model", device, dtype, revision
        )
        if "InstructPix2Pix" not in type(pipe).__name__:
            raise ValueError(f"{model_id_or_path}: {type(pipe).__name__} is not an InstructPix2Pix pipeline")
        return cls(pipe, info=info, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_guidance": self.image_guidance, "template": self.template}

    def instruction(self, background: str, alt: str) -> str:
        return render(self.template, background=background, alt=alt)

    def swap_background(
        self,
        images: Sequence,
        masks: Sequence,
        backgrounds: Sequence[str],
        alts: Sequence[str],
        seeds: Sequence[int],
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Edit each image with ``"turn the background of {backgrounds[i]} into {alts[i]}"`` and copy
        the object (``masks[i]`` True) back exactly. Output masks are the input masks (None stays None:
        nothing restored, recorded as ``object_restored: False``)."""
        n = len(images)
        self._check_lengths(n, masks=masks, backgrounds=backgrounds, alts=alts, seeds=seeds)
        arrays, obj_masks = prepare(images, masks)
        instructions = [self.instruction(bg, alt) for bg, alt in zip(backgrounds, alts)]

        def finish(i: int, _v: int, generated: np.ndarray, nsfw) -> tuple:
            recipe = self._recipe(
                "swap_background",
                instructions[i],
                seeds[i],
                nsfw,
                instruction=instructions[i],
                template=self.template,
                background=backgrounds[i],
                alt=alts[i],
                image_guidance=self.image_guidance,
                object_restored=obj_masks[i] is not None,
            )
            return _restore(generated, arrays[i], obj_masks[i]), obj_masks[i], recipe

        results = self._run(arrays, None, instructions, seeds, finish, progress)
        return package(results, output_type)

    def _call(self, images, masks, prompts, gens):
        out = self.pipe(
            prompt=list(prompts),
            image=images,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            image_guidance_scale=self.image_guidance,
            generator=gens,
            output_type="np",
        )
        return to_uint8(out.images), self._nsfw(out, len(images))


class Img2ImgGenerator(DiffusionGeneratorBase):
    """DA-Fusion-style variations: img2img at several strengths, object pixels restored exactly.

    Args:
        pipe: any diffusers img2img pipeline (``AutoPipelineForImage2Image``); progress bar turned off.
        steps, guidance, negative_prompt: as for :class:`~.inpaint.InpaintGenerator`; a strength ``s``
            runs ``int(steps * s)`` denoising steps (diffusers' img2img convention).
        strengths: the default strengths of :meth:`positive`, each in (0, 1].
        batch_size, resolution, info, progress: as for :class:`~.inpaint.InpaintGenerator`.
    """

    name = "img2img"

    def __init__(
        self,
        pipe,
        steps: int = 30,
        guidance: float = 7.5,
        strengths: Sequence[float] = DA_FUSION_STRENGTHS,
        negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
        batch_size: int = 4,
        resolution: int | None = None,
        info: dict[str, Any] | None = None,
        progress: bool = False,
    ):
        super().__init__(pipe, steps, guidance, batch_size, resolution, info, progress)
        self.strengths = self._check_strengths(strengths)
        self.negative_prompt = negative_prompt or None

    def _check_strengths(self, strengths: Sequence[float]) -> tuple[float, ...]:
        strengths = tuple(float(s) for s in strengths)
        if not strengths:
            raise ValueError("strengths is empty")
        for s in strengths:
            if not 0.0 < s <= 1.0:
                raise ValueError(f"every strength must be in (0, 1], got {s}")
            if int(self.steps * s) < 1:
                raise ValueError(f"strength {s} with {self.steps} steps leaves no denoising step")
        return strengths

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Img2ImgGenerator:
        """Load a Hub id or a folder with ``AutoPipelineForImage2Image``; ``kwargs`` go to the constructor."""
        from diffusers import AutoPipelineForImage2Image

        pipe, info = load_pipeline(
            AutoPipelineForImage2Image, model_id_or_path, "--img2img-model", device, dtype, revision
        )
        return cls(pipe, info=info, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "strengths": list(self.strengths),
            "negative_prompt": self.negative_prompt,
        }

    def positive(
        self,
        images: Sequence,
        masks: Sequence | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        strengths: Sequence[float] | None = None,
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """One output per (item, strength), item-major: item 0 at every strength, then item 1, ...

        Every strength of an item uses the item's seed. The object (``masks[i]`` True) is copied back
        exactly; output masks are the input masks (``masks`` None, or a None entry: nothing restored,
        mask None). Each recipe has its ``strength``.
        """
        strengths = self.strengths if strengths is None else self._check_strengths(strengths)
        n = len(images)
        self._check_lengths(n, masks=masks, prompts=prompts, seeds=seeds)
        arrays, obj_masks = prepare(images, masks)

        def finish(i: int, v: int, generated: np.ndarray, nsfw) -> tuple:
            recipe = self._recipe(
                "positive",
                prompts[i],
                seeds[i],
                nsfw,
                negative_prompt=self.negative_prompt,
                strength=strengths[v],
                object_restored=obj_masks[i] is not None,
            )
            return _restore(generated, arrays[i], obj_masks[i]), obj_masks[i], recipe

        variants = [{"strength": s} for s in strengths]
        results = self._run(arrays, None, prompts, seeds, finish, progress, variants=variants)
        return package(results, output_type)

    def _call(self, images, masks, prompts, gens, strength: float):
        n = len(images)
        out = self.pipe(
            prompt=list(prompts),
            image=images,
            strength=strength,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            negative_prompt=[self.negative_prompt] * n if self.negative_prompt else None,
            generator=gens,
            output_type="np",
        )
        return to_uint8(out.images), self._nsfw(out, n)
