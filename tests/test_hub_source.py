"""The Hugging Face dataset source: local folders in the Hub's parquet layout (and an image folder) read
with datasets.load_dataset, ClassLabel / string / integer labels, group column -> bg_label, masks, and
a run of the real pipeline from it."""

import io
import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

from augment.dataset import load_rejected
from augment.pipeline import GenerateConfig, run
from augment.sources import RejectedInput, build_source
from augment.sources.hub import HubSource

SIZE = 24


def _png(colour, size=(SIZE, SIZE), mode="RGB") -> dict:
    img = Image.new(mode, size, colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _object_image(i: int, label: int) -> dict:
    img = Image.new("RGB", (SIZE, SIZE), (40 + 50 * (i % 3), 120, 30 * label))
    img.paste((250, 20 + 100 * label, 20), (6, 6, 16, 16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _mask(size=(SIZE, SIZE)) -> dict:
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[6:16, 6:16] = 1  # non-zero = object
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _write(folder, split: str, columns: dict, features: Features) -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=features).to_parquet(
        str(folder / "data" / f"{split}-00000-of-00001.parquet")
    )


BIRDS = Features(
    {
        "image": ImageFeature(),
        "mask": ImageFeature(),
        "label": ClassLabel(names=["landbird", "waterbird"]),
        "place": Value("string"),
    }
)


@pytest.fixture()
def birds(tmp_path):
    """A Waterbirds-like folder: ClassLabel labels, a string place column, masks; split 'val'."""
    folder = tmp_path / "birds"
    n = 8
    labels = [i % 2 for i in range(n)]
    places = ["land" if (i % 4) < 2 else "water" for i in range(n)]
    train = {
        "image": [_object_image(i, y) for i, y in enumerate(labels)],
        "mask": [_mask() for _ in range(n)],
        "label": labels,
        "place": places,
    }
    train["mask"][3] = _mask(size=(12, 12))  # wrong size: rejected at stage mask
    train["image"][5] = {"bytes": b"not an image at all", "path": None}  # undecodable: stage read
    _write(folder, "train", train, BIRDS)
    val = {
        "image": [_object_image(i, i % 2) for i in range(4)],
        "mask": [_mask() for _ in range(4)],
        "label": [0, 1, 0, 1],
        "place": ["land", "water", "water", "land"],
    }
    _write(folder, "val", val, BIRDS)
    return folder, labels, places


def test_classlabel_group_and_masks(birds):
    folder, labels, places = birds
    src = HubSource(str(folder), mask_column="mask", group_column="place")
    assert src.class_names == ["landbird", "waterbird"]
    assert src.splits() == ["train", "validation"]  # 'val' is read as validation
    assert src.size("train") == 8 and src.size("validation") == 4
    # the label column alone: the undecodable image of row 5 does not matter here
    assert src.labels("train").tolist() == labels
    s = src.load("train", 2)
    assert s.id == "hub/train/2" and s.label == 0 and s.image.mode == "RGB" and s.image.size == (SIZE, SIZE)
    assert s.bg_label == 1  # place 'water' -> index 1 of the sorted places
    assert s.mask.mode == "L" and set(np.unique(np.asarray(s.mask)).tolist()) == {0, 255}
    assert int((np.asarray(s.mask) == 255).sum()) == 100
    assert s.meta["recipe"] == {"hub": str(folder), "revision": None, "split": "train", "row": 2}
    with pytest.raises(RejectedInput) as e:
        src.load("train", 3)
    assert e.value.stage == "mask" and "12x12" in e.value.reason and "row 3" in e.value.reason
    with pytest.raises(RejectedInput) as e:
        src.load("train", 5)
    assert e.value.stage == "read" and "row 5" in e.value.reason
    d = src.describe()
    assert d["source"] == "hub" and d["groups"] == {"land": 0, "water": 1}
    assert d["split_names"] == {"train": "train", "validation": "val"} and d["label_type"] == "classlabel"
    only_val = HubSource(str(folder), splits=["validation"])
    assert only_val.splits() == ["validation"] and only_val.load("validation", 0).mask is None


def test_string_and_integer_labels_and_classes(tmp_path):
    folder = tmp_path / "strings"
    feats = Features({"img": ImageFeature(), "species": Value("string"), "site": Value("int32")})
    _write(
        folder,
        "train",
        {
            "img": [_object_image(i, 0) for i in range(5)],
            "species": ["gull", "crow", "gull", "owl", "crow"],
            "site": [0, 1, 1, 0, 2],
        },
        feats,
    )
    src = HubSource(str(folder), image_column="img", label_column="species", group_column="site")
    assert src.class_names == ["crow", "gull", "owl"]  # sorted distinct strings
    assert src.labels("train").tolist() == [1, 0, 1, 2, 0]
    assert [src.load("train", i).bg_label for i in range(5)] == [0, 1, 1, 0, 2]  # integers as they are
    picked = HubSource(str(folder), image_column="img", label_column="species", classes=["owl", "gull"])
    assert picked.class_names == ["owl", "gull"] and picked.labels("train").tolist() == [1, -1, 1, 0, -1]
    with pytest.raises(RejectedInput) as e:
        picked.load("train", 1)
    assert e.value.stage == "label" and "crow" in e.value.reason
    as_int = HubSource(str(folder), image_column="img", label_column="site")
    assert as_int.class_names == ["0", "1", "2"] and as_int.labels("train").tolist() == [0, 1, 1, 0, 2]
    with pytest.raises(ValueError, match="not classes"):
        HubSource(str(folder), image_column="img", label_column="species", classes=["eagle"])


def test_missing_columns_and_splits_are_clear_errors(birds):
    folder, _, _ = birds
    with pytest.raises(ValueError) as e:
        HubSource(str(folder), image_column="picture", group_column="habitat")
    msg = str(e.value)
    assert "'picture'" in msg and "'habitat'" in msg and "['image', 'mask', 'label', 'place']" in msg
    with pytest.raises(ValueError, match="no split"):
        HubSource(str(folder), splits=["test"])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        HubSource(str(folder / "nope"))


def test_image_folder_layout(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 12), colour).save(root / split / c / f"{c}{i}.png")
    src = build_source("hub", data_dir=str(root))
    assert src.class_names == ["cat", "dog"] and src.splits() == ["train", "test"]
    s = src.load("test", 3)
    assert s.label == 1 and s.image.size == (16, 12) and s.image.getpixel((0, 0)) == (10, 10, 200)


def test_pipeline_from_a_hub_folder(birds, tmp_path):
    folder, labels, places = birds
    out = tmp_path / "out"
    summary = run(
        GenerateConfig(
            output=str(out),
            source="hub",
            data_dir=str(folder),
            mask_column="mask",
            group_column="place",
            progress=False,
        )
    )
    assert summary["inputs"] == 12 and summary["originals"] == 10 and summary["rejected_inputs"] == 2
    ds = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))  # not a same-named folder's cache
    train = ds["train"]
    originals = {r["id"]: r for r in train if r["kind"] == "original"}
    assert set(originals) == {f"hub/train/{i}" for i in range(8) if i not in (3, 5)}
    for rid, r in originals.items():
        i = int(rid.rsplit("/", 1)[1])
        assert r["label"] == labels[i] and r["bg_label"] == {"land": 0, "water": 1}[places[i]]
        recipe = json.loads(r["recipe"])
        assert recipe["hub"] == str(folder) and recipe["row"] == i and recipe["generator"] == "source"
    assert train["kind"].count("positive") > 0  # masks given, so counterfactuals were made
    assert ds["validation"]["bg_label"] == [0, 1, 1, 0]
    rejected = {r["id"]: r for r in load_rejected(out)["train"]}
    assert rejected["hub/train/3"]["stage"] == "mask" and rejected["hub/train/5"]["stage"] == "read"
    settings = json.loads((out / "generation.json").read_text())
    assert settings["source"] == "hub" and settings["groups"] == {"land": 0, "water": 1}


def test_group_values_must_be_class_indices(tmp_path):
    folder = tmp_path / "groups"
    feats = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"]), "g": Value("int64")})
    _write(folder, "train", {"image": [_png((1, 2, 3))] * 3, "label": [0, 1, 0], "g": [0, 1, 5]}, feats)
    with pytest.raises(ValueError, match="bg_label must be a class index 0..1"):
        HubSource(str(folder), group_column="g")
