"""Captions: from an image-to-text model, from the dataset, or ``"a photo of a {label}"``.

:class:`Captioner` wraps any transformers image-to-text model that ``AutoModelForImageTextToText``
loads (BLIP ``Salesforce/blip-image-captioning-large``, GIT ``microsoft/git-large-coco``, a local
folder, ...). Decoding is deterministic (greedy, or beam search with ``num_beams > 1``), batched, on
the process's Accelerate device. :func:`choose_captions` applies the precedence the generation job
uses and says for every image where its caption came from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

from prompts import CAPTION_LABEL, render

from . import trust

__all__ = ["Captioner", "choose_captions", "clean_caption"]

_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """One line, single spaces, no surrounding blanks or trailing full stop."""
    return _SPACE.sub(" ", text).strip().rstrip(".").strip()


class Captioner:
    """Batched, deterministic captioning with a transformers image-to-text model."""

    def __init__(
        self,
        model,
        processor,
        batch_size: int = 16,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        info: dict[str, Any] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.processor = model, processor
        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
        self.info = dict(info or {})
        self.calls = 0  # model.generate calls (one per batch)

    def __call__(self, images: Sequence[Image.Image], progress: bool = False) -> list[str]:
        import torch
        from tqdm.auto import tqdm

        captions: list[str] = []
        device, dtype = self.model.device, self.model.dtype
        with tqdm(total=len(images), desc="caption", unit="img", disable=not progress) as bar:
            for s in range(0, len(images), self.batch_size):
                chunk = [im.convert("RGB") for im in images[s : s + self.batch_size]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                with torch.inference_mode():
                    out = self.model.generate(
                        pixel_values=pixels.to(device=device, dtype=dtype),
                        do_sample=False,
                        num_beams=self.num_beams,
                        max_new_tokens=self.max_new_tokens,
                    )
                self.calls += 1
                captions.extend(
                    clean_caption(t) for t in self.processor.batch_decode(out, skip_special_tokens=True)
                )
                bar.update(len(chunk))
        return captions

    def describe(self) -> dict[str, Any]:
        return {
            "captioner": self.info.get("model"),
            **self.info,
            "decoding": "greedy" if self.num_beams == 1 else f"beam search ({self.num_beams} beams)",
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Captioner:
        """Load a hub id or a folder with ``AutoProcessor`` and ``AutoModelForImageTextToText``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .runtime import check_model_ref, model_info, resolve_device, resolve_dtype

        model_id_or_path = check_model_ref(model_id_or_path, "--captioner")

        device = resolve_device(device)
        torch_dtype = resolve_dtype(device, dtype)
        processor = AutoProcessor.from_pretrained(model_id_or_path, revision=revision, **trust.code_kwargs())
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                model_id_or_path, revision=revision, dtype=torch_dtype, **trust.model_kwargs()
            )
        except ValueError as e:  # a model type the image-to-text auto class does not know
            raise ValueError(f"{model_id_or_path}: not an image-to-text model ({e})") from e
        model.to(device).eval()
        info = {**model_info(model_id_or_path, model, revision, torch_dtype), "device": device}
        return cls(model, processor, info=info, **kwargs)


def choose_captions(
    dataset_captions: Sequence[str],
    labels: Sequence[str],
    model_captions: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Each image's caption and where it came from.

    A model's caption wins when there is one and it is not empty (``"model"``); otherwise the
    dataset's own caption (``"dataset"``), otherwise ``"a photo of a {label}"`` (``"label"``). An
    empty model caption falls back the same way and is marked ``"model-empty"`` so that it is visible
    in the rows' recipe.
    """
    n = len(labels)
    if len(dataset_captions) != n or (model_captions is not None and len(model_captions) != n):
        raise ValueError("captions and labels differ in length")
    captions, origins = [], []
    for i in range(n):
        made = clean_caption(model_captions[i]) if model_captions is not None else ""
        if made:
            captions.append(made)
            origins.append("model")
            continue
        own = clean_caption(dataset_captions[i] or "")
        captions.append(own or render(CAPTION_LABEL, label=labels[i]))
        origin = "dataset" if own else "label"
        origins.append(origin if model_captions is None else f"model-empty:{origin}")
    return captions, origins
