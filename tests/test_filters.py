"""The generated-image filters: each rejects what it should, keeps what it should, and says why."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment.filters import (
    FilterConfig,
    Filters,
    SemanticFilter,
    add_filter_arguments,
    black_reason,
    mask_area_reason,
)
from augment.imageops import mask_image

CHEAP_OFF = dict(black=False, nsfw=False, mask_area=False)


def noise(seed: int, size: int = 32, lo: int = 40, hi: int = 220) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(lo, hi, (size, size, 3), dtype=np.uint8))


def square(side: int, size: int = 32) -> Image.Image:
    m = np.zeros((size, size), dtype=bool)
    m[:side, :side] = True
    return mask_image(m)


# ----------------------------------------------------------------------------------------------
# cheap filters
# ----------------------------------------------------------------------------------------------


def test_black_and_constant_images():
    black = Image.new("RGB", (32, 32))
    dark = noise(0, lo=0, hi=10)  # mean about 4.5
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    red = Image.new("RGB", (32, 32), (255, 0, 0))  # high std over all values, none per channel
    assert black_reason(black) == "black image (mean 0.0 < 8)"
    assert black_reason(dark).startswith("black image (mean 4.")
    assert black_reason(grey) == "constant image (std 0.00 < 2)"
    assert black_reason(red) == "constant image (std 0.00 < 2)"
    assert black_reason(noise(1)) is None
    filters = Filters(FilterConfig())
    reasons = filters([black, grey, noise(1)], [0, 0, 0], ["dog"])
    assert reasons == ["black image (mean 0.0 < 8)", "constant image (std 0.00 < 2)", None]
    assert Filters(FilterConfig(black=False))([black], [0], ["dog"]) == [None]
    assert filters.counts == {"checked": 3, "black": 2}


def test_nsfw_flag():
    filters = Filters(FilterConfig())
    images = [noise(i) for i in range(3)]
    recipes = [{"nsfw": True}, {"nsfw": False}, {}]
    assert filters(images, [0, 0, 0], ["dog"], recipes=recipes) == [
        "flagged NSFW by the safety checker",
        None,
        None,
    ]
    # the safety checker blanks what it flags: the NSFW reason is the one reported
    assert filters([Image.new("RGB", (8, 8))], [0], ["dog"], recipes=[{"nsfw": True}])[0].startswith(
        "flagged NSFW"
    )
    assert Filters(FilterConfig(nsfw=False))(images[:1], [0], ["dog"], recipes=recipes[:1]) == [None]


def test_mask_area_ratio():
    anchor = square(10)  # 100 pixels
    small, same, large = square(5), square(10), square(17)  # x0.25 ... x2.89 (about x0.3, x1, x3)
    assert mask_area_reason(same, anchor) is None
    r = mask_area_reason(small, anchor)
    assert r == "object area changed x0.25 (2.4% of the image vs 9.8% in the anchor; allowed x0.50 to x2.00)"
    assert mask_area_reason(large, anchor).startswith("object area changed x2.89 ")
    assert mask_area_reason(large, anchor, max_ratio=3.0) is None
    assert mask_area_reason(square(0), anchor) == "object mask is empty (the anchor's object covers 9.8%)"
    assert mask_area_reason(None, anchor) is None and mask_area_reason(same, None) is None
    # areas are fractions: a 64-px anchor with the same share of its image matches
    assert mask_area_reason(same, square(20, 64)) is None
    # boolean arrays work as masks too
    assert mask_area_reason(np.asarray(small) > 0, np.asarray(anchor) > 0) == r

    filters = Filters(FilterConfig())
    images = [noise(i) for i in range(5)]
    masks = [small, same, large, square(0), square(0)]
    labels = [0, 0, 0, 0, -1]  # the last one is a negative with its object removed: not judged
    reasons = filters(images, labels, ["dog"], masks, [anchor] * 5)
    assert reasons[1] is None and reasons[4] is None
    assert reasons[0].startswith("object area changed x0.25") and reasons[2].startswith(
        "object area changed x2.89"
    )
    assert reasons[3].startswith("object mask is empty")
    assert Filters(FilterConfig(mask_area=False))(images, labels, ["dog"], masks, [anchor] * 5) == [None] * 5


def test_config_validation_and_flags():
    with pytest.raises(ValueError, match="max_area_ratio"):
        FilterConfig(max_area_ratio=0.5)
    with pytest.raises(ValueError, match="must not exceed"):
        FilterConfig(confidence_low=0.9, confidence_high=0.5)
    parser = argparse.ArgumentParser()
    add_filter_arguments(parser)
    args = parser.parse_args(
        ["--no-black-filter", "--max-area-ratio", "3", "--semantic-negatives", "a sketch"]
    )
    cfg = FilterConfig.from_args(args)
    assert cfg.black is False and cfg.max_area_ratio == 3 and cfg.semantic_negatives == ("a sketch",)
    assert cfg.semantic_model is None and cfg.nsfw is True
    assert Filters.from_config({"black": False}, max_area_ratio=4.0).config.max_area_ratio == 4.0
    d = Filters(FilterConfig()).describe()
    assert d["black"] == {"mean_below": 8.0, "std_below": 2.0} and d["semantic"] is False


def test_lengths_must_match():
    with pytest.raises(ValueError, match="masks has 1 entries for 2 images"):
        Filters()([noise(0), noise(1)], [0, 0], ["dog"], masks=[None])


# ----------------------------------------------------------------------------------------------
# semantic filter: a tiny random CLIP, checked against a plain computation of the same similarities
# ----------------------------------------------------------------------------------------------


def build_tiny_clip(path: Path) -> Path:
    from augment.tiny import build_tiny_clip as build

    return Path(build(path))


def reference_reasons(path, images, labels, names, negatives):
    """The semantic filter's decisions computed plainly with CLIPModel: image and text projections,
    unit norm, cosine; reject when some negative is strictly closer than "a photo of a {label}"."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path).eval()
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    positives = [f"a photo of a {n.replace('_', ' ')}" for n in names]
    texts = positives + list(negatives)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
        enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    sims = (img @ txt.T).numpy()
    out = []
    for i, y in enumerate(labels):
        pos, neg = sims[i, y], sims[i, len(names) :].copy()
        neg[[k for k, t in enumerate(negatives) if t == positives[y]]] = -np.inf
        j = int(neg.argmax())
        if neg[j] > pos:
            out.append(
                f'semantic filter: closer to "{negatives[j]}" (cosine {neg[j]:.3f}) than to "{positives[y]}" ({pos:.3f})'
            )
        else:
            out.append(None)
    return out


def test_semantic_filter_matches_reference(tmp_path):
    path = build_tiny_clip(tmp_path / "clip")
    names = ["dog", "cat", "grass_snake"]
    images = [noise(i) for i in range(12)] + [Image.new("RGB", (32, 32), (i * 20, 0, 0)) for i in range(4)]
    labels = [i % 3 for i in range(16)]
    seen = []
    # ALIA-style negatives; then the class prompts themselves as negatives (an image is kept exactly
    # when its own class's prompt is the closest, its own prompt never counting as a negative), which
    # makes both outcomes occur with random weights
    for negatives in (
        ("a painting", "a cartoon", "a black image"),
        ("a photo of a dog", "a photo of a cat", "a photo of a grass snake"),
    ):
        filters = Filters(
            FilterConfig(semantic_model=str(path), semantic_negatives=negatives, **CHEAP_OFF), device="cpu"
        )
        reasons = filters(images, labels, names)
        assert reasons == reference_reasons(path, images, labels, names, negatives)
        assert filters.describe()["semantic"]["negatives"] == list(negatives)
        assert filters.counts["semantic"] == sum(r is not None for r in reasons)
        seen += reasons
    assert any(r is None for r in seen) and any(r is not None for r in seen)
    # images another filter already rejected never reach the model
    both = Filters(FilterConfig(semantic_model=str(path)), device="cpu")
    assert both([Image.new("RGB", (32, 32))], [0], names)[0].startswith("black image")
    assert SemanticFilter.positive_text(-1, names) == "a photo"
    assert SemanticFilter.positive_text(2, names) == "a photo of a grass snake"


def test_semantic_filter_refuses_a_text_only_model(tmp_path):
    from augment.tiny_diffusion import build_tiny_clip_text

    build_tiny_clip_text(tmp_path / "t")
    with pytest.raises(ValueError, match="not an image-text model"):
        SemanticFilter.from_pretrained(str(tmp_path / "t" / "text_encoder"), device="cpu")


# ----------------------------------------------------------------------------------------------
# confidence filter: a classifier whose probabilities are set by the share of red pixels
# ----------------------------------------------------------------------------------------------


def build_red_share_classifier(path: Path) -> Path:
    """logits = (100 x share of pure red pixels, 3): p(class 0) = sigmoid(100 r - 3)."""
    from debias.models import (
        Preprocessing,
        SmallResNetConfig,
        SmallResNetForImageClassification,
        save_preprocessing,
    )

    config = SmallResNetConfig(
        widths=(2,), depths=(1,), stem_stride=1, num_labels=2, id2label={0: "cardinal", 1: "jay"}
    )
    model = SmallResNetForImageClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
        model.stem[0].weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
        model.stem[1].bias.copy_(torch.tensor([-2.0, 0.5]))
        model.classifier.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 6.0]]))
    model.save_pretrained(path)
    save_preprocessing(path, Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    return path


def red_share(pixels: int) -> Image.Image:
    arr = np.full((32, 32, 3), (60, 140, 70), dtype=np.uint8)
    arr.reshape(-1, 3)[:pixels] = (255, 0, 0)
    return Image.fromarray(arr)


def test_confidence_filter(tmp_path):
    from augment.filters import ClassifierProbe

    path = build_red_share_classifier(tmp_path / "clf")
    probe = ClassifierProbe.load(str(path), device="cpu")
    none, some, lots = red_share(0), red_share(31), red_share(102)  # r = 0, 3.0 %, 10 %
    p = probe.probabilities([none, some, lots])[:, 0]
    np.testing.assert_allclose(p, 1 / (1 + np.exp(3 - 100 * np.array([0, 31, 102]) / 1024)), atol=1e-4)

    filters = Filters(FilterConfig(confidence_classifier=str(path), **CHEAP_OFF), device="cpu")
    names = ["cardinal", "jay"]
    reasons = filters([none, none, some, lots, none], [0, 1, 0, 0, -1], names)
    assert reasons[0] == (
        "confidence filter: the edit destroyed the class (p(cardinal) = 0.047 < 0.1; "
        "the classifier sees jay at 0.953)"
    )
    assert reasons[1] == (
        "confidence filter: the edit changed nothing the classifier cares about (p(jay) = 0.953 > 0.95)"
    )
    assert reasons[2] is None and reasons[3].startswith("confidence filter: the edit changed nothing")
    assert reasons[4] is None  # no object: not judged
    # with the originals: "changed nothing" needs the original to be confident too
    r = filters([lots, lots], [0, 0], names, anchor_images=[some, lots])
    assert r[0] is None
    assert r[1] == (
        "confidence filter: the edit changed nothing the classifier cares about "
        "(p(cardinal) = 0.999, original 0.999, both > 0.95)"
    )
    off = Filters(
        FilterConfig(confidence_classifier=str(path), confidence_high=1.0, **CHEAP_OFF), device="cpu"
    )
    assert off([lots], [0], names) == [None]
    assert filters.describe()["confidence"]["classifier"] == str(path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Filters(FilterConfig(confidence_classifier=str(tmp_path / "missing")))
