"""Hard ImageNet: the source (ImageNet tree + released masks) and the measures (ablation, RFS, saliency).

The measures are checked on models whose behaviour is constructed, so the expected numbers are exact:
a "centre" model that reads only the object region and a "border" model that reads only a ring of
background.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from augment.imageops import tile_fill
from augment.sources.base import RejectedInput
from augment.sources.hardimagenet import CLASS_NAMES, WNIDS, HardImageNetSource
from debias.hard_imagenet import (
    GREY,
    add_noise,
    compute_rfs,
    evaluate_hard_imagenet,
    fill_box,
    grey_box,
    grey_object,
    noise_draw,
    resize_for_model,
    write_hard_imagenet_report,
)
from debias.models import Preprocessing

SLED, MONKEY, TENCH = WNIDS["dog sled"], WNIDS["howler monkey"], "n01440764"

# ----------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------


def _image(path, colour, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste((255 - colour[0], 40, 40), (6, 6, 16, 16))
    img.save(path, format="JPEG" if path.suffix.lower() in (".jpeg", ".jpg") else None)


def _mask(path, size=(24, 24), value=1):
    """A mask as the release names it; stored losslessly (PNG bytes) whatever the name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[6:16, 6:16] = value  # any non-zero value is object
    m[6, 6] = 0
    Image.fromarray(m).save(path, format="PNG")
    return m != 0


@pytest.fixture()
def hin_tree(tmp_path):
    data, masks = tmp_path / "imagenet", tmp_path / "hardImageNet"
    for i in (1, 2, 3):
        _image(data / "train" / SLED / f"{SLED}_{i}.JPEG", (200, 100, 50))
    for i in (1, 2):
        _image(data / "train" / MONKEY / f"{MONKEY}_{i}.JPEG", (50, 100, 200))
    _image(data / "train" / TENCH / f"{TENCH}_1.JPEG", (9, 9, 9))  # not a Hard ImageNet class: ignored
    expected = {
        "sled1": _mask(masks / "train" / f"{SLED}_{SLED}_1.JPEG", value=7),  # released name
        "monkey1": _mask(masks / "train" / f"{MONKEY}_{MONKEY}_1.png", value=255),  # .png accepted
    }
    _mask(masks / "train" / f"{SLED}_{SLED}_2.JPEG", size=(12, 12))  # wrong size
    # SLED_3 has no mask; MONKEY_2 neither
    _mask(masks / "train" / f"{MONKEY}_{MONKEY}_9.JPEG")  # no image
    _mask(masks / "train" / f"{TENCH}_{TENCH}_1.JPEG")  # not one of the 15 classes
    (masks / "train" / "notes.txt").write_text("not a mask")
    (masks / "meta").mkdir()
    (masks / "meta" / "hard_imagenet_idx.pkl").write_bytes(b"ignored")
    _image(data / "val" / SLED / "ILSVRC2012_val_00000001.JPEG", (200, 100, 50))
    _mask(masks / "val" / f"{SLED}_ILSVRC2012_val_00000001.JPEG")
    _mask(masks / "val" / f"{SLED}_ILSVRC2012_val_00000001.png")  # a second mask of the same image
    _image(data / "val" / "ILSVRC2012_val_00000002.JPEG", (50, 100, 200))  # flat val layout
    expected["flat"] = _mask(masks / "val" / f"{MONKEY}_ILSVRC2012_val_00000002.JPEG")
    return data, masks, expected


def _load_all(src):
    out = {}
    for split in src.splits():
        for i in range(src.size(split)):
            try:
                s = src.load(split, i)
                out[(split, s.meta["file"])] = s
            except RejectedInput as e:
                out[(split, e.path)] = e
    return out


def test_source_reads_released_layout(hin_tree):
    data, masks, expected = hin_tree
    src = HardImageNetSource(str(data), str(masks))
    assert src.class_names == list(CLASS_NAMES) and len(CLASS_NAMES) == 15
    assert src.splits() == ["train", "validation"]
    assert src.size("train") == 8 and src.size("validation") == 3  # every input, usable or not
    items = _load_all(src)
    sled1 = items[("train", f"train/{SLED}/{SLED}_1.JPEG")]
    assert sled1.label == 0 and sled1.meta["object"] == "dog sled" and sled1.bg_label == -1
    assert sled1.caption == "" and sled1.mask.mode == "L"
    np.testing.assert_array_equal(np.asarray(sled1.mask), expected["sled1"].astype(np.uint8) * 255)
    assert sled1.meta["recipe"] == {
        "mask_from": "hard-imagenet",
        "file": f"train/{SLED}/{SLED}_1.JPEG",
        "mask_file": f"train/{SLED}_{SLED}_1.JPEG",
    }
    monkey1 = items[("train", f"train/{MONKEY}/{MONKEY}_1.JPEG")]
    assert monkey1.label == 1
    np.testing.assert_array_equal(np.asarray(monkey1.mask) > 0, expected["monkey1"])
    for f in (f"train/{SLED}/{SLED}_3.JPEG", f"train/{MONKEY}/{MONKEY}_2.JPEG"):
        assert items[("train", f)].mask is None
        assert items[("train", f)].meta["recipe"]["mask_from"] == "none"
    flat = items[("validation", "val/ILSVRC2012_val_00000002.JPEG")]
    assert flat.label == 1 and flat.meta["wnid"] == MONKEY
    np.testing.assert_array_equal(np.asarray(flat.mask) > 0, expected["flat"])
    val_sled = items[("validation", "val/n03218198/ILSVRC2012_val_00000001.JPEG")]
    assert val_sled.meta["recipe"]["mask_file"] == f"val/{SLED}_ILSVRC2012_val_00000001.JPEG"  # released wins

    rejected = {k[1]: v for k, v in items.items() if isinstance(v, RejectedInput)}
    assert len(rejected) == 5 and all(e.stage == "mask" for e in rejected.values())
    by_name = {p.rsplit("/", 1)[-1]: e.reason for p, e in rejected.items()}
    assert "is 12x12 but its image is 24x24" in by_name[f"{SLED}_{SLED}_2.JPEG"]
    assert "has no image" in by_name[f"{MONKEY}_{MONKEY}_9.JPEG"]
    assert "not one of the 15 Hard ImageNet classes" in by_name[f"{TENCH}_{TENCH}_1.JPEG"]
    assert "not named <wnid>_<ImageNet file name>" in by_name["notes.txt"]
    assert "a second mask" in by_name[f"{SLED}_ILSVRC2012_val_00000001.png"]
    for name, reason in by_name.items():
        assert name in reason  # every reason names its file
    assert not any(TENCH in k[1] for k, v in items.items() if not isinstance(v, RejectedInput))

    d = src.describe()
    assert d["source"] == "hardimagenet" and d["wnids"]["dog sled"] == [SLED]
    assert d["split_folders"] == {"train": "train", "val": "validation"}
    assert d["counts"]["train"] == {
        "images": 5,
        "with_mask": 3,  # sled 1 and 2 (the wrong-size one, refused when read) and monkey 1
        "without_mask": 2,
        "flat_images": 0,
        "masks_without_image": 1,
        "duplicate_masks": 0,
        "bad_mask_files": 2,
        "masks_of_unselected_classes": 0,
    }
    assert d["counts"]["validation"]["flat_images"] == 1 and d["counts"]["validation"]["duplicate_masks"] == 1
    assert src.labels("train").tolist().count(0) == 3


def test_source_class_subset_val_split_and_alias(hin_tree, tmp_path):
    data, masks, _ = hin_tree
    src = HardImageNetSource(str(data), str(masks), classes=["howler_monkey"], val_split="test")
    assert src.class_names == ["howler monkey"] and src.splits() == ["train", "test"]
    assert set(src.labels("train").tolist()) <= {0, -1}
    assert src.describe()["counts"]["train"]["masks_of_unselected_classes"] == 2
    with pytest.raises(ValueError, match="not among the 15 Hard ImageNet classes"):
        HardImageNetSource(str(data), str(masks), classes=["tench"])
    assert HardImageNetSource(str(data), classes=[SLED]).class_names == ["dog sled"]  # by wnid, no masks
    # the other ImageNet sunglasses synset is read when the masks use it
    alias = "n04355933"
    _image(data / "train" / alias / f"{alias}_1.JPEG", (1, 2, 3))
    _mask(masks / "train" / f"{alias}_{alias}_1.JPEG")
    src = HardImageNetSource(str(data), str(masks), classes=["sunglasses"])
    assert src.describe()["wnids"]["sunglasses"] == [WNIDS["sunglasses"], alias]
    (s,) = [src.load("train", i) for i in range(src.size("train")) if src.labels("train")[i] == 0]
    assert s.meta["wnid"] == alias and s.mask is not None
    with pytest.raises(FileNotFoundError):
        HardImageNetSource(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="has no 'train' or 'val' folder"):
        HardImageNetSource(str(data), str(masks / "train"))  # the split folder, not the root


def test_pipeline_writes_every_input(hin_tree, tmp_path):
    from augment.dataset import load_counterfactual_dataset, load_rejected
    from augment.pipeline import GenerateConfig, run

    data, masks, expected = hin_tree
    out = tmp_path / "out"
    summary = run(
        GenerateConfig(
            output=str(out), source="hardimagenet", data_dir=str(data), mask_dir=str(masks), progress=False
        )
    )
    assert summary["inputs"] == 11 == summary["originals"] + summary["rejected_inputs"]
    assert summary["originals"] == 6 and summary["rejected_inputs"] == 5
    ds = load_counterfactual_dataset(out)
    assert set(ds) == {"train", "validation"}
    assert ds["train"].features["label"].names == list(CLASS_NAMES)
    originals = ds["train"].filter(lambda r: r["kind"] == "original")
    assert len(originals) == 4
    row = next(
        r for r in originals if json.loads(r["recipe"]).get("mask_file", "").endswith(f"{SLED}_1.JPEG")
    )
    recipe = json.loads(row["recipe"])
    assert recipe["mask_from"] == "hard-imagenet" and recipe["file"] == f"train/{SLED}/{SLED}_1.JPEG"
    np.testing.assert_array_equal(np.asarray(row["mask"]) > 127, expected["sled1"])
    assert "positive" in ds["train"]["kind"]  # the masked anchors got counterfactuals
    rejected = load_rejected(out)
    reasons = [r["reason"] for split in rejected.values() for r in split if r["stage"] == "mask"]
    assert len(reasons) == 5 and any(f"{MONKEY}_{MONKEY}_9.JPEG" in r for r in reasons)


# ----------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------

R = 32
BOX = (slice(8, 24), slice(8, 24))


def _object_mask(notch: bool) -> np.ndarray:
    m = np.zeros((R, R), dtype=bool)
    m[BOX] = True
    if notch:
        m[8:10, 8:10] = False  # the box is larger than the object
    return m


def test_conditions_pixels():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, R, R, 3), dtype=np.uint8)
    m = _object_mask(notch=True)[None]
    g = grey_object(img, m)
    assert GREY == 128 and (g[m] == GREY).all() and (g[~m] == img[~m]).all()
    gb = grey_box(img, m)
    box = np.zeros_like(m)
    box[0][BOX] = True
    assert (gb[box] == GREY).all() and (gb[~box] == img[~box]).all() and (gb[0, 8, 8] == GREY).all()
    fb = fill_box(img, m)
    np.testing.assert_array_equal(fb[0], tile_fill(img[0], m[0], pad=0))
    np.testing.assert_array_equal(fb[0, 8:16, 8:24], img[0, 0:8, 8:24])  # the strip above, tiled
    np.testing.assert_array_equal(fb[0, 16:24, 8:24], img[0, 0:8, 8:24])
    assert (fb[~box] == img[~box]).all()

    noise = noise_draw(3, 0, 1, (R, R, 3), 0.25)[None]
    np.testing.assert_array_equal(noise, noise_draw(3, 0, 1, (R, R, 3), 0.25)[None])
    assert not np.array_equal(noise, noise_draw(3, 0, 2, (R, R, 3), 0.25)[None])
    assert abs(float(noise.std()) - 0.25) < 0.02
    noisy = add_noise(img, m, noise)
    want = np.rint(np.clip(img / 255.0 + noise, 0, 1) * 255).astype(np.uint8)
    assert (noisy[~m] == img[~m]).all()
    assert np.abs(noisy[m].astype(int) - want[m].astype(int)).max() <= 1  # float32 vs float64 rounding

    assert compute_rfs(0.5, 1.0) == 1.0 and compute_rfs(1.0, 0.5) == -1.0
    assert compute_rfs(1.0, 1.0) == 0.0 and compute_rfs(0.0, 0.0) == 0.0
    assert compute_rfs(0.2, 0.4) == pytest.approx(0.2 / 0.6)

    big = np.zeros((1, 64, 64), dtype=bool)
    big[0, 10, 21] = True
    x, small = resize_for_model(np.zeros((1, 64, 64, 3), np.uint8), big, R)
    assert x.shape == (1, R, R, 3) and small.sum() == 1 and small[0, 5, 10]


# ----------------------------------------------------------------------------------------------
# Measures on constructed models
# ----------------------------------------------------------------------------------------------


class _Gate(nn.Module):
    """An identity 1x1 convolution whose output is zeroed outside ``region``: the model's only features."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
        self.register_buffer("region", torch.as_tensor(region, dtype=torch.float32)[None, None])

    def forward(self, x):
        return self.conv(x) * self.region


class RegionBrightness(nn.Module):
    """Class ``dark_class`` if the mean pixel value (in [0, 1]) of ``region`` is below ``threshold``,
    else the other class. Expects inputs normalised with mean = std = 0.5."""

    def __init__(self, region: np.ndarray, dark_class: int, threshold: float = 0.05):
        super().__init__()
        self.features = _Gate(region)
        self.area = float(region.sum())
        self.threshold, self.dark_class = threshold, dark_class

    def forward(self, pixel_values, **kwargs):
        f = self.features(pixel_values)
        p = (f.sum(dim=(1, 2, 3)) / (3 * self.area) + 1) / 2
        dark = (self.threshold - p) * 100
        logits = torch.stack([dark, -dark] if self.dark_class == 0 else [-dark, dark], dim=1)
        return SimpleNamespace(logits=logits)


PRE = Preprocessing(R, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _centre_region() -> np.ndarray:
    return _object_mask(notch=False)


def _ring_region() -> np.ndarray:
    r = np.ones((R, R), dtype=bool)
    r[4:-4, 4:-4] = False
    return r


@pytest.fixture(scope="module")
def constructed():
    """Class 0: black object on a bright (200) background; class 1: white object on black.
    Three images of class 0 (one with a notched object mask), one of class 1."""
    images, masks, labels = [], [], []
    for label, notch in ((0, False), (0, True), (0, False), (1, True)):
        obj, bg = (0, 200) if label == 0 else (255, 0)
        m = _object_mask(notch)
        img = np.full((R, R, 3), bg, dtype=np.uint8)
        img[m] = obj
        images.append(img)
        masks.append(m)
        labels.append(label)
    # and a class-0 image whose mask is missing (empty): counted in `accuracy` only
    images.append(images[0].copy())
    masks.append(np.zeros((R, R), dtype=bool))
    labels.append(0)
    return np.stack(images), np.stack(masks), np.asarray(labels)


def test_centre_model_relies_on_the_object(constructed):
    images, masks, labels = constructed
    model = RegionBrightness(_centre_region(), dark_class=0)
    rep = evaluate_hard_imagenet(model, PRE, images, masks, labels, batch_size=3, trials=2, progress=False)
    assert rep["accuracy"] == 100.0
    assert rep["ablation_accuracy"] == {
        "original": 100.0,
        "grey_object": 25.0,
        "grey_box": 25.0,
        "fill_box": 0.0,
    }
    assert rep["ablation_drop"] == {"grey_object": 75.0, "grey_box": 75.0, "fill_box": 100.0}
    # noise on the object turns the black objects grey-ish (class 0 fails), noise on the background does nothing
    assert rep["noisy_fg_accuracy"] == 50.0 and rep["noisy_bg_accuracy"] == 100.0  # class-balanced
    assert rep["rfs"] == 1.0
    assert rep["saliency_iou"] == 100.0 and rep["details"]["saliency"]["iou_threshold_0.5"] == 100.0
    assert rep["details"]["saliency"]["layer"] == "features"
    assert rep["details"]["num_with_mask"] == 4 and rep["details"]["num_images"] == 5
    assert not model.training


def test_border_model_relies_on_the_background(constructed, tmp_path):
    images, masks, labels = constructed
    model = RegionBrightness(_ring_region(), dark_class=1)
    rep = evaluate_hard_imagenet(
        model, PRE, images, masks, labels, trials=3, progress=False, class_names=["a", "b"]
    )
    assert rep["accuracy"] == 100.0
    assert rep["ablation_drop"] == {"grey_object": 0.0, "grey_box": 0.0, "fill_box": 0.0}
    assert rep["noisy_fg_accuracy"] == 100.0 and rep["noisy_bg_accuracy"] == 50.0
    assert rep["rfs"] == -1.0
    assert rep["saliency_iou"] == 0.0
    assert rep["details"]["noisy_bg_accuracy_by_class"] == {"a": 100.0, "b": 0.0}
    again = evaluate_hard_imagenet(
        model, PRE, images, masks, labels, trials=3, progress=False, class_names=["a", "b"], seed=0
    )
    again["details"].pop("seconds"), rep["details"].pop("seconds")
    assert again == rep  # seeded

    paths = write_hard_imagenet_report(rep, tmp_path / "report")
    loaded = json.loads(open(paths["json"]).read())
    assert loaded["rfs"] == -1.0 and loaded["ablation_drop"]["fill_box"] == 0.0
    md = open(paths["markdown"]).read()
    assert "| accuracy | grey object |" in md and "-1.000" in md
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_real_small_resnet_at_another_resolution(constructed):
    from debias.models import SMALL_RESNET, build_model

    torch.manual_seed(0)
    model, pre = build_model(SMALL_RESNET, ["a", "b"], resolution=64, widths=(4, 8, 8, 8))
    images, masks, labels = constructed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = evaluate_hard_imagenet(model, pre, images, masks, labels, trials=1, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert 0 <= rep["accuracy"] <= 100 and -1 <= rep["rfs"] <= 1
    assert 0 <= rep["saliency_iou"] <= 100 and rep["details"]["resolution"] == 64
    assert rep["details"]["saliency"]["layer"] == "stages"
    assert set(rep["ablation_drop"]) == {"grey_object", "grey_box", "fill_box"}


def test_no_masks_and_bad_input():
    model = RegionBrightness(_centre_region(), dark_class=0)
    images = np.zeros((2, R, R, 3), dtype=np.uint8)
    rep = evaluate_hard_imagenet(
        model, PRE, images, np.zeros((2, R, R), bool), np.zeros(2, int), progress=False, trials=1
    )
    assert rep["accuracy"] == 100.0 and rep["rfs"] is None and rep["saliency_iou"] is None
    assert rep["ablation_drop"]["grey_object"] is None and "note" in rep["details"]
    with pytest.raises(ValueError, match="need object masks"):
        evaluate_hard_imagenet(model, PRE, images, None, np.zeros(2, int), progress=False)
    with pytest.raises(ValueError, match="do not match"):
        evaluate_hard_imagenet(
            model, PRE, images, np.zeros((2, 8, 8), bool), np.zeros(2, int), progress=False
        )
