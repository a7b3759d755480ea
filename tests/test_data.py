"""Training items: stored positives and negatives by source_id, composites on the fly, clear refusals."""

from argparse import Namespace

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from augment.pipeline import GenerateConfig, run
from debias.data import CounterfactualTrainSet
from debias.train import get_dataloaders


def test_items_pair_each_anchor_with_its_own_rows(tiny_dataset):
    ds = load_dataset(str(tiny_dataset))["train"]
    ts = CounterfactualTrainSet(ds, 32, max_negatives=2)
    ids = ds["id"]
    for k in range(len(ts)):
        anchor_id = ids[int(ts.index.originals[k])]
        assert [ids[r] for r in ts.index.positives[k]] == [f"{anchor_id}/positive/0"]
        assert sorted(ids[r] for r in ts.index.negatives[k]) == [
            f"{anchor_id}/negative/0",
            f"{anchor_id}/negative/1",
        ]
    item = ts[3]
    row = ds[int(ts.index.positives[3][0])]
    assert np.array_equal(item["positive"].permute(1, 2, 0).numpy(), np.asarray(row["image"]))
    assert item["has_positive"] and int(item["positive_bg"]) == row["bg_label"]
    assert item["negatives"].shape == (2, 3, 32, 32) and item["negative_valid"].all()


def test_a_subset_of_stored_negatives_is_drawn_per_epoch(tiny_dataset):
    ds = load_dataset(str(tiny_dataset))["train"]
    ts = CounterfactualTrainSet(ds, 32, max_negatives=1)
    ts.warm()
    chosen = set()
    for epoch in range(6):
        ts.set_epoch(epoch)
        item = ts[0]
        assert item["negatives"].shape == (1, 3, 32, 32) and item["negative_valid"].all()
        own = [ts.store.image(r) for r in ts.index.negatives[0]]
        matches = [i for i, t in enumerate(own) if np.array_equal(t.numpy(), item["negatives"][0].numpy())]
        assert len(matches) == 1  # always one of the anchor's own negatives
        chosen.add(matches[0])
    assert chosen == {0, 1}  # both are used over the epochs


def test_positives_are_composited_on_the_fly_when_none_are_stored(tmp_path):
    out = tmp_path / "plain"
    run(
        GenerateConfig(
            output=str(out),
            num_classes=3,
            image_size=32,
            train_per_class=4,
            validation_per_class=0,
            test_per_class=0,
            num_positives=0,
            negatives=[],
            progress=False,
        )
    )
    ds = load_dataset(str(out))["train"]
    ts = CounterfactualTrainSet(ds, 32, need_negatives=False)
    assert ts.on_the_fly == len(ts) == 12
    for k in range(len(ts)):
        item = ts[k]
        row = ds[int(ts.index.originals[k])]
        m = np.asarray(row["mask"]) > 127
        pos = item["positive"].permute(1, 2, 0).numpy()
        assert item["has_positive"]
        assert np.array_equal(pos[m], np.asarray(row["image"])[m])  # the object, exactly
        assert not np.array_equal(pos[~m], np.asarray(row["image"])[~m])  # on another background
    first = [ts[k]["positive"].clone() for k in range(len(ts))]
    assert all(
        np.array_equal(a.numpy(), ts[k]["positive"].numpy()) for k, a in enumerate(first)
    )  # same epoch, same draw
    ts.set_epoch(1)
    assert any(
        not np.array_equal(a.numpy(), ts[k]["positive"].numpy()) for k, a in enumerate(first)
    )  # redrawn per epoch


def test_contrastive_method_without_positives_or_masks_is_refused(tmp_path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (i * 90, 40, 200)).save(root / "train" / c / f"{i}.png")
    out = tmp_path / "ds"
    run(GenerateConfig(output=str(out), source="folder", data_dir=str(root), progress=False))
    args = Namespace(
        dataset=str(out),
        method="clad",
        seed=0,
        max_stored_negatives=2,
        cache_gb=1.0,
        batch_size=2,
        num_workers=0,
        val_limit=None,
    )
    with pytest.raises(ValueError, match="needs positives"):
        get_dataloaders(args, load_dataset(str(out)), 16)
    args.method = "erm"
    loader, train_set, val = get_dataloaders(args, load_dataset(str(out)), 16)
    assert len(train_set) == 4 and val is None
