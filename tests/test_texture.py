"""The texture benchmark, texture counterfactuals, the shape-bias measure and the texture path end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from augment.seeding import item_rng, item_seed
from augment.sources import build_source
from augment.sources.synthetic import (
    TEXTURE_WORDS,
    SyntheticBackgrounds,
    SyntheticTextures,
    render_object_mask,
    render_plain_background,
    render_texture,
)
from augment.synthesize.texture import TextureGenerator, choose_family, texture_patch, tile_texture
from tests.conftest import python_script, run_script

TINY = dict(num_classes=4, image_size=32, train_per_class=2, validation_per_class=0, test_per_class=3)


def _reference(src: SyntheticTextures, split: str, index: int):
    """The item redrawn step by step from its seed: background, mask, fill (noise 0, no outline)."""
    s = src.load(split, index)
    rng = item_rng(src.seed, s.id)
    size = src.image_size
    background = render_plain_background(size, rng)
    mask = render_object_mask(s.label, size, rng, src.max_rotation)
    return s, background, mask, rng


@pytest.mark.parametrize("split", ["train", "test", "cue_conflict", "silhouette"])
def test_object_splits_match_a_step_by_step_reference(split):
    src = SyntheticTextures(noise=0.0, **TINY)
    for index in range(src.size(split)):
        s, background, mask, rng = _reference(src, split, index)
        img, m = np.asarray(s.image).astype(float), np.asarray(s.mask) > 0
        assert np.array_equal(m, mask), (split, index)  # the mask is exactly the object drawn
        assert np.array_equal(img[~m], np.clip(np.rint(background[~m]), 0, 255))
        if split == "silhouette":
            assert s.bg_label == -1 and s.meta["texture"] is None
            assert len(np.unique(img[m].reshape(-1))) == 1  # one flat grey inside the mask
        else:
            fill = render_texture(s.bg_label, src.image_size, rng)
            assert np.array_equal(img[m], np.clip(np.rint(fill[m]), 0, 255))
            assert s.meta["texture"] == TEXTURE_WORDS[s.bg_label]
        if split == "cue_conflict":
            assert s.bg_label != s.label  # another class's texture on the shape, labelled by the shape


def test_texture_only_is_a_textured_square_labelled_by_its_texture():
    src = SyntheticTextures(noise=0.0, **TINY)
    for index in range(src.size("texture_only")):
        s = src.load("texture_only", index)
        m = np.asarray(s.mask) > 0
        ys, xs = np.nonzero(m)
        assert m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()  # a filled axis-aligned box
        assert abs((ys.max() - ys.min()) - (xs.max() - xs.min())) <= 1 and m.mean() > 0.4
        assert s.label == s.bg_label == index % src.num_classes


def test_texture_correlation_splits_and_sources():
    src = SyntheticTextures(num_classes=6, rho=0.8, train_per_class=200)
    fams = np.array([src.texture_family("train", i) for i in range(src.size("train"))])
    assert abs((fams == src.labels("train")).mean() - 0.8) < 0.04
    assert src.splits() == ["train", "validation", "test", "cue_conflict", "silhouette", "texture_only"]
    assert src.size("cue_conflict") == src.size("test")
    assert isinstance(build_source("synthetic", bias="texture", num_classes=3), SyntheticTextures)
    assert type(build_source("synthetic", num_classes=3)) is SyntheticBackgrounds
    with pytest.raises(ValueError, match="--bias"):
        build_source("synthetic", bias="colour")


def test_texture_patch_and_tiling_on_a_constructed_case():
    image = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    mask = np.zeros((20, 20), dtype=bool)
    mask[4:13, 6:15] = True  # a 9 x 9 square
    patch = texture_patch(image, mask, margin=1)  # 1 px kept off the edge: the 7 x 7 inside
    assert np.array_equal(patch, image[5:12, 7:14])
    assert texture_patch(image, np.zeros_like(mask)) is None
    field = tile_texture(patch, (23, 31), np.random.default_rng(0))
    assert field.shape == (23, 31, 3)
    colours = {tuple(c) for c in patch.reshape(-1, 3)}
    assert {tuple(c) for c in field.reshape(-1, 3)} <= colours  # only the patch's pixels, mirrored
    assert len(np.unique(field.reshape(-1, 3), axis=0)) == 49


def test_positives_keep_outside_and_mask_and_change_inside():
    src = SyntheticTextures(noise=0.0, **TINY)
    anchor, partner = src.load("train", 0), src.load("train", 1)
    m = np.asarray(anchor.mask) > 0
    gen = TextureGenerator("dataset")
    procedural = TextureGenerator("procedural", num_families=4)
    outs = [
        gen([anchor.image], [anchor.mask], [7], patches=[gen.patch(partner.image, partner.mask)]),
        procedural([anchor.image], [anchor.mask], [7], families=[choose_family(4, {0}, 7)]),
    ]
    a = np.asarray(anchor.image).astype(int)
    for out in outs:
        img = np.asarray(out.images[0]).astype(int)
        assert np.array_equal(np.asarray(out.masks[0]) > 0, m)
        assert np.array_equal(img[~m], a[~m])
        assert np.abs(img[m] - a[m]).mean() > 20  # the inside is another texture
    assert outs[1].recipes[0]["family"] != 0 and outs[1].recipes[0]["seed"] == 7
    again = gen([anchor.image], [anchor.mask], [7], patches=[gen.patch(partner.image, partner.mask)])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(outs[0].images[0]))


def test_negative_carries_the_anchor_texture_onto_another_shape():
    src = SyntheticTextures(noise=0.0, rho=1.0, **TINY)
    anchor, other = src.load("train", 0), src.load("train", 2)  # striped circle, polka-dot triangle
    gen = TextureGenerator("dataset")
    out = gen([other.image], [other.mask], [3], patches=[gen.patch(anchor.image, anchor.mask)])
    om = np.asarray(other.mask) > 0
    img = np.asarray(out.images[0]).astype(float)
    assert np.array_equal(img[~om], np.asarray(other.image).astype(float)[~om])
    assert np.array_equal(np.asarray(out.masks[0]) > 0, om)
    anchor_in = np.asarray(anchor.image).astype(float)[np.asarray(anchor.mask) > 0]
    other_in = np.asarray(other.image).astype(float)[om]
    # without noise a texture is a few palette colours: the inside now holds the anchor's colours (both
    # stripe colours) and none of the shape's own
    colours = {tuple(c) for c in img[om]}
    assert colours <= {tuple(c) for c in anchor_in} and len(colours) >= 2
    assert not colours & {tuple(c) for c in other_in}


def test_shape_bias_on_constructed_predictions():
    from debias.evaluate import shape_bias

    shape = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    texture = np.array([1, 2, 0, 2, 0, 1, 0, -1])  # the last two are not cue-conflict images
    preds = np.array([0, 2, 1, 2, 1, 2, 1, 0])  # shape, texture, shape, texture, neither, shape, -, -
    r = shape_bias(preds, shape, texture)
    assert r == {"value": 60.0, "shape_decisions": 3, "texture_decisions": 2, "cue_conflict_images": 6}
    assert shape_bias(np.array([2]), np.array([0]), np.array([1]))["value"] is None


def test_generate_train_evaluate_with_texture_bias(tmp_path):
    from augment.dataset import load_counterfactual_dataset
    from augment.pipeline import GenerateConfig, run
    from debias import train as trainer

    data = tmp_path / "ds"
    run(
        GenerateConfig(
            output=str(data),
            bias="texture",
            positives="texture",
            num_classes=3,
            image_size=32,
            train_per_class=4,
            validation_per_class=1,
            test_per_class=2,
            progress=False,
        )
    )
    ds = load_counterfactual_dataset(str(data))
    assert set(ds) == {"train", "validation", "test", "cue_conflict", "silhouette", "texture_only"}
    train = {r["id"]: r for r in ds["train"]}
    positives = [r for r in train.values() if r["kind"] == "positive"]
    assert len(positives) == 12
    for r in positives:
        anchor = train[r["source_id"]]
        m = np.asarray(anchor["mask"]) > 0
        assert np.array_equal(np.asarray(r["mask"]) > 0, m)
        img, a = np.asarray(r["image"]).astype(int), np.asarray(anchor["image"]).astype(int)
        assert np.array_equal(img[~m], a[~m]) and np.abs(img[m] - a[m]).mean() > 10
        recipe = json.loads(r["recipe"]) if isinstance(r["recipe"], str) else r["recipe"]
        assert recipe["generator"] == "texture" and recipe["texture_source"] == "dataset"
        assert recipe["seed"] == item_seed(0, r["id"])
        partner = train[recipe["texture_source_id"]]
        assert partner["label"] != anchor["label"] and r["bg_label"] == partner["bg_label"]
    negatives = [r for r in train.values() if r["kind"] == "negative"]
    assert sorted({r["label"] == -1 for r in negatives}) == [False, True]
    for r in negatives:
        assert r["bg_label"] == train[r["source_id"]]["bg_label"]  # the anchor's texture family
    model = tmp_path / "model"
    trainer.main(
        trainer.parse_args(
            ["--dataset", str(data), "--method", "clad", "--output-dir", str(model), "--epochs", "1",
             "--batch-size", "8", "--widths", "8", "8", "16", "16", "--checkpointing-steps", "0", "--no-progress"]
        )
    )  # fmt: skip
    out = tmp_path / "eval"
    run_script(
        python_script("evaluate.py", "--model", str(model), "--dataset", str(data), "--output", str(out), "--no-progress")
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) == {"original", "cue_conflict", "silhouette", "texture_only"}
    assert report["bg_gap"] is None and report["challenge_accuracy"] is None
    sb = report["details"]["shape_bias"]
    assert sb["cue_conflict_images"] == 6
    if sb["shape_decisions"] + sb["texture_decisions"]:
        assert report["shape_bias"] == pytest.approx(
            100 * sb["shape_decisions"] / (sb["shape_decisions"] + sb["texture_decisions"])
        )
    assert "shape bias" in (out / "report.md").read_text()


def test_procedural_and_rejected_settings(tmp_path):
    from augment.pipeline import GenerateConfig, run

    common = dict(bias="texture", positives="texture", num_classes=3, image_size=32, progress=False)
    sizes = dict(train_per_class=2, validation_per_class=0, test_per_class=1)
    with pytest.raises(ValueError, match="--negative-generator"):
        run(GenerateConfig(output=str(tmp_path / "a"), negative_generator="inpaint", **common, **sizes))
    with pytest.raises(ValueError, match="--bias texture applies to --source synthetic"):
        run(
            GenerateConfig(
                output=str(tmp_path / "b"), source="folder", data_dir=str(tmp_path), bias="texture"
            )
        )
    from augment.dataset import load_counterfactual_dataset

    run(
        GenerateConfig(
            output=str(tmp_path / "c"), texture_source="procedural", negatives=[], **common, **sizes
        )
    )
    rows = [r for r in load_counterfactual_dataset(str(tmp_path / "c"))["train"] if r["kind"] == "positive"]
    assert len(rows) == 6
    for r in rows:
        recipe = json.loads(r["recipe"]) if isinstance(r["recipe"], str) else r["recipe"]
        assert recipe["texture"] == "procedural" and r["bg_label"] == recipe["family"] != r["label"]


def test_texture_edit_keeps_everything_outside_the_mask(tmp_path):
    from augment.synthesize.edit import Img2ImgGenerator
    from augment.synthesize.texture import TextureEditGenerator
    from augment.tiny_diffusion import build_tiny_diffusion

    pipe = build_tiny_diffusion(tmp_path / "img2img", kind="img2img", seed=0)
    editor = Img2ImgGenerator.from_pretrained(str(pipe), device="cpu", steps=2, strengths=(0.5, 1.0))
    gen = TextureEditGenerator(editor)
    src = SyntheticTextures(noise=0.0, **TINY)
    samples = [src.load("train", i) for i in range(2)]
    out = gen.texture(
        [s.image for s in samples], [s.mask for s in samples], ["a photo of a striped circle"] * 2, [5, 6]
    )
    assert len(out.images) == 4  # item-major, one per strength
    for k, s in enumerate(samples):
        m = np.asarray(s.mask) > 0
        for v, strength in enumerate((0.5, 1.0)):
            img = np.asarray(out.images[2 * k + v]).astype(int)
            assert np.array_equal(img[~m], np.asarray(s.image).astype(int)[~m])
            assert np.array_equal(np.asarray(out.masks[2 * k + v]) > 0, m)
            assert not np.array_equal(img[m], np.asarray(s.image).astype(int)[m])
            r = out.recipes[2 * k + v]
            assert r["generator"] == "texture" and r["strength"] == strength and r["seed"] == [5, 6][k]


def test_demo_tiny_texture(tmp_path):
    out = tmp_path / "demo"
    run_script(
        python_script("demo.py", "--bias", "texture", "--output", str(out), "--preset", "tiny", "--no-progress", "--no-saliency")
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["erm", "augment", "clad", "clad+"]
    for method, r in report["methods"].items():
        assert set(r["accuracy"]) == {"original", "cue_conflict", "silhouette", "texture_only"}, method
        assert "shape_bias" in r and r["details"]["num_images"]["cue_conflict"] == 18
    assert report["settings"]["bias"] == "texture"
    assert report["targets"][0]["target"].startswith("clad cue_conflict")
    md = (out / "report.md").read_text()
    assert "shape bias" in md and "| clad+ |" in md and "cue_conflict" in md
    assert (out / "report.png").stat().st_size > 5000
