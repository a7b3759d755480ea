"""Captions: precedence rules, and batched captioning equal to a plain one-image-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from augment.describe import Captioner, choose_captions, clean_caption
from augment.tiny import build_tiny_captioner


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 64 - 3 * i, 3), dtype=np.uint8)) for i in range(n)
    ]


@pytest.fixture(scope="module", params=["blip", "git"])
def captioner_dir(request, tmp_path_factory):
    return build_tiny_captioner(tmp_path_factory.mktemp(f"cap-{request.param}"), seed=1, kind=request.param)


def test_clean_caption():
    assert clean_caption("  a dog\n on   the grass . ") == "a dog on the grass"
    assert clean_caption("") == ""


def test_choose_captions_precedence():
    caps, origin = choose_captions(["a cat on a sofa", "", ""], ["cat", "dog", "owl"])
    assert caps == ["a cat on a sofa", "a photo of a dog", "a photo of a owl"]
    assert origin == ["dataset", "label", "label"]
    caps, origin = choose_captions(
        ["a cat on a sofa", "", "an owl"], ["cat", "dog", "owl"], ["a cat indoors", " ", ""]
    )
    assert caps == ["a cat indoors", "a photo of a dog", "an owl"]
    assert origin == ["model", "model-empty:label", "model-empty:dataset"]
    with pytest.raises(ValueError):
        choose_captions(["x"], ["a", "b"])


def test_batched_captions_equal_one_image_at_a_time(captioner_dir):
    cap = Captioner.from_pretrained(captioner_dir, device="cpu", batch_size=3, max_new_tokens=10)
    images = noise_images(7)
    got = cap(images)
    assert cap.calls == 3  # ceil(7 / 3) generate calls
    # the reference: the bare model and processor, one image per call
    model, proc = cap.model, cap.processor
    want = []
    for im in images:
        pixels = proc(images=[im], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.generate(pixel_values=pixels, do_sample=False, max_new_tokens=10)
        want.append(clean_caption(proc.batch_decode(out, skip_special_tokens=True)[0]))
    assert got == want
    assert any(got), "the seeded tiny captioner should say something"
    info = cap.describe()
    assert info["model"] == captioner_dir and info["decoding"] == "greedy" and info["batch_size"] == 3


def test_captioner_refuses_a_non_captioning_model(tmp_path):
    from augment.tiny import build_tiny_chat_llm

    path = build_tiny_chat_llm(tmp_path / "llm")
    with pytest.raises(ValueError, match="not an image-to-text model"):
        Captioner.from_pretrained(path, device="cpu")
