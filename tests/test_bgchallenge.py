"""The Background Challenge's released layout: the source (masks matched by name, not position) and the
evaluation on its shipped variants, with challenge accuracy checked on a case whose answer is known."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from augment.dataset import load_counterfactual_dataset, load_rejected
from augment.pipeline import GenerateConfig, run
from augment.sources.base import RejectedInput
from augment.sources.bgchallenge import BackgroundChallengeSource, class_name, grabcut_mask
from debias.bgchallenge import evaluate_shipped, robust_foregrounds, write_shipped_report
from debias.models import Preprocessing

H, W = 12, 16  # source fixture images are 16 wide, 12 high


def _save(path, arr, fmt=None, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, format=fmt)


def _photo(colour, box):
    """A textured background with a ``colour`` rectangle at ``box`` = (y0, y1, x0, x1)."""
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([(yy * 9) % 60, (xx * 7) % 60, ((yy + xx) * 5) % 60], axis=-1).astype(np.uint8) + 20
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = colour
    return img


def _box(box):
    m = np.zeros((H, W), dtype=bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture()
def released(tmp_path):
    """A small copy of the released layout; returns (root, expected masks by (split, file))."""
    root = tmp_path / "bg"
    expected = {}
    fish, seal, insect = "2_fish", "3_sea_lion", "10_insect"  # numeric order != string order
    # fish: two .npy masks (bool and 0/1), one .npy of the wrong shape, one image with no mask
    for stem, box in [("a", (2, 6, 3, 9)), ("b", (4, 10, 5, 12)), ("c", (1, 5, 1, 5)), ("d", (3, 9, 4, 12))]:
        _save(root / "original/train" / fish / f"{stem}.png", _photo((230, 40, 40), box))
    np.save(_mk(root / "fg_mask/train" / fish) / "a.npy", _box((2, 6, 3, 9)))
    np.save(root / "fg_mask/train" / fish / "b.png.npy", _box((4, 10, 5, 12)).astype(np.uint8))  # <file>.npy
    np.save(root / "fg_mask/train" / fish / "c.npy", np.ones((5, 5), dtype=bool))
    # a.png also has an only_fg file with a different object: fg_mask must win
    only = np.zeros((H, W, 3), np.uint8)
    only[0:3, 0:3] = 200
    _save(root / "only_fg/train" / fish / "a.png", only)
    expected[("train", "a")] = ("fg_mask", _box((2, 6, 3, 9)))
    expected[("train", "b")] = ("fg_mask", _box((4, 10, 5, 12)))
    expected[("train", "d")] = ("none", None)
    # sea lion: the object on black (only_fg); one is a JPEG photo
    for stem, box in [("s0", (2, 8, 2, 8)), ("s1", (5, 11, 8, 15))]:
        _save(root / "original/train" / seal / f"{stem}.jpg", _photo((40, 220, 40), box), fmt="JPEG")
        on_black = np.repeat(_box(box)[..., None], 3, axis=2).astype(np.uint8) * 180
        _save(root / "only_fg/train" / seal / f"{stem}.png", on_black)
        expected[("train", stem)] = ("only_fg", _box(box))
    # insect: fg_grabcut masks (0/255 and 0/1 single-channel PNGs) beat only_fg
    for stem, box, peak in [("e", (1, 7, 6, 14), 255), ("f", (6, 12, 0, 7), 1)]:
        _save(root / "original/train" / insect / f"{stem}.png", _photo((40, 40, 230), box))
        _save(root / "fg_grabcut/train" / insect / f"{stem}.png", _box(box).astype(np.uint8) * peak, mode="L")
        _save(root / "only_fg/train" / insect / f"{stem}.png", only)
        expected[("train", stem)] = ("fg_grabcut", _box(box))
    np.save(_mk(root / "fg_mask/train" / insect) / "ghost.npy", _box((1, 4, 1, 4)))  # no image
    # val -> test: one fg_mask, one without any mask
    _save(root / "original/val" / fish / "v0.png", _photo((230, 40, 40), (2, 6, 2, 6)))
    np.save(_mk(root / "fg_mask/val" / fish) / "v0.npy", _box((2, 6, 2, 6)))
    _save(root / "original/val" / insect / "v1.png", _photo((40, 40, 230), (5, 9, 5, 9)))
    expected[("test", "v0")] = ("fg_mask", _box((2, 6, 2, 6)))
    expected[("test", "v1")] = ("none", None)
    (root / "only_bg_t").mkdir()  # a variant folder that the source lists but does not read
    return root, expected


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _by_stem(source, split):
    out = {}
    for i in range(source.size(split)):
        try:
            s = source.load(split, i)
            out[s.meta["file"].rsplit("/", 1)[1].split(".")[0]] = s
        except RejectedInput as e:
            out[e.path.rsplit("/", 1)[1].split(".")[0]] = e
    return out


def test_classes_masks_and_rejections(released):
    root, expected = released
    src = BackgroundChallengeSource(str(root))
    assert class_name("3_sea_lion") == "sea_lion"
    assert src.class_names == ["fish", "sea_lion", "insect"]
    assert src.splits() == ["train", "test"]
    assert src.size("train") == 9 and src.size("test") == 2  # 8 images + the mask without an image
    assert src.labels("train").tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    train = _by_stem(src, "train")
    for (split, stem), (origin, mask) in expected.items():
        s = train[stem] if split == "train" else _by_stem(src, "test")[stem]
        assert s.meta["recipe"]["mask_from"] == origin, stem
        assert s.bg_label == -1 and s.caption == "" and s.meta["file"].startswith("original/")
        if mask is None:
            assert s.mask is None and s.meta["recipe"]["mask_file"] is None
        else:
            got = np.asarray(s.mask)
            assert set(np.unique(got)) <= {0, 255}
            assert np.array_equal(got == 255, mask), stem
            assert s.meta["recipe"]["mask_file"].startswith(f"{origin}/")
    # the wrong shape and the mask with no image are rejected, naming the file
    wrong, ghost = train["c"], train["ghost"]
    assert isinstance(wrong, RejectedInput) and wrong.stage == "mask"
    assert (
        "fg_mask/train/2_fish/c.npy" in wrong.reason
        and "(5, 5)" in wrong.reason
        and "(12, 16)" in wrong.reason
    )
    assert isinstance(ghost, RejectedInput) and ghost.stage == "mask"
    assert "fg_mask/train/10_insect/ghost.npy has no image" in ghost.reason
    d = src.describe()
    assert d["variants_found"] == ["original", "only_fg", "only_bg_t", "fg_mask", "fg_grabcut"]
    # c.npy counts as found (it is rejected on load); ghost.npy is a mask without an image
    assert d["masks"]["train"] == {
        "fg_mask": 3,
        "only_fg": 2,
        "fg_grabcut": 2,
        "none": 1,
        "mask_without_image": 1,
    }
    assert d["masks"]["test"] == {"fg_mask": 1, "none": 1}
    assert d["classes"] == ["fish", "sea_lion", "insect"] and d["image_trees"] == {
        "train": "original/train",
        "test": "original/val",
    }
    # a subset of classes, by name or folder, in the order given
    sub = BackgroundChallengeSource(str(root), classes=["insect", "2_fish"])
    assert sub.class_names == ["insect", "fish"] and sub.labels("train").tolist() == [1, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="mask_fallback"):
        BackgroundChallengeSource(str(root), mask_fallback="sam")


def test_in9l_train_when_original_train_is_absent(tmp_path):
    root = tmp_path / "bg"
    _save(root / "in9l/train/00_dog/x.png", _photo((200, 200, 200), (2, 6, 2, 6)))
    _save(root / "in9l/train/01_bird/y.png", _photo((200, 200, 200), (2, 6, 2, 6)))
    _save(root / "original/val/00_dog/z.png", _photo((200, 200, 200), (2, 6, 2, 6)))
    src = BackgroundChallengeSource(str(root))
    assert src.describe()["image_trees"] == {"train": "in9l/train", "test": "original/val"}
    assert src.class_names == ["dog", "bird"] and src.size("train") == 2
    assert src.load("train", 1).meta["file"] == "in9l/train/01_bird/y.png"
    with pytest.raises(FileNotFoundError, match="original/train"):
        BackgroundChallengeSource(str(tmp_path))


def test_through_the_pipeline(released, tmp_path):
    root, expected = released
    out = tmp_path / "out"
    summary = run(GenerateConfig(output=str(out), source="bgchallenge", data_dir=str(root), progress=False))
    assert summary["inputs"] == 11 == summary["originals"] + summary["rejected_inputs"]
    assert summary["rejected_inputs"] == 2
    rejected = [r for split in load_rejected(str(out)).values() for r in split]
    reasons = [r["reason"] for r in rejected if r["stage"] == "mask"]
    assert any("c.npy" in r for r in reasons) and any("ghost.npy" in r for r in reasons)
    ds = load_counterfactual_dataset(str(out))
    assert set(ds) == {"train", "test"}
    assert ds["train"].features["label"].names == ["fish", "sea_lion", "insect"]
    for split in ds:
        for row in ds[split]:
            if row["kind"] != "original":
                continue
            recipe = json.loads(row["recipe"])
            stem = recipe["file"].rsplit("/", 1)[1].split(".")[0]
            origin, mask = expected[(split, stem)]
            assert recipe["mask_from"] == origin, stem
            assert (row["mask"] is None) == (mask is None)
            if mask is not None:
                assert np.array_equal(np.asarray(row["mask"]) > 127, mask)
    assert ds["train"]["kind"].count("positive") == 6  # one per train image with a usable mask


def test_grabcut_fallback(released, monkeypatch):
    root, _ = released
    pytest.importorskip("cv2")
    img = np.random.default_rng(0).integers(0, 40, (40, 48, 3)).astype(np.uint8)
    img[12:30, 14:34] = (235, 220, 60)
    mask = grabcut_mask(img)
    square = np.zeros((40, 48), bool)
    square[12:30, 14:34] = True
    assert mask[square].mean() > 0.9 and mask[~square].mean() < 0.1
    assert np.array_equal(mask, grabcut_mask(img))  # seeded
    src = BackgroundChallengeSource(str(root), mask_fallback="grabcut")
    d = _by_stem(src, "train")["d"]
    assert d.meta["recipe"]["mask_from"] == "grabcut" and np.asarray(d.mask).any()
    assert src.describe()["masks"]["train"]["grabcut"] == 1
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(ImportError, match="opencv-python-headless"):
        BackgroundChallengeSource(str(root), mask_fallback="grabcut")


# ----------------------------------------------------------------------------------------------
# Evaluation on the shipped variants
# ----------------------------------------------------------------------------------------------

R = 8  # evaluation images are R x R; the model reads the centre pixel
COLOURS = np.array([[250, 30, 30], [30, 250, 30], [30, 30, 250]], dtype=np.uint8)
PRE = Preprocessing(R, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
CENTRE, CORNER = (2, 6, 2, 6), (0, 2, 0, 2)
# (label, colour of the object, where it is): survives every background only when its own colour
# covers the centre; a corner object shows the background's centre; a wrong colour is always wrong
FOREGROUNDS = [
    (0, 0, CENTRE),
    (0, 0, CORNER),
    (1, 1, CENTRE),
    (1, 2, CENTRE),
    (2, 2, CENTRE),
    (2, 1, CORNER),
    (2, 2, CENTRE),
]
ROBUST = [True, False, True, False, True, False, True]


class CentreModel(torch.nn.Module):
    """Predicts the class whose colour is nearest to the centre pixel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.tensor(COLOURS, dtype=torch.float32) / 255)

    def forward(self, pixel_values):
        px = pixel_values[:, :, R // 2, R // 2]
        return ImageClassifierOutputWithNoAttention(logits=-torch.cdist(px, self.table))


def _on_black(colour, box):
    img = np.zeros((R, R, 3), np.uint8)
    y0, y1, x0, x1 = box
    img[y0:y1, x0:x1] = COLOURS[colour]
    return img


def _background(cls, k):
    rng = np.random.default_rng(100 + k)
    img = rng.integers(60, 120, (R, R, 3)).astype(np.uint8)
    img[3:6, 3:6] = COLOURS[cls]
    return img


def _paste(fg, bg):
    return np.where((fg > 10).any(-1, keepdims=True), fg, bg)


def test_challenge_accuracy_known_answer_any_chunking():
    fgs = np.stack([_on_black(c, box) for _, c, box in FOREGROUNDS])
    masks = (fgs > 10).any(-1)
    labels = np.array([y for y, _, _ in FOREGROUNDS])
    bgs = np.stack([_background(c, k) for k, c in enumerate([0, 0, 1, 2, 2])])
    n, m = len(fgs), len(bgs)
    for batch_size, chunk in [(256, None), (1, 1), (4, 2), (3, 5), (7, 100), (2, 3)]:
        robust, classified = robust_foregrounds(
            CentreModel(), PRE, fgs, masks, labels, bgs, batch_size=batch_size, chunk_size=chunk
        )
        assert robust.tolist() == ROBUST, (batch_size, chunk)
        if chunk == 1:
            assert classified < n * m  # foregrounds already wrong are not pasted again
    # only same-class backgrounds: the corner foreground of class 0 then survives
    robust, _ = robust_foregrounds(CentreModel(), PRE, fgs[:2], masks[:2], labels[:2], bgs[:2], chunk_size=1)
    assert robust.tolist() == [True, True]


@pytest.fixture()
def shipped(tmp_path):
    """Shipped val variants for three classes; no_fg, only_bg_b and mixed_next are missing."""
    root = tmp_path / "bgc"
    dirs = ["00_red", "01_green", "02_blue"]
    for k, (y, colour, box) in enumerate(FOREGROUNDS):
        name = f"{dirs[y]}/img{k}.png"
        fg, own = _on_black(colour, box), _background(y, k)
        other = _background((y + 1 + k % 2) % 3, k + 50)
        _save(root / "original/val" / name, _paste(fg, own))
        _save(root / "only_fg/val" / name, fg)
        _save(root / "only_bg_t/val" / name, own)
        if k != 2:
            _save(root / "mixed_same/val" / name, _paste(fg, _background(y, k + 20)))
        _save(root / "mixed_rand/val" / name, _paste(fg, other))
    _save(root / "mixed_rand/val/01_green/extra.png", _paste(_on_black(1, CENTRE), _background(0, 99)))
    (root / "mixed_rand/val/notes.txt").write_text("not an image in a class folder")
    return root, dirs


def _plain_accuracy(folder, dirs):
    """Accuracy recomputed one file at a time, without the evaluation code."""
    model, right, total = CentreModel(), 0, 0
    for y, d in enumerate(dirs):
        for f in sorted((folder / d).iterdir()):
            x = torch.tensor(np.asarray(Image.open(f).convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
            pred = int(model(pixel_values=x[None] / 255).logits.argmax())
            right += pred == y
            total += 1
    return 100.0 * right / total


def test_evaluate_shipped(shipped, tmp_path):
    root, dirs = shipped
    r = evaluate_shipped(CentreModel(), PRE, root, batch_size=3, progress=False)
    acc = r["accuracy"]
    assert set(acc) == {"original", "only_fg", "only_bg_t", "mixed_same", "mixed_rand"}
    for v in acc:
        assert acc[v] == pytest.approx(_plain_accuracy(root / v / "val", dirs)), v
    assert acc["original"] == pytest.approx(100 * 6 / 7)
    assert r["bg_gap"] == pytest.approx(acc["mixed_same"] - acc["mixed_rand"])
    d = r["details"]
    assert d["missing_variants"] == ["no_fg", "only_bg_b", "mixed_next"]
    assert d["classes"] == ["red", "green", "blue"]
    assert d["num_images"]["mixed_same"] == 6 and d["num_images"]["mixed_rand"] == 8
    assert d["file_mismatch"] == {
        "mixed_same": {"not_in_original": 0, "missing_from_variant": 1, "examples": ["01_green/img2"]},
        "mixed_rand": {"not_in_original": 1, "missing_from_variant": 0, "examples": ["01_green/extra"]},
    }
    assert d["not_in_a_class_folder"]["mixed_rand"]["count"] == 1
    # challenge accuracy: 4 of 7 foregrounds survive all 7 only_bg_t backgrounds
    assert r["challenge_accuracy"] == pytest.approx(100 * 4 / 7)
    assert d["challenge_pool"] == 7 and d["challenge_robust_foregrounds"] == 4
    assert r["worst_group_accuracy"] is None or isinstance(r["worst_group_accuracy"], float)
    # a subsampled pool, tiny chunks: the same answer here (every class keeps one background)
    small = evaluate_shipped(
        CentreModel(),
        PRE,
        root,
        batch_size=2,
        chunk_size=1,
        progress=False,
        pool_per_class=1,
        min_group_size=1,
    )
    assert small["details"]["challenge_pool"] == 3
    assert small["challenge_accuracy"] == pytest.approx(100 * 4 / 7)
    # groups (label, own class) of original + mixed_same: red 4/4, green 1/3 (img3 is blue), blue 6/6
    assert small["worst_group_accuracy"] == pytest.approx(100 / 3)
    assert small["details"]["groups"]["1,1"] == {"n": 3, "accuracy": pytest.approx(100 / 3)}
    write_shipped_report(r, tmp_path / "report")
    assert json.loads((tmp_path / "report/report.json").read_text())["challenge_accuracy"] == pytest.approx(
        100 * 4 / 7
    )
    assert (tmp_path / "report/report.md").is_file() and (tmp_path / "report/report.png").is_file()
    only = evaluate_shipped(CentreModel(), PRE, root, variants=["original", "mixed_next"], progress=False)
    assert only["challenge_accuracy"] is None and only["bg_gap"] is None
    assert only["details"]["missing_variants"] == ["mixed_next"]


def test_evaluate_cli_on_shipped_variants(shipped, tmp_path, monkeypatch, capsys):
    import debias.models
    from debias.evaluate import cli

    root, _ = shipped
    monkeypatch.setattr(debias.models, "load_classifier", lambda path: (CentreModel(), PRE))
    out = tmp_path / "eval"
    assert cli(["--model", "centre", "--bgchallenge", str(root), "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["challenge_accuracy"] == pytest.approx(100 * 4 / 7)  # the full pool by default
    assert report["details"]["challenge_pool"] == 7 and report["model"] == "centre"
    # one of --dataset / --bgchallenge, not both, not neither
    assert cli(["--model", "centre", "--output", str(out)]) == 2
    assert "exactly one of --dataset" in capsys.readouterr().err
