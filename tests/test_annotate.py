"""The language stage inside the generation job: captions, phrases, recipes, card, rejections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from augment.dataset import load_counterfactual_dataset, load_rejected
from augment.pipeline import GenerateConfig, run
from augment.tiny import build_tiny_captioner, build_tiny_chat_llm
from tests.conftest import TINY_GENERATE

SMALL = {**TINY_GENERATE, "train_per_class": 4, "validation_per_class": 2, "test_per_class": 2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        # random captioners: seed 1 says "on sea on grass ..." (the parser finds a background),
        # seed 2 says "cat of photo" (it finds none)
        "captioner": build_tiny_captioner(root / "blip", seed=1),
        "captioner-no-background": build_tiny_captioner(root / "blip2", seed=2),
        "llm": build_tiny_chat_llm(root / "llm"),
    }


def recipes(ds):
    return [json.loads(r) for r in ds["recipe"]]


def test_default_run_fills_phrases_with_the_caption_parser(tiny_dataset):
    ds = load_counterfactual_dataset(tiny_dataset)["train"]
    rows = ds.select_columns(["kind", "caption", "bg_phrases", "fg_phrases", "recipe", "id", "source_id"])
    by_id = {r["id"]: r for r in rows}
    originals = [r for r in rows if r["kind"] == "original"]
    assert originals
    for r in originals:
        rec = json.loads(r["recipe"])
        assert rec["extract"] == {"method": "caption-parser"}
        assert rec["caption"] == {"origin": "dataset"} and rec["mask"] == {"source": "given"}
        # the synthetic caption is "a photo of a {object} on {background}": the parser takes the background
        assert r["bg_phrases"] == [r["caption"].split(" on ", 1)[1]] and r["fg_phrases"] == []
    for r in rows:
        if r["kind"] == "original":
            continue
        rec = json.loads(r["recipe"])
        # a derived row carries the background phrases of the image whose background it shows
        bg_from = by_id[rec["background_source_id"]]
        assert r["bg_phrases"] == bg_from["bg_phrases"], r["id"]


@pytest.mark.parametrize(
    "captioner,outcome",
    [("captioner", "caption-parser-fallback"), ("captioner-no-background", "rejected")],
)
def test_captioner_and_garbage_llm_through_the_job(tmp_path, tiny_models, captioner, outcome):
    out = tmp_path / "ds"
    summary = run(
        GenerateConfig(
            output=str(out),
            captioner=tiny_models[captioner],
            llm=tiny_models["llm"],
            llm_max_new_tokens=16,
            llm_max_repairs=1,
            device="cpu",
            chunk_size=5,  # several rounds per split
            **SMALL,
        )
    )
    assert summary["originals"] == summary["inputs"] == 3 * (4 + 2 + 2)
    ds = load_counterfactual_dataset(out)
    rejected = load_rejected(out)
    extract_rejections = {
        r["id"]: r["reason"] for split in rejected for r in rejected[split] if r["stage"] == "extract"
    }
    methods = {}
    for split in ds:
        for row, rec in zip(ds[split], recipes(ds[split]), strict=True):
            if row["kind"] != "original":
                continue
            # every caption came from the model, or (empty answer) from the dataset, and says so
            assert rec["caption"]["origin"] in ("model", "model-empty:dataset")
            if rec["caption"]["origin"] == "model":
                assert rec["caption"]["model"] == tiny_models[captioner]
            m = rec["extract"]["method"]
            methods[row["id"]] = m
            # a random LLM: never a crash or a silent drop; each item ends as phrases, a fallback or a rejection
            assert m in ("llm", "llm-repaired", "caption-parser-fallback", "rejected")
            if m.startswith("llm"):
                assert rec["extract"]["model"] == tiny_models["llm"]
            if m == "caption-parser-fallback":
                assert "LLM answer invalid after 2 attempts" in rec["extract"]["error"]
            if m == "rejected":
                assert row["id"] in extract_rejections
                assert row["fg_phrases"] == row["bg_phrases"] == []
    assert len(methods) == 24
    # the random LLM never answers well; the caption decides between fallback and rejection
    assert set(methods.values()) == {outcome}
    if outcome == "rejected":
        reason = next(iter(extract_rejections.values()))
        assert "LLM answer invalid" in reason and "caption parser" in reason
    assert set(extract_rejections) == {i for i, m in methods.items() if m == "rejected"}
    settings = json.loads((out / "generation.json").read_text())["annotation"]
    assert settings["caption"]["model"] == tiny_models[captioner]
    assert settings["extract"]["model"] == tiny_models["llm"] and settings["extract"]["max_repairs"] == 1
    assert settings["extract"]["template"] == "extract_v1"
    assert tiny_models["llm"] in (out / "README.md").read_text()


def test_missing_model_folder_is_a_clear_error_before_writing(tmp_path):
    from augment.pipeline import cli

    out = tmp_path / "ds"
    code = cli(
        ["--output", str(out), "--llm", str(tmp_path / "no-such-model"), "--no-progress", "--limit", "3"]
    )
    assert code == 2
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# masks: SAM and grounded SAM inside the job
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory):
    from augment.tiny import build_tiny_owlv2, build_tiny_sam

    root = tmp_path_factory.mktemp("vision")
    return {"sam": build_tiny_sam(root / "sam"), "owlv2": build_tiny_owlv2(root / "owlv2")}


def originals_with_recipes(out):
    ds = load_counterfactual_dataset(out)
    found = {}
    for split in ds:
        for row in ds[split]:
            if row["kind"] == "original":
                found[row["id"]] = (split, row, json.loads(row["recipe"]))
    return ds, found


def rejections(out, stage=None):
    rej = load_rejected(out)
    return [r for split in rej for r in rej[split] if stage is None or r["stage"] == stage]


def test_sam_mode_through_generate_py_boxes_from_the_given_masks(tmp_path, tiny_vision):
    from augment.segment import box_from_mask
    from augment.sources import build_source
    from tests.conftest import python_script, run_script

    out = tmp_path / "ds"
    args = ["--output", str(out), "--num-classes", "3", "--image-size", "32", "--no-progress"]
    args += ["--train-per-class", "4", "--validation-per-class", "2", "--test-per-class", "2"]
    args += ["--mask-source", "sam", "--sam", tiny_vision["sam"], "--device", "cpu"]
    proc = run_script(python_script("generate.py", *args))
    summary = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert summary["originals"] == summary["inputs"] == 24
    source = build_source("synthetic", num_classes=3, image_size=32, train_per_class=4)
    _, originals = originals_with_recipes(out)
    seg_rejected = {r["id"]: r["reason"] for r in rejections(out, "segment")}
    assert len(originals) == 24
    for item_id, (split, row, rec) in originals.items():
        mask_rec = rec["mask"]
        assert mask_rec["source"] == "sam" and mask_rec["sam"]["model"] == tiny_vision["sam"]
        assert mask_rec["box_source"] == "given-mask"
        given = np.asarray(source.load(split, int(item_id.rsplit("/", 1)[1])).mask) > 0
        assert mask_rec["boxes"] == [[round(v, 1) for v in box_from_mask(given)]]
        if row["mask"] is None:  # a random SAM: its mask may fail the area bounds; then it is recorded
            assert item_id in seg_rejected and "mask" in seg_rejected[item_id]
            assert "error" in mask_rec
        else:
            assert item_id not in seg_rejected
            area = (np.asarray(row["mask"]) > 0).mean()
            assert 0.005 <= area <= 0.95 and abs(area - mask_rec["area"]) < 1e-3
    # no second rejection for the counterfactuals of an image whose mask failed
    assert not any(r["id"] in seg_rejected for r in rejections(out, "composite"))
    card = json.loads((out / "generation.json").read_text())["annotation"]["segment"]
    assert card["mode"] == "sam" and card["sam"]["model"] == tiny_vision["sam"]


def test_grounded_threshold_above_every_score_rejects_each_image_once(tmp_path, tiny_vision):
    out = tmp_path / "ds"
    summary = run(
        GenerateConfig(
            output=str(out),
            mask_source="grounded",
            sam=tiny_vision["sam"],
            detector=tiny_vision["owlv2"],
            box_threshold=1.5,  # sigmoid scores never reach it
            device="cpu",
            **SMALL,
        )
    )
    assert summary["originals"] == 24 and summary["splits"]["train"] == {"original": 12}
    rej = rejections(out)
    assert sorted(r["id"] for r in rej) == sorted({r["id"] for r in rej})  # once each
    assert len(rej) == 24 and {r["stage"] for r in rej} == {"segment"}
    _, originals = originals_with_recipes(out)
    for item_id, (_, row, _) in originals.items():
        assert row["mask"] is None
        obj = row["caption"].split(" on ")[0].removeprefix("a photo of a ")
        reason = next(r["reason"] for r in rej if r["id"] == item_id)
        assert f"detector found no box for '{obj}'" in reason and "< 1.5" in reason


class _PhraseParser:
    """A stand-in extractor that names two foreground phrases for every image."""

    def __call__(self, captions, labels, progress=False):
        from augment.extract import Extraction

        return [Extraction(foreground=["stripes", "dots"], background=["wall"]) for _ in captions]

    def describe(self):
        return {"extractor": "test-phrases"}


def test_grounded_masks_and_phrase_masks_reach_the_dataset(tmp_path, tiny_vision, monkeypatch):
    from datasets import load_dataset

    import augment.annotate

    monkeypatch.setattr(augment.annotate, "CaptionParser", _PhraseParser)
    out = tmp_path / "ds"
    summary = run(
        GenerateConfig(
            output=str(out),
            mask_source="grounded",
            sam=tiny_vision["sam"],
            detector=tiny_vision["owlv2"],
            box_threshold=0.0,
            max_boxes=2,
            min_mask_area=0.0001,
            max_mask_area=1.0,
            device="cpu",
            **SMALL,
        )
    )
    assert summary["originals"] == 24
    ds, originals = originals_with_recipes(out)
    seg_rejected = {r["id"] for r in rejections(out, "segment")}
    for item_id, (_, row, rec) in originals.items():
        assert (
            rec["mask"]["box_source"] == "detector"
            and rec["mask"]["detector"]["model"] == tiny_vision["owlv2"]
        )
        assert 1 <= len(rec["mask"]["boxes"]) <= 2 and len(rec["mask"]["box_scores"]) == len(
            rec["mask"]["boxes"]
        )
        assert (row["mask"] is None) == (item_id in seg_rejected)
        assert row["fg_phrases"] == ["stripes", "dots"]
    phrases = load_dataset(str(out), "phrase_masks")
    rows = [r for split in phrases for r in phrases[split]]
    assert rows and summary["phrase_masks"] == {s: len(phrases[s]) for s in phrases}
    for r in rows:
        assert r["id"] in originals and r["phrase"] in ("stripes", "dots")
        image = originals[r["id"]][1]["image"]
        assert r["mask"].mode == "L" and r["mask"].size == image.size
        assert 1 <= len(r["boxes"]) <= 2 and len(r["scores"]) == len(r["boxes"])
    # at threshold 0 every query has boxes, so every image gets a mask for both of its phrases
    assert len(rows) == 2 * 24
    assert "phrase_masks" in (out / "README.md").read_text()
