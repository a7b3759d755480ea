"""Diffusion counterfactuals inside the generation job, with tiny pipelines loaded from folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from augment.dataset import load_counterfactual_dataset, load_rejected
from augment.filters import FilterConfig
from augment.pipeline import GenerateConfig, run
from augment.tiny_diffusion import build_tiny_diffusion
from tests.conftest import TINY_GENERATE

SMALL = {
    **TINY_GENERATE,
    "image_size": 64,
    "train_per_class": 3,
    "validation_per_class": 1,
    "test_per_class": 1,
}
OPEN = FilterConfig(black=False)
FAST = {"steps": 2, "diffusion_batch_size": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    return {
        "inpaint": build_tiny_diffusion(root / "inpaint", kind="inpaint"),
        "instruct": build_tiny_diffusion(root / "ip2p", kind="instruct-pix2pix"),
        "img2img": build_tiny_diffusion(root / "img2img", kind="img2img"),
    }


def rows_by_id(out):
    ds = load_counterfactual_dataset(out)["train"]
    return {r["id"]: r for r in ds}


def test_inpaint_positives_and_negatives(tmp_path, pipes):
    out = tmp_path / "ds"
    summary = run(
        GenerateConfig(
            output=str(out),
            positives="inpaint",
            negatives=["inpaint"],
            inpaint_model=pipes["inpaint"],
            filters=OPEN,  # random weights may decode to dark images; the filter is tested below
            **FAST,
            **SMALL,
        )
    )
    rows = rows_by_id(out)
    rejected = [r for split in load_rejected(out).values() for r in split]
    originals = [r for r in rows.values() if r["kind"] == "original"]
    assert len(originals) == 9
    made = {r["id"] for r in rows.values() if r["kind"] != "original"}
    refused = {r["id"] for r in rejected}
    # every planned derived row is a row or a recorded rejection
    planned = {f"{o['id']}/{kind}" for o in originals for kind in ("positive/0", "negative/0", "negative/1")}
    assert made | refused == planned and not (made & refused)
    for rid in made:
        r = rows[rid]
        rec = json.loads(r["recipe"])
        anchor = rows[r["source_id"]]
        assert rec["generator"] == "inpaint" and rec["model"] == pipes["inpaint"]
        assert rec["steps"] == 2 and isinstance(rec["seed"], int) and rec["prompt"]
        mask = np.asarray(anchor["mask"]) > 0
        if r["kind"] == "positive":
            assert rec["operation"] == "positive" and r["label"] == anchor["label"]
            # the object's pixels are the anchor's, exactly
            assert np.array_equal(np.asarray(r["image"])[mask], np.asarray(anchor["image"])[mask])
            # the synthetic source has no alt phrases, so the new background is another class's
            assert r["bg_label"] != anchor["label"] and rec["prompt"].startswith("a photo of ")
        elif rec["negative"] == "remove":
            assert r["label"] == -1 and r["bg_label"] == anchor["bg_label"]
        else:
            assert rec["negative"] == "replace" and r["label"] not in (-1, anchor["label"])
    settings = json.loads((out / "generation.json").read_text())
    assert settings["generators"]["positives"]["model"] == pipes["inpaint"]
    assert summary["originals"] == 15


def test_edit_positives_instruct_and_img2img(tmp_path, pipes):
    out = tmp_path / "ip2p"
    run(
        GenerateConfig(
            output=str(out),
            positives="edit",
            edit_model=pipes["instruct"],
            negatives=[],
            filters=OPEN,
            **FAST,
            **SMALL,
        )
    )
    rows = rows_by_id(out)
    positives = [r for r in rows.values() if r["kind"] == "positive"]
    assert positives
    for r in positives:
        rec = json.loads(r["recipe"])
        anchor = rows[r["source_id"]]
        mask = np.asarray(anchor["mask"]) > 0
        assert rec["generator"] == "instruct-pix2pix" and "turn the background of" in json.dumps(rec)
        assert np.array_equal(np.asarray(r["image"])[mask], np.asarray(anchor["image"])[mask])
    out = tmp_path / "img2img"
    run(
        GenerateConfig(
            output=str(out),
            positives="edit",
            edit_kind="img2img",
            img2img_model=pipes["img2img"],
            strengths=[0.5, 1.0],
            negatives=[],
            filters=OPEN,
            **FAST,
            **SMALL,
        )
    )
    rows = rows_by_id(out)
    for o in [r for r in rows.values() if r["kind"] == "original"]:
        got = sorted(json.loads(rows[f"{o['id']}/positive/{k}"]["recipe"])["strength"] for k in (0, 1))
        assert got == [0.5, 1.0]


def test_filter_refusals_are_recorded(tmp_path, pipes):
    from augment.filters import FilterConfig

    out = tmp_path / "black"
    strict = FilterConfig(black_mean=256.0)  # above white: every generated image is "black"
    config = GenerateConfig(
        output=str(out),
        positives="inpaint",
        negatives=[],
        inpaint_model=pipes["inpaint"],
        filters=strict,
        **FAST,
        **SMALL,
    )
    run(config)
    rows = rows_by_id(out)
    assert not [r for r in rows.values() if r["kind"] == "positive"]
    rejected = [r for split in load_rejected(out).values() for r in split if r["stage"] == "filter"]
    train = [o["id"] for o in rows.values() if o["kind"] == "original"]
    assert sorted(r["id"] for r in rejected) == sorted(f"{i}/positive/0" for i in train)
    assert all("black image (mean " in r["reason"] and r["reason"].endswith("< 256)") for r in rejected)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["generators"]["filters"]["black"]["mean_below"] == 256.0
