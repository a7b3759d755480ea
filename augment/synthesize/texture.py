"""Texture counterfactuals: keep the object's shape, change what fills it.

CLAD's recipe applied to a texture shortcut (``--positives texture``):

* positive: the anchor's object mask, exactly, filled with another texture; every pixel outside the
  mask is the anchor's. The texture comes from the dataset (a square patch cut from inside the object
  of an image of another class, mirror-tiled over the image: ``texture_source="dataset"``), from the
  built-in benchmark's procedural texture families (``"procedural"``), or from a diffusion model
  (:class:`TextureEditGenerator`: an img2img or instruction edit of the whole image, kept only inside
  the mask);
* negative / replace: another class's object (its image and mask) filled with the anchor's own
  texture, i.e. the texture shortcut of the anchor on a shape of another class;
* negative / remove: no object, the anchor's texture tiled over the whole image (label -1).

Each output is a function of its inputs and its seed (the mirror-tiling offset and the procedural
texture are drawn from ``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..imageops import mask_image as as_mask_image
from ..imageops import to_array, to_mask
from .diffusion_common import package, prepare
from .output import CounterfactualOutput

__all__ = [
    "TEXTURE_SOURCES",
    "TextureEditGenerator",
    "TextureGenerator",
    "choose_family",
    "texture_patch",
    "tile_texture",
]

TEXTURE_SOURCES = ("dataset", "procedural", "edit")


def texture_patch(image: np.ndarray, mask: np.ndarray, margin: int = 1) -> np.ndarray | None:
    """The largest axis-aligned square of ``image`` lying inside ``mask`` at least ``margin`` pixels from
    its edge (so that no edge pixel is taken), or None when the mask has no such pixel."""
    from scipy.ndimage import distance_transform_cdt

    # chessboard distance to the nearest pixel outside the mask (the image border counts as outside)
    dist = distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
    half = int(dist.max()) - 1 - margin  # a square of side 2 * half + 1 around the best pixel fits
    if half < 0:
        return None
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return image[y - half : y + half + 1, x - half : x + half + 1].copy()


def tile_texture(patch: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (H, W, 3) field covered by mirror copies of ``patch`` (no seams), at a random offset."""
    block = np.concatenate([patch, patch[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    bh, bw = block.shape[:2]
    h, w = shape
    reps = (-(-(h + bh) // bh), -(-(w + bw) // bw), 1)
    tiled = np.tile(block, reps)
    dy, dx = int(rng.integers(bh)), int(rng.integers(bw))
    return tiled[dy : dy + h, dx : dx + w]


def choose_family(num_families: int, exclude: Sequence[int], seed: int) -> int:
    """A texture family in ``range(num_families)`` other than those in ``exclude``, drawn with ``seed``."""
    allowed = [f for f in range(num_families) if f not in set(exclude)]
    if not allowed:
        raise ValueError(
            f"no texture family left among {num_families} once {sorted(set(exclude))} are excluded"
        )
    return allowed[int(np.random.default_rng(seed).integers(len(allowed)))]


class TextureGenerator:
    """Texture positives and negatives without a model (see the module docstring).

    Args:
        texture_source: ``dataset`` (texture cut from another image's object) or ``procedural``
            (the built-in benchmark's texture families, :func:`augment.sources.synthetic.render_texture`).
        num_families: procedural families to draw from (family k is the texture of class k in the
            texture benchmark).
        margin: pixels kept between a cut patch and the edge of the object it is cut from.
        min_patch: smallest side in pixels of a usable patch; a smaller object is refused.
        noise: standard deviation of the Gaussian noise added to a procedural texture (the texture
            benchmark adds 6 to its images).
    """

    name = "texture"

    def __init__(
        self,
        texture_source: str = "dataset",
        num_families: int = 9,
        margin: int = 1,
        min_patch: int = 3,
        noise: float = 6.0,
    ):
        from ..sources.synthetic import BACKGROUND_NAMES

        if texture_source not in ("dataset", "procedural"):
            raise ValueError(f"texture_source must be dataset or procedural, got {texture_source!r}")
        if not 2 <= num_families <= len(BACKGROUND_NAMES):
            raise ValueError(
                f"num_families must be between 2 and {len(BACKGROUND_NAMES)}, got {num_families}"
            )
        if margin < 0 or min_patch < 1 or noise < 0:
            raise ValueError(
                f"need margin >= 0, min_patch >= 1, noise >= 0; got {margin}, {min_patch}, {noise}"
            )
        self.texture_source = texture_source
        self.num_families = num_families
        self.margin, self.min_patch, self.noise = margin, min_patch, float(noise)

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.name,
            "texture_source": self.texture_source,
            "num_families": self.num_families,
            "margin": self.margin,
            "min_patch": self.min_patch,
            "noise": self.noise,
            "package_version": __version__,
        }

    def patch(self, image, mask) -> np.ndarray | None:
        """The texture patch of an image's object, or None when it is smaller than ``min_patch``."""
        arr = to_array(image)
        p = texture_patch(arr, to_mask(mask, arr.shape[:2]), self.margin)
        return p if p is not None and min(p.shape[:2]) >= self.min_patch else None

    def _field(
        self, shape, seed: int, patch: np.ndarray | None, family: int | None
    ) -> tuple[np.ndarray, dict]:
        rng = np.random.default_rng(seed)
        if patch is not None:
            return tile_texture(patch, shape, rng), {"texture": "patch", "patch_size": int(patch.shape[0])}
        from ..sources.synthetic import render_texture

        field = render_texture(int(family), tuple(shape), rng) + rng.normal(0, self.noise, (*shape, 3))
        return np.clip(np.rint(field), 0, 255).astype(np.uint8), {
            "texture": "procedural",
            "family": int(family),
        }

    def __call__(
        self,
        image: list,
        mask_image: list,
        seeds: Sequence[int],
        patches: list[np.ndarray | None] | None = None,
        families: list[int | None] | None = None,
        operation: str = "replace_texture",
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Fill the mask of ``image[i]`` with a texture: ``patches[i]`` mirror-tiled, else procedural
        family ``families[i]``. Pixels outside the mask are the input's; output masks are the inputs'.

        ``mask_image[i]`` None: the whole image becomes the texture and the output mask is empty (no
        object; the ``remove`` negative).
        """
        n = len(image)
        patches = list(patches) if patches is not None else [None] * n
        families = list(families) if families is not None else [None] * n
        if not len(mask_image) == len(seeds) == len(patches) == len(families) == n:
            raise ValueError("image, mask_image, seeds, patches and families must have one entry per image")
        images, masks, recipes = [], [], []
        for i in range(n):
            if patches[i] is None and families[i] is None:
                raise ValueError(f"item {i}: give a texture patch or a procedural family")
            arr = to_array(image[i])
            field, info = self._field(arr.shape[:2], seeds[i], patches[i], families[i])
            if mask_image[i] is None:
                out, out_mask = field, np.zeros(arr.shape[:2], dtype=bool)
                op = "texture_only"
            else:
                out_mask = to_mask(mask_image[i], arr.shape[:2])
                out, op = np.where(out_mask[..., None], field, arr), operation
            recipe = {"generator": self.name, "operation": op, **info, "seed": int(seeds[i])}
            recipe["package_version"] = __version__
            images.append(Image.fromarray(out) if output_type == "pil" else out)
            masks.append(as_mask_image(out_mask) if output_type == "pil" else out_mask)
            recipes.append(recipe)
        return CounterfactualOutput(images=images, masks=masks, recipes=recipes)


class TextureEditGenerator:
    """Texture positives from a diffusion editor, restricted to the object's mask.

    ``editor``: an :class:`~.edit.InstructEditGenerator` (told ``prompts[i]``, e.g. "give the circle a
    striped texture") or an :class:`~.edit.Img2ImgGenerator` (prompted with a caption such as "a photo
    of a striped circle", one output per strength). The whole image is edited, then only the pixels
    inside the mask are kept from the edit: every pixel outside it is the input's, exactly, and the
    output mask is the input mask.
    """

    name = "texture"
    texture_source = "edit"

    def __init__(self, editor, num_families: int = 9):
        self.num_families = num_families
        if editor.name not in ("instruct-pix2pix", "img2img"):
            raise ValueError(f"a texture editor must be instruct-pix2pix or img2img, got {editor.name!r}")
        self.editor = editor

    def describe(self) -> dict[str, Any]:
        return {
            **self.editor.describe(),
            "generator": self.name,
            "editor": self.editor.name,
            "texture_source": "edit",
        }

    def texture(
        self,
        images: Sequence,
        masks: Sequence,
        prompts: Sequence[str],
        seeds: Sequence[int],
        progress: bool | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Edit each image from ``prompts[i]`` and keep the edit inside ``masks[i]`` only; item-major
        outputs (one per img2img strength), each recipe with its prompt, seed and settings."""
        ed = self.editor
        n = len(images)
        ed._check_lengths(n, masks=masks, prompts=prompts, seeds=seeds)
        arrays, obj_masks = prepare(images, masks)
        if any(m is None for m in obj_masks):
            raise ValueError("texture edits need an object mask for every image")
        variants = [{"strength": s} for s in ed.strengths] if ed.name == "img2img" else [{}]

        def finish(i: int, v: int, generated: np.ndarray, nsfw) -> tuple:
            extra = {"editor": ed.name, "texture_source": "edit", "restricted_to_mask": True, **variants[v]}
            if ed.name == "instruct-pix2pix":
                extra["image_guidance"] = ed.image_guidance
            else:
                extra["negative_prompt"] = ed.negative_prompt
            recipe = ed._recipe("replace_texture", prompts[i], seeds[i], nsfw, **extra)
            recipe["generator"] = self.name
            return np.where(obj_masks[i][..., None], generated, arrays[i]), obj_masks[i], recipe

        return package(
            ed._run(arrays, None, prompts, seeds, finish, progress, variants=variants), output_type
        )
