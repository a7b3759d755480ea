"""The dataset folder: a real load_dataset round trip, the schema, the card, the preview, ids."""

import json

import numpy as np
import pytest
import yaml
from datasets import load_dataset

from augment.dataset import DatasetWriter, Row, load_rejected
from augment.pipeline import GenerateConfig, run
from tests.conftest import TINY_GENERATE


def test_round_trip_features_and_counts(tiny_dataset):
    ds = load_dataset(str(tiny_dataset))
    assert set(ds) == {"train", "validation", "test"}
    train = ds["train"]
    assert train.features["label"].names == ["circle", "square", "triangle"]
    kinds = train["kind"]
    assert kinds.count("original") == 24 and kinds.count("positive") == 24 and kinds.count("negative") == 48
    assert set(ds["test"]["kind"]) == {"original"} and len(ds["test"]) == 18
    row = train[0]
    assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
    assert row["mask"].mode == "L"
    assert isinstance(json.loads(row["recipe"]), dict)
    assert len(set(train["id"])) == len(train)  # ids unique


def test_positive_pixels_survive_the_round_trip(tiny_dataset):
    train = load_dataset(str(tiny_dataset))["train"]
    by_id = {r["id"]: r for r in train}
    checked = 0
    for r in by_id.values():
        if r["kind"] != "positive":
            continue
        src = by_id[r["source_id"]]
        m = np.asarray(src["mask"]) > 127
        assert np.array_equal(np.asarray(r["image"])[m], np.asarray(src["image"])[m])
        recipe = json.loads(r["recipe"])
        bg_src = by_id[recipe["background_source_id"]]
        assert bg_src["label"] != src["label"]  # the background comes from another class
        assert r["bg_label"] == bg_src["bg_label"] and r["label"] == src["label"]
        checked += 1
    assert checked == 24


def test_negatives_share_the_anchor_background(tiny_dataset):
    train = load_dataset(str(tiny_dataset))["train"]
    by_id = {r["id"]: r for r in train}
    for r in by_id.values():
        if r["kind"] != "negative":
            continue
        src = by_id[r["source_id"]]
        recipe = json.loads(r["recipe"])
        assert r["bg_label"] == src["bg_label"]
        if recipe["negative"] == "remove":
            assert r["label"] == -1 and not (np.asarray(r["mask"]) > 127).any()
        else:
            assert r["label"] != src["label"] and r["label"] >= 0
            assert by_id[recipe["object_source_id"]]["label"] == r["label"]


def test_generation_is_deterministic(tmp_path, tiny_dataset):
    out = tmp_path / "again"
    run(GenerateConfig(output=str(out), **TINY_GENERATE))
    a = load_dataset(str(tiny_dataset))["train"]
    b = load_dataset(str(out))["train"]
    assert a["id"] == b["id"]
    for i in (0, 5, 17, 40):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))


def test_card_preview_and_rejected(tiny_dataset):
    text = (tiny_dataset / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["default", "rejected"]
    assert "| train | 24 | 24 | 48 | 0 | 0 |" in text
    assert (tiny_dataset / "preview.png").stat().st_size > 1000
    settings = json.loads((tiny_dataset / "generation.json").read_text())
    assert settings["source"] == "synthetic" and settings["rho"] == 0.95
    rejected = load_rejected(tiny_dataset)
    assert set(rejected) == {"train", "validation", "test"} and all(len(v) == 0 for v in rejected.values())
    assert list(rejected["train"].features) == ["id", "split", "stage", "reason"]


def test_writer_refuses_existing_output_and_duplicates(tmp_path, tiny_dataset):
    with pytest.raises(FileExistsError, match="--overwrite"):
        DatasetWriter(tiny_dataset, ["a"])
    w = DatasetWriter(tmp_path / "w", ["a", "b"])
    from PIL import Image

    row = Row(id="x/0", image=Image.new("RGB", (4, 4)), label=0, kind="original", source_id="x/0")
    w.add("train", row)
    with pytest.raises(ValueError, match="duplicate id"):
        w.add("train", row)
    with pytest.raises(ValueError, match="label 5"):
        w.add(
            "train", Row(id="x/1", image=Image.new("RGB", (4, 4)), label=5, kind="original", source_id="x/1")
        )
    with pytest.raises(ValueError, match="mask must be"):
        Row(
            id="x/2",
            image=Image.new("RGB", (4, 4)),
            mask=Image.new("L", (3, 3)),
            label=0,
            kind="original",
            source_id="x/2",
        ).encode()


def test_limit_is_balanced(tmp_path):
    out = tmp_path / "lim"
    summary = run(GenerateConfig(output=str(out), limit=5, **{**TINY_GENERATE, "train_per_class": 10}))
    assert summary["splits"]["train"]["original"] == 5
    labels = load_dataset(str(out))["train"].filter(lambda r: r["kind"] == "original")["label"]
    assert sorted(np.bincount(labels).tolist()) == [1, 2, 2]
