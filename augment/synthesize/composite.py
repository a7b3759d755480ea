"""Cut-and-paste counterfactuals: the offline default generator.

One operation serves all three kinds of row CLAD needs. An object (an image and its mask) is pasted,
pixel for pixel, onto a background from which that background image's own object has been removed
by tiling (the Background Challenge's ``only_bg_t``):

* positive: the anchor's object on the background of an image of another class;
* negative, object removed: no object, on the anchor's own background;
* negative, object replaced: another class's object, moved to the anchor's object box, on the
  anchor's own background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .. import __version__
from ..imageops import center_on, mask_bbox, paste, resize_pair, tile_fill, to_array, to_mask
from ..imageops import mask_image as as_mask_image
from .output import CounterfactualOutput

ImageLike = Image.Image | np.ndarray


class CompositeGenerator:
    """Paste objects onto tile-filled backgrounds (see the module docstring).

    Args:
        fill_pad: pixels added around the background object's box before it is filled, so that its
            outline leaves no trace.
    """

    name = "composite"

    def __init__(self, fill_pad: int = 1):
        if fill_pad < 0:
            raise ValueError(f"fill_pad must be >= 0, got {fill_pad}")
        self.fill_pad = fill_pad

    def check_inputs(self, image, mask_image, background_image, background_mask, placement) -> None:
        n = len(background_image)
        if len(background_mask) != n:
            raise ValueError(f"background_mask has {len(background_mask)} entries for {n} background images")
        if image is not None and (len(image) != n or mask_image is None or len(mask_image) != n):
            raise ValueError("image and mask_image must be None or lists as long as background_image")
        if placement not in ("keep", "center"):
            raise ValueError(f"placement must be 'keep' or 'center', got {placement!r}")
        if image is not None:
            for i, m in enumerate(mask_image):
                if m is None:
                    raise ValueError(f"mask_image[{i}] is None: an object needs its mask to be pasted")

    def __call__(
        self,
        background_image: list[ImageLike],
        background_mask: list[ImageLike | None],
        image: list[ImageLike] | None = None,
        mask_image: list[ImageLike] | None = None,
        placement: str = "keep",
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """Paste ``image[i]``'s object (``mask_image[i]``) onto the filled ``background_image[i]``.

        With ``image=None`` the output is the filled background alone (object removed).
        ``placement="keep"`` leaves a pasted object where it was in its own image; ``"center"`` moves it
        onto the centre of the background's object box (used for replacements). Objects are resized to the background's size when the two differ. Returns images, the object masks of
        the outputs (empty for removals) and one recipe per output.
        """
        self.check_inputs(image, mask_image, background_image, background_mask, placement)
        images, masks, recipes = [], [], []
        for i, (bg_img, bg_msk) in enumerate(zip(background_image, background_mask)):
            bg = to_array(bg_img)
            bg_mask = to_mask(bg_msk, bg.shape[:2])
            filled = tile_fill(bg, bg_mask, pad=self.fill_pad)
            recipe: dict[str, Any] = {"generator": self.name, "fill": "tile", "fill_pad": self.fill_pad}
            if image is None:
                out, out_mask = filled, np.zeros(bg.shape[:2], dtype=bool)
                recipe["operation"] = "remove_object"
            else:
                obj, obj_mask = resize_pair(to_array(image[i]), to_mask(mask_image[i]), bg.shape[:2])
                target = mask_bbox(bg_mask)
                if placement == "center" and target is not None:
                    obj, obj_mask = center_on(obj, obj_mask, target)
                out, out_mask = paste(obj, obj_mask, filled), obj_mask
                recipe["operation"] = "paste_object"
                recipe["placement"] = placement
            recipe["package_version"] = __version__
            images.append(Image.fromarray(out) if output_type == "pil" else out)
            masks.append(as_mask_image(out_mask) if output_type == "pil" else out_mask)
            recipes.append(recipe)
        return CounterfactualOutput(images=images, masks=masks, recipes=recipes)
