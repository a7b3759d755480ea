"""Spurious-feature discovery on a constructed case where the classifier provably uses one phrase.

Two classes at 32 px. Every "cardinal" has a pure red patch (phrases "red patch" / "red patches" /
"the red patch") and a "blue dot"; two of the six cardinals are themselves red. Every "jay" has a blue
dot and a "green leaf", and nothing red. The classifier is a fixed-weight small ResNet whose
"cardinal" logit is 100 x the share of pure red pixels and whose "jay" logit is a constant 1, so its
prediction depends on nothing but the red pixels: removing the red patch flips the four non-red
cardinals (score 4/6, spurious), removing anything else flips nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment.dataset import DatasetWriter, Row, load_counterfactual_dataset, load_rejected
from augment.discover import (
    CompositeRemover,
    DiscoverConfig,
    PhraseEncoder,
    cli,
    group_phrases,
    jaccard,
    names_class,
    normalize_phrase,
    run,
    score_groups,
    singularize,
)
from augment.imageops import mask_image
from augment.seeding import item_seed
from augment.synthesize.output import CounterfactualOutput

SIZE = 32
CLASSES = ["cardinal", "jay"]
RED = (255, 0, 0)
PATCH_PHRASES = ["red patch", "red patches", "the red patch"]


def box(y0, y1, x0, x1):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


OBJECT = box(20, 26, 4, 10)
PATCH = box(4, 10, 20, 26)
DOT = box(24, 28, 22, 26)
LEAF = box(4, 9, 20, 25)


def draw(bg, parts):
    arr = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    arr[:] = bg
    for mask, colour in parts:
        arr[mask] = colour
    return Image.fromarray(arr)


def make_red_classifier(path: Path) -> Path:
    """Fixed weights: stem channel 0 = relu(r - g - b - 2) on [-1, 1] inputs (1 for pure red, 0 for
    anything far from it), channel 1 = 0.5; one residual block that passes its input through; mean
    pool; logits = (100 * red share, 2 * 0.5)."""
    from debias.models import (
        Preprocessing,
        SmallResNetConfig,
        SmallResNetForImageClassification,
        save_preprocessing,
    )

    config = SmallResNetConfig(
        widths=(2,),
        depths=(1,),
        stem_stride=1,
        num_labels=2,
        id2label=dict(enumerate(CLASSES)),
        label2id={n: i for i, n in enumerate(CLASSES)},
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
        conv = model.stem[0]
        conv.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
        model.stem[1].bias.copy_(torch.tensor([-2.0, 0.5]))
        model.classifier.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 2.0]]))
    model.save_pretrained(path)
    save_preprocessing(path, Preprocessing(SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    return path


def train_rows():
    """(row, phrase masks) of the train originals."""
    out = []
    for i in range(6):
        red_bird = i >= 4
        bg = (70 + 10 * i, 140, 80)
        image = draw(bg, [(OBJECT, RED if red_bird else (110, 70, 30)), (PATCH, RED), (DOT, (20, 30, 230))])
        phrase = PATCH_PHRASES[i % 3]
        row = Row(
            id=f"toy/train/c{i}",
            image=image,
            mask=mask_image(OBJECT),
            label=0,
            kind="original",
            source_id=f"toy/train/c{i}",
            bg_label=0,
            caption="a photo of a cardinal on grass",
            fg_phrases=[phrase, "blue dot"],
            bg_phrases=["grass"],
            alt_phrases=["snow"],
        )
        out.append((row, {phrase: PATCH, "blue dot": DOT}))
    for i in range(6):
        bg = (60, 120 + 10 * i, 90)
        image = draw(bg, [(OBJECT, (40, 60, 200)), (LEAF, (30, 200, 30)), (DOT, (20, 30, 230))])
        row = Row(
            id=f"toy/train/j{i}",
            image=image,
            mask=mask_image(OBJECT),
            label=1,
            kind="original",
            source_id=f"toy/train/j{i}",
            bg_label=1,
            caption="a photo of a jay in a green field",
            fg_phrases=["green leaf", "blue dot"],
            bg_phrases=["green field"],
            alt_phrases=["red wall"],
        )
        out.append((row, {"green leaf": LEAF, "blue dot": DOT}))
    return out


def write_dataset(path: Path, with_phrase_masks: bool = True) -> Path:
    writer = DatasetWriter(path, CLASSES)
    for row, masks in train_rows():
        writer.add("train", row)
        if with_phrase_masks:
            for phrase, m in masks.items():
                writer.add_phrase_mask("train", row.id, phrase, mask_image(m), [[0, 0, 1, 1]], [0.9])
    # a positive that already exists: the discovered one must take the next index
    existing = train_rows()[4][0]
    writer.add(
        "train",
        Row(
            id=f"{existing.id}/positive/0",
            image=existing.image,
            mask=existing.mask,
            label=0,
            kind="positive",
            source_id=existing.id,
            recipe={"generator": "composite"},
        ),
    )
    writer.add(
        "validation",
        Row(
            id="toy/validation/0",
            image=draw((90, 140, 80), [(PATCH, RED)]),
            label=0,
            kind="original",
            source_id="toy/validation/0",
        ),
    )
    writer.reject("toy/train/x", "train", "segment", "no mask")
    writer.close({"source": "toy"})
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("discover")
    return {
        "dataset": write_dataset(root / "data"),
        "classifier": make_red_classifier(root / "erm"),
        "root": root,
    }


def config(toy, name, **kw) -> DiscoverConfig:
    return DiscoverConfig(
        dataset=str(toy["dataset"]),
        classifier=str(toy["classifier"]),
        output=str(toy["root"] / name),
        progress=False,
        batch_size=5,
        **kw,
    )


class GreyInpainter:
    """Stand-in for InpaintGenerator: paints the dilated mask grey, records its inputs."""

    def __init__(self):
        self.calls = []

    def describe(self):
        return {"generator": "grey-inpaint", "model": "stand-in"}

    def remove(self, images, masks, prompts, seeds):
        from augment.segment import dilate

        self.calls.append((list(prompts), list(seeds)))
        out = []
        for im, m in zip(images, masks):
            arr = np.array(im)
            arr[dilate(np.asarray(m) > 127, 1)] = 128
            out.append(Image.fromarray(arr))
        empty = [Image.new("L", im.size, 0) for im in images]
        return CounterfactualOutput(out, empty, [{"generator": "grey-inpaint", "seed": s} for s in seeds])


class PaintEditor:
    """Stand-in for InstructEditGenerator: everything outside the object mask takes the colour the
    alternative background names (red wall -> red, snow -> white)."""

    COLOURS = {"red wall": RED, "snow": (250, 250, 250)}

    def __init__(self):
        self.calls = []

    def describe(self):
        return {"generator": "paint-editor"}

    def swap_background(self, images, masks, backgrounds, alts, seeds):
        self.calls.append((list(backgrounds), list(alts)))
        out = []
        for im, m, alt in zip(images, masks, alts):
            arr = np.array(im)
            arr[~(np.asarray(m) > 127)] = self.COLOURS[alt]
            out.append(Image.fromarray(arr))
        return CounterfactualOutput(out, list(masks), [{"generator": "paint-editor"} for _ in images])


# ----------------------------------------------------------------------------------------------
# phrases
# ----------------------------------------------------------------------------------------------


def test_singularize_and_normalize():
    assert [singularize(w) for w in ["patches", "trees", "puppies", "leaves", "grass", "bus", "shoes"]] == [
        "patch",
        "tree",
        "puppy",
        "leaf",
        "grass",
        "bus",
        "shoe",
    ]
    assert normalize_phrase("The Red patches") == ("red", "patch")
    assert normalize_phrase("a dog's leash") == ("dog", "leash")
    assert jaccard(("red", "patch"), ("small", "red", "patch")) == pytest.approx(2 / 3)
    assert names_class("the Dogs", "00_dog") and not names_class("dog leash", "00_dog")


def test_grouping_by_word_overlap():
    phrases = ["red patch", "blue dot", "red patches", "the red patch", "small red patch"]
    assert group_phrases(phrases) == [
        ["red patch", "red patches", "the red patch"],
        ["blue dot"],
        ["small red patch"],
    ]
    # Jaccard 2/3 joins at a lower threshold
    assert group_phrases(phrases, threshold=0.6)[0] == [
        "red patch",
        "red patches",
        "the red patch",
        "small red patch",
    ]


def test_score_groups():
    from collections import Counter

    occ = Counter({"red patch": 2, "red patches": 2, "the red patch": 2, "blue dot": 6, "rock": 1})
    flips = Counter({"red patch": 2, "red patches": 1, "the red patch": 1, "rock": 1})
    groups = score_groups(occ, flips, flip_threshold=0.5, min_count=2)
    by_name = {g.name: g for g in groups}
    red = by_name["red patch"]
    assert red.phrases == {"red patch": 2, "red patches": 2, "the red patch": 2}
    assert (red.occurrences, red.flips, red.spurious) == (6, 4, True)
    assert red.score == pytest.approx(4 / 6)
    assert not by_name["blue dot"].spurious and by_name["blue dot"].score == 0
    # one flip out of one: score 1 but below --min-count
    assert by_name["rock"].score == 1 and not by_name["rock"].spurious
    assert groups[0].name == "red patch"


def build_tiny_encoder(path: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "red",
        "patch",
        "blue",
        "dot",
        "green",
        "leaf",
        "small",
    ]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=16)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    BertModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sentence_encoder_grouping(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    path = build_tiny_encoder(tmp_path / "enc")
    encoder = PhraseEncoder.from_pretrained(str(path), device="cpu")
    phrases = ["red patch", "blue dot", "green leaf", "small red patch"]
    emb = encoder.encode(phrases)
    # reference: mean of the last hidden states over the real tokens, unit norm
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    for p, e in zip(phrases, emb):
        with torch.no_grad():
            h = model(**tok(p, return_tensors="pt")).last_hidden_state[0]
        ref = h.mean(0)
        ref = (ref / ref.norm()).numpy()
        np.testing.assert_allclose(e, ref, atol=1e-5)
    sims = emb @ emb.T
    # a threshold just below / above the similarity of the last phrase to the first decides whether it joins
    s = float(sims[0, 3])
    others = max(float(sims[1, 3]), float(sims[2, 3]))
    if s > others:
        assert group_phrases(phrases, s - 1e-4, encoder)[0] == ["red patch", "small red patch"]
    assert ["small red patch"] in group_phrases(phrases, max(s, others) + 1e-4, encoder)
    assert group_phrases(phrases, -1.0, encoder) == [phrases]
    assert encoder.describe()["pooling"] == "mean over tokens"


# ----------------------------------------------------------------------------------------------
# the constructed case
# ----------------------------------------------------------------------------------------------


def test_classifier_looks_only_at_red(toy):
    from augment.filters import ClassifierProbe

    probe = ClassifierProbe.load(str(toy["classifier"]), device="cpu")
    rows = train_rows()
    assert probe.probabilities([r.image for r, _ in rows]).argmax(1).tolist() == [0] * 6 + [1] * 6
    plain = draw((80, 140, 80), [(OBJECT, (110, 70, 30)), (DOT, (20, 30, 230))])
    patch_only = draw((80, 140, 80), [(PATCH, RED)])
    assert probe.probabilities([plain, patch_only]).argmax(1).tolist() == [1, 0]


def test_composite_remover_fills_the_box():
    row, masks = train_rows()[0]
    out = CompositeRemover().remove([row.image], [mask_image(masks[row.fg_phrases[0]])], ["grass"], [0])
    arr = np.asarray(out.images[0])
    assert not (arr == RED).all(-1).any()  # the patch is gone and no red came in
    assert np.array_equal(arr[OBJECT], np.asarray(row.image)[OBJECT])
    assert CompositeRemover().describe()["remover"] == "composite"


def test_discovery_finds_the_red_patch(toy):
    cfg = config(toy, "out-composite")
    report = run(cfg)
    card = report["classes"]["cardinal"]
    groups = {g["name"]: g for g in card["groups"]}
    red = groups["red patch"]
    assert red["phrases"] == {"red patch": 2, "red patches": 2, "the red patch": 2}
    assert (red["occurrences"], red["flips"], red["spurious"]) == (6, 4, True)
    assert red["score"] == pytest.approx(4 / 6)
    assert groups["blue dot"]["flips"] == 0 and not groups["blue dot"]["spurious"]
    assert sorted(card["spurious_phrases"]) == sorted(PATCH_PHRASES)
    jay = report["classes"]["jay"]
    assert jay["spurious_phrases"] == [] and all(g["flips"] == 0 for g in jay["groups"])
    assert report["background_swaps"].startswith("skipped")
    assert report["skipped"]["background swap: no --edit-model"] == 12

    out = Path(cfg.output)
    ds = load_counterfactual_dataset(out)
    train = ds["train"]
    ids = train["id"]
    src = load_counterfactual_dataset(toy["dataset"])
    assert set(src["train"]["id"]) <= set(ids) and ds["validation"]["id"] == ["toy/validation/0"]
    for r in train:
        if r["label"] == 0:
            assert sorted(r["spurious_phrases"]) == sorted(PATCH_PHRASES)
        else:
            assert r["spurious_phrases"] == []
    # originals copied pixel for pixel
    orig = {r["id"]: r for r in src["train"]}
    for r in train:
        if r["id"] in orig:
            assert np.array_equal(np.asarray(r["image"]), np.asarray(orig[r["id"]]["image"]))

    # the two red cardinals survive the patch removal: spurious-free positives
    pos = [r for r in train if json.loads(r["recipe"]).get("generator") == "discover"]
    assert sorted(r["source_id"] for r in pos) == ["toy/train/c4", "toy/train/c5"]
    assert card["positives"] == 2 and report["positives"] == 2
    by_src = {r["source_id"]: r for r in pos}
    assert by_src["toy/train/c4"]["id"] == "toy/train/c4/positive/1"  # /positive/0 existed
    assert by_src["toy/train/c5"]["id"] == "toy/train/c5/positive/0"
    for r in pos:
        recipe = json.loads(r["recipe"])
        assert r["kind"] == "positive" and r["label"] == 0
        assert recipe["operation"] == "remove_object"
        assert recipe["phrases"] == [PATCH_PHRASES[int(r["source_id"][-1]) % 3]]
        assert recipe["remover"]["remover"] == "composite"
        assert recipe["classifier"] == str(toy["classifier"])
        assert recipe["seed"] == 0
        assert recipe["prediction_before"] == recipe["prediction_after"] == "cardinal"
        arr = np.asarray(r["image"])
        assert not (arr[PATCH] == RED).all(-1).any()
        assert np.array_equal(np.asarray(r["mask"]) > 127, OBJECT)
        assert "blue dot" in r["fg_phrases"]

    pm = __import__("datasets").load_dataset(str(out), "phrase_masks")["train"]
    assert len(pm) == 24 and set(pm["phrase"]) == {*PATCH_PHRASES, "blue dot", "green leaf"}
    assert load_rejected(out)["train"]["reason"] == ["no mask"]

    saved = json.loads((out / "discovery.json").read_text())
    assert saved["classes"]["cardinal"]["spurious_phrases"] == card["spurious_phrases"]
    md = (out / "discovery.md").read_text()
    assert "| red patch |" in md and "**yes**" in md and "skipped" in md
    assert (out / "discovery.png").stat().st_size > 1000
    assert "discover" in json.loads((out / "generation.json").read_text())
    assert json.loads((out / "generation.json").read_text())["source"] == "toy"


def test_discovery_with_stand_in_inpainter_and_editor(toy):
    inpainter, editor = GreyInpainter(), PaintEditor()
    cfg = config(toy, "out-editors", keep_per_class=1)
    report = run(cfg, remover=inpainter, editor=editor)
    # removal prompts are the background phrase, seeds per (run seed, id, phrase)
    prompts, seeds = inpainter.calls[0]
    assert prompts[0] == "grass"
    assert seeds[0] == item_seed(0, "toy/train/c0/remove/red patch")
    assert (["grass"] * 5, ["snow"] * 5) == editor.calls[0]
    card, jay = report["classes"]["cardinal"], report["classes"]["jay"]
    groups = {g["name"]: g for g in card["groups"]}
    assert groups["red patch"]["spurious"] and groups["red patch"]["flips"] == 4
    # painting the background white removes the red patch too: 4 of 6 flip against "grass"
    assert groups["grass"]["operations"] == {"swap_background": 6} and groups["grass"]["flips"] == 4
    # a red wall behind a jay makes it a cardinal: the jay's background is spurious for this model
    jay_groups = {g["name"]: g for g in jay["groups"]}
    assert jay_groups["green field"]["spurious"] and jay_groups["green field"]["flips"] == 6
    assert report["background_swaps"] == "done" and report["editor"] == {"generator": "paint-editor"}
    # one positive kept per class at most; the jay has none (a red background always flips it)
    assert card["positives"] == 1 and jay["positives"] == 0
    ds = load_counterfactual_dataset(cfg.output)
    pos = [r for r in ds["train"] if json.loads(r["recipe"]).get("generator") == "discover"]
    assert len(pos) == 1
    recipe = json.loads(pos[0]["recipe"])
    assert recipe["operation"] == "remove_object+swap_background"
    assert (
        recipe["remover"]["generator"] == "grey-inpaint" and recipe["editor"]["generator"] == "paint-editor"
    )
    assert pos[0]["bg_phrases"] == ["snow"] and pos[0]["bg_label"] == -1
    assert sorted(recipe["phrases"]) == sorted([PATCH_PHRASES[int(pos[0]["source_id"][-1]) % 3], "grass"])


def test_cli_and_errors(toy, tmp_path, capsys):
    no_masks = write_dataset(tmp_path / "nomasks", with_phrase_masks=False)
    base = ["--classifier", str(toy["classifier"]), "--no-progress"]
    assert cli(["--dataset", str(no_masks), "--output", str(tmp_path / "o1"), *base]) == 2
    err = capsys.readouterr().err
    assert "phrase_masks" in err and "--mask-source grounded" in err and "--llm" in err

    args = ["--dataset", str(toy["dataset"]), "--output", str(tmp_path / "o2"), "--no-progress"]
    assert cli([*args, "--classifier", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err

    assert cli([*args, *base[:2], "--keep-per-class", "0", "--flip-threshold", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "cardinal: spurious none" in out
    report = json.loads((tmp_path / "o2" / "discovery.json").read_text())
    assert report["positives"] == 0 and report["settings"]["flip_threshold"] == 0.9
    # the output exists now: a second run refuses to overwrite it
    assert cli([*args, *base[:2]]) == 2
    assert "--overwrite" in capsys.readouterr().err
