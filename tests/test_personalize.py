"""Personalised generation: textual inversion and DreamBooth-LoRA per class with tiny pipelines, saving
and reloading the adapters, and the dataset that generation writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from augment.dataset import DatasetWriter, Row, load_counterfactual_dataset, load_rejected
from augment.synthesize import personalize as P
from augment.tiny_diffusion import build_tiny_diffusion
from tests.conftest import accelerate_launch, python_script, run_script

CLASSES = ["circle", "dog sled", "square"]  # "square" has originals but no positives
ALTS = {"circle": ["a beach", "a snowy field"], "dog sled": []}
FAST = dict(max_train_steps=2, resolution=64, batch_size=2, checkpointing_steps=0, progress=False)


def _image(rng, size=32) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("personalize-models")
    return {
        "text2img": build_tiny_diffusion(root / "t2i", "text2img", seed=0),
        "inpaint": build_tiny_diffusion(root / "inpaint", "inpaint", seed=0),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 classes; circle and dog sled have originals (circle with alt phrases) and positives, square
    only originals; a test split, and one rejected input, to check that generation copies them."""
    out = tmp_path_factory.mktemp("personalize-data") / "ds"
    rng = np.random.default_rng(0)
    writer = DatasetWriter(out, CLASSES)
    for y, name in enumerate(CLASSES):
        for i in range(3):
            oid = f"src/train/{y}-{i}"
            mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 8), "L")
            writer.add(
                "train",
                Row(
                    id=oid,
                    image=_image(rng),
                    label=y,
                    kind="original",
                    source_id=oid,
                    mask=mask,
                    bg_label=y,
                    caption=f"a photo of a {name}",
                    alt_phrases=ALTS.get(name, [])[i : i + 1],
                    recipe={"generator": "source"},
                ),
            )
            if name != "square":
                writer.add(
                    "train",
                    Row(
                        id=f"{oid}/positive/0",
                        image=_image(rng),
                        label=y,
                        kind="positive",
                        source_id=oid,
                        bg_label=(y + 1) % 3,
                        recipe={"generator": "composite", "seed": i},
                    ),
                )
        writer.add(
            "test",
            Row(id=f"src/test/{y}", image=_image(rng), label=y, kind="original", source_id=f"src/test/{y}"),
        )
    writer.reject("src/train/99", "train", "read", "unreadable file")
    writer.close(settings={"source": "test"})
    return out


def _train(dataset, model, output, method, **kw):
    config = P.PersonalizeTrainConfig(
        dataset=str(dataset), model=model, method=method, output=str(output), **{**FAST, **kw}
    )
    return config, P.train(config)


@pytest.fixture(scope="module")
def ti(models, dataset, tmp_path_factory):
    """Textual inversion of 'circle' for 2 steps; the trained text encoder's embedding matrix is kept."""
    captured = {}
    save = P.TextualInversion.save

    def spy(self, text_encoder, folder):
        captured["weight"] = text_encoder.get_input_embeddings().weight.detach().clone()
        captured["token_id"] = self.token_id
        return save(self, text_encoder, folder)

    P.TextualInversion.save = spy
    try:
        out = tmp_path_factory.mktemp("ti") / "adapters"
        _, manifest = _train(
            dataset, models["text2img"], out, "textual-inversion", classes=["circle"], lr=5e-2
        )
    finally:
        P.TextualInversion.save = save
    return {"dir": out, "manifest": manifest, **captured}


@pytest.fixture(scope="module")
def generator(ti):
    return P.PersonalizedGenerator.from_pretrained(ti["dir"], device="cpu")


# ---------------------------------------------------------------------------------------- names


def test_names_and_prompts():
    assert P.placeholder_token("dog sled") == "<dog-sled>"
    assert P.placeholder_token("00_Dog") == "<00-dog>"
    assert P.class_folder("dog sled/2") == "dog_sled_2"
    assert P.lora_phrase("dog sled") == "sks dog sled"
    assert P.prompt_for("<dog>", "a beach") == "a photo of a <dog> in a beach"
    assert P.prompt_for("<dog>", None) == "a photo of a <dog>"

    class OneTokenWords:  # a tokenizer that knows "sled" and "object" as single tokens
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [1] if text in ("sled", "object") else [1, 2]})()

    assert P.initializer_word("dog sled", OneTokenWords()) == "sled"
    assert P.initializer_word("00_xyz", OneTokenWords()) == "object"


def test_help_explains_both_commands(capsys):
    for command, words in (
        ("train", ["textual-inversion", "lora", "--kinds"]),
        ("generate", ["--per-class", "alt"]),
    ):
        with pytest.raises(SystemExit) as e:
            P.build_parser().parse_args([command, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(w in text for w in words)


# ------------------------------------------------------------------------------------- training


def test_class_without_images_is_a_clear_error(dataset, models, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"class 'square' has no train images of kind positive"):
        _train(dataset, models["text2img"], tmp_path / "a", "textual-inversion")
    code = P.cli(
        ["train", "--dataset", str(dataset), "--model", models["text2img"], "--method", "lora"]
        + ["--output", str(tmp_path / "b"), "--classes", "square", "--no-progress"]
    )
    assert code == 2 and "'square'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown class"):
        _train(dataset, models["text2img"], tmp_path / "c", "lora", classes=["cat"])


def test_textual_inversion_trains_only_the_new_row_and_reloads(ti, models):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    entry = ti["manifest"]["classes"]["circle"]
    assert entry["token"] == "<circle>" and ti["manifest"]["tokens"] == {"circle": "<circle>"}
    assert entry["steps"] == 2 and entry["loss"]["finite"] and np.isfinite(entry["loss"]["last"])
    assert entry["num_images"] == 3 and entry["init_word"]
    base = CLIPTextModel.from_pretrained(models["text2img"], subfolder="text_encoder")
    before = base.get_input_embeddings().weight.detach()
    after, tid = ti["weight"], ti["token_id"]
    assert after.shape[0] == before.shape[0] + 1 and tid == before.shape[0]
    assert torch.equal(after[:tid], before)  # every other row bit-identical
    saved = load_file(str(ti["dir"] / "circle" / P.TI_WEIGHTS))
    assert list(saved) == ["<circle>"] and saved["<circle>"].shape == (1, before.shape[1])
    assert torch.equal(saved["<circle>"][0], after[tid])
    # the row moved away from its initialisation (the mean of the init word's embeddings)
    tok = StableDiffusionPipeline.from_pretrained(models["text2img"]).tokenizer
    init_ids = tok(entry["init_word"], add_special_tokens=False).input_ids
    assert not torch.allclose(after[tid], before[init_ids].mean(0))
    # into a fresh pipeline with load_textual_inversion: the same values under the same token
    pipe = StableDiffusionPipeline.from_pretrained(models["text2img"])
    pipe.load_textual_inversion(str(ti["dir"] / "circle"), token="<circle>")
    new_id = pipe.tokenizer.convert_tokens_to_ids("<circle>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[new_id], after[tid])
    manifest = json.loads((ti["dir"] / "personalize.json").read_text())
    assert manifest["method"] == "textual-inversion" and manifest["base_model"] == models["text2img"]
    assert (
        manifest["lr"] == 5e-2 and manifest["seed"] == 0 and "curve" in manifest["classes"]["circle"]["loss"]
    )


def test_lora_trains_saves_and_loads_into_text2img_and_inpaint(models, dataset, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    _, manifest = _train(
        dataset, models["text2img"], out, "lora", classes=["circle", "dog sled"], lr=5e-2, rank=2
    )
    entry = manifest["classes"]["dog sled"]
    assert entry["token"] == "sks dog sled" and entry["rank"] == 2 and entry["loss"]["finite"]
    folder = out / entry["folder"]
    weights = load_file(str(folder / P.LORA_WEIGHTS))
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # B starts at zero: training moved it
    assert all(k.startswith("unet.") for k in weights)

    def run(pipe_cls, path, lora: bool, **kw):
        pipe = pipe_cls.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(str(folder))
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(
            "a photo of a sks dog sled", num_inference_steps=2, generator=g, output_type="np", **kw
        ).images

    base = run(StableDiffusionPipeline, models["text2img"], False)
    one, two = (run(StableDiffusionPipeline, models["text2img"], True) for _ in range(2))
    assert np.array_equal(one, two) and not np.array_equal(one, base)
    image = Image.fromarray(np.full((64, 64, 3), 127, np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16), "L")
    kw = {"image": image, "mask_image": mask}
    base = run(StableDiffusionInpaintPipeline, models["inpaint"], False, **kw)
    one, two = (run(StableDiffusionInpaintPipeline, models["inpaint"], True, **kw) for _ in range(2))
    assert np.array_equal(one, two) and not np.array_equal(one, base)
    # the generator swaps the classes' LoRAs: a class's image is the same before and after another's
    gen = P.PersonalizedGenerator.from_pretrained(out, device="cpu")
    images = [
        np.asarray(gen(c, ["a photo of a sks dog"], seed=[3], num_inference_steps=2).images[0])
        for c in ("dog sled", "circle", "dog sled")
    ]
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    assert gen.adapter_path("dog sled") == folder / P.LORA_WEIGHTS


# ----------------------------------------------------------------------------------- generation


def test_generate_writes_originals_and_generated_rows(ti, generator, dataset, tmp_path):
    out = tmp_path / "new"
    config = P.PersonalizeGenerateConfig(
        dataset=str(dataset), adapters=str(ti["dir"]), output=str(out), per_class=3, steps=2, batch_size=2
    )
    summary = P.generate(config, generator=generator)
    assert summary["generated"] == {"circle": 3}
    before, after = load_counterfactual_dataset(dataset), load_counterfactual_dataset(out)
    assert set(after) == set(before)
    for split in before:
        old = {r["id"]: r for r in before[split]}
        new = {r["id"]: r for r in after[split]}
        assert set(old) <= set(new)
        for rid, r in old.items():
            s = new[rid]
            assert np.array_equal(np.asarray(r["image"]), np.asarray(s["image"]))
            assert {k: v for k, v in r.items() if k not in ("image", "mask")} == {
                k: v for k, v in s.items() if k not in ("image", "mask")
            }
    gen = [r for r in after["train"] if r["kind"] == "generated"]
    assert [r["id"] for r in gen] == [f"personalize/circle/generated/{k}" for k in range(3)]
    assert all(
        r["label"] == 0 and r["bg_label"] == -1 and r["source_id"] == "personalize/circle" for r in gen
    )
    assert all(r["mask"] is None for r in gen)
    recipes = [json.loads(r["recipe"]) for r in gen]
    for key in ("generator", "method", "model", "revision", "adapter", "token", "prompt", "negative_prompt"):
        assert all(key in rc for rc in recipes), key
    assert {rc["generator"] for rc in recipes} == {"personalize"}
    assert [rc["prompt"] for rc in recipes] == [
        "a photo of a <circle> in a beach",
        "a photo of a <circle> in a snowy field",
        "a photo of a <circle> in a beach",
    ]
    assert (
        recipes[0]["steps"] == 2
        and recipes[0]["guidance"] == 7.5
        and recipes[0]["mask"] == {"source": "none"}
    )
    assert gen[0]["caption"] == "a photo of a circle in a beach"
    assert len({rc["seed"] for rc in recipes}) == 3
    assert [r["reason"] for r in load_rejected(out)["train"]] == ["unreadable file"]
    settings = json.loads((out / "generation.json").read_text())
    assert settings["personalize"]["generator"]["method"] == "textual-inversion"

    # same seeds, same images: a second run, and one image through the generator on its own
    again = tmp_path / "again"
    P.generate(P.PersonalizeGenerateConfig(**{**vars(config), "output": str(again)}), generator=generator)
    regen = [r for r in load_counterfactual_dataset(again)["train"] if r["kind"] == "generated"]
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(gen, regen))
    alone = generator("circle", [recipes[2]["prompt"]], seed=[recipes[2]["seed"]], num_inference_steps=2)
    diff = np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(gen[2]["image"], dtype=int))
    assert diff.max() <= 2  # batch 1 vs batch 2: same noise; float rounding may move a level or two


class FirstImageDetector:
    """A text-grounded detector stand-in: a box for the first image it is shown, none afterwards."""

    def __init__(self):
        self.calls = 0

    def detect(self, images, queries):
        found = []
        for qs in queries:
            box = [([8, 8, 40, 40], 0.9)] if self.calls == 0 else []
            found.append({q: list(box) for q in qs})
            self.calls += 1
        return found

    def describe(self):
        return {"model": "first-image"}


def test_generate_masks_with_the_segmentation_stage_and_rejects(ti, generator, dataset, tmp_path):
    from augment.segment import PostProcess, Segmenter, TransformersSam
    from augment.tiny import build_tiny_sam

    sam = TransformersSam.from_pretrained(build_tiny_sam(tmp_path / "sam"), device="cpu")
    segmenter = Segmenter(
        "sam", sam, detector=FirstImageDetector(), post=PostProcess(min_area=0.0, max_area=1.0)
    )
    out = tmp_path / "masked"
    config = P.PersonalizeGenerateConfig(
        dataset=str(dataset),
        adapters=str(ti["dir"]),
        output=str(out),
        per_class=2,
        steps=1,
        batch_size=2,
        alt_source="none",
    )
    summary = P.generate(config, generator=generator, segmenter=segmenter)
    assert summary["generated"] == {"circle": 1} and summary["rejected_generated"] == {"segment": 1}
    gen = [r for r in load_counterfactual_dataset(out)["train"] if r["kind"] == "generated"]
    assert len(gen) == 1 and gen[0]["id"] == "personalize/circle/generated/0"
    mask = np.asarray(gen[0]["mask"])
    assert gen[0]["mask"].mode == "L" and mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    recipe = json.loads(gen[0]["recipe"])
    assert recipe["prompt"] == "a photo of a <circle>"
    assert recipe["mask"]["source"] == "sam" and recipe["mask"]["boxes"] == [[8.0, 8.0, 40.0, 40.0]]
    assert recipe["mask"]["box_source"] == "detector" and 0 < recipe["mask"]["area"] <= 1
    rejected = {r["id"]: r for r in load_rejected(out)["train"]}
    assert rejected["personalize/circle/generated/1"]["stage"] == "segment"
    assert rejected["personalize/circle/generated/1"]["reason"] == "detector found no box for 'circle'"


def test_generate_flag_errors(ti, dataset, tmp_path):
    with pytest.raises(ValueError, match="needs --detector"):
        P.PersonalizeGenerateConfig(
            dataset=str(dataset),
            adapters=str(ti["dir"]),
            output=str(tmp_path),
            per_class=1,
            mask_source="sam",
        )
    with pytest.raises(ValueError, match="no adapter"):
        P.generate(
            P.PersonalizeGenerateConfig(
                dataset=str(dataset),
                adapters=str(ti["dir"]),
                output=str(tmp_path / "x"),
                per_class=1,
                classes=["square"],
            )
        )
    with pytest.raises(FileNotFoundError, match="personalize.json"):
        P.read_manifest(tmp_path)
    base = dict(adapters=str(ti["dir"]), per_class=1)
    with pytest.raises(ValueError, match="is the input dataset"):
        P.generate(
            P.PersonalizeGenerateConfig(dataset=str(dataset), output=str(dataset), overwrite=True, **base)
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(FileExistsError, match="--overwrite"):
        P.generate(P.PersonalizeGenerateConfig(dataset=str(dataset), output=str(tmp_path / "taken"), **base))


# -------------------------------------------------------------------------------------- scripts


def test_script_trains_under_accelerate_launch(models, dataset, tmp_path):
    out = tmp_path / "adapters"
    args = [
        "--dataset",
        str(dataset),
        "--model",
        models["text2img"],
        "--method",
        "lora",
        "--output",
        str(out),
    ]
    args += ["--classes", "circle", "--max-train-steps", "2", "--resolution", "64", "--batch-size", "2"]
    run_script(accelerate_launch(python_script("personalize.py")[1], "train", *args, "--no-progress"))
    manifest = json.loads((out / "personalize.json").read_text())
    assert manifest["classes"]["circle"]["steps"] == 2 and (out / "circle" / P.LORA_WEIGHTS).is_file()
    assert manifest["num_processes"] == 1 and manifest["mixed_precision"] == "no"


class Interrupt(Exception):
    pass


def test_interrupted_class_resumes_from_its_checkpoint(models, dataset, tmp_path, monkeypatch):
    out = tmp_path / "adapters"
    kw = dict(classes=["dog sled"], max_train_steps=2, checkpointing_steps=1)
    save = P._save_checkpoint

    def save_then_stop(accelerator, folder, step, limit):
        save(accelerator, folder, step, limit)
        raise Interrupt

    monkeypatch.setattr(P, "_save_checkpoint", save_then_stop)
    with pytest.raises(Interrupt):
        _train(dataset, models["text2img"], out, "textual-inversion", **kw)
    assert (out / "dog_sled" / "checkpoint-1" / P.TI_WEIGHTS).is_file()
    monkeypatch.setattr(P, "_save_checkpoint", save)
    _, manifest = _train(
        dataset, models["text2img"], out, "textual-inversion", resume_from_checkpoint="latest", **kw
    )
    entry = manifest["classes"]["dog sled"]
    assert entry["token"] == "<dog-sled>" and entry["steps"] == 2 and entry["loss"]["steps"] == 2
    assert not list((out / "dog_sled").glob("checkpoint-*"))  # the final adapter supersedes them
    with pytest.raises(FileExistsError, match="resume-from-checkpoint"):
        _train(dataset, models["text2img"], out, "textual-inversion", **kw)
    _, again = _train(
        dataset, models["text2img"], out, "textual-inversion", resume_from_checkpoint="latest", **kw
    )
    assert again["classes"]["dog sled"] == entry  # finished: skipped, not retrained
