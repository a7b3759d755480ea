"""Img2ImgGenerator and InstructEditGenerator on tiny random pipelines loaded with from_pretrained."""

import numpy as np
import pytest

from augment import __version__
from augment.synthesize.edit import Img2ImgGenerator, InstructEditGenerator
from augment.synthesize.inpaint import DEFAULT_NEGATIVE_PROMPT
from augment.tiny_diffusion import build_tiny_diffusion
from prompts import EDIT_BACKGROUND, render

STEPS = 4
SIZES = [(64, 64), (50, 70), (96, 40)]


class CallRecorder:
    """Records every pipeline call's arguments and forwards it to the real pipeline."""

    def __init__(self, pipe):
        self._pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self._pipe(**kwargs)


def noise_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def object_mask(h, w):
    m = np.zeros((h, w), dtype=bool)
    m[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    return m


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
    threads can wait on each other for seconds per call; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def items():
    return [noise_image(h, w, i) for i, (h, w) in enumerate(SIZES)], [object_mask(h, w) for h, w in SIZES]


@pytest.fixture(scope="module")
def img2img_path(tmp_path_factory):
    return build_tiny_diffusion(tmp_path_factory.mktemp("img2img") / "pipe", kind="img2img", seed=0)


@pytest.fixture(scope="module")
def img2img(img2img_path):
    return Img2ImgGenerator.from_pretrained(img2img_path, device="cpu", steps=STEPS, batch_size=2)


@pytest.fixture(scope="module")
def ip2p_path(tmp_path_factory):
    return build_tiny_diffusion(tmp_path_factory.mktemp("ip2p") / "pipe", kind="instruct-pix2pix", seed=0)


@pytest.fixture(scope="module")
def editor(ip2p_path):
    return InstructEditGenerator.from_pretrained(ip2p_path, device="cpu", steps=STEPS, batch_size=2)


# -- img2img ---------------------------------------------------------------------------------------


def test_img2img_one_output_per_item_and_strength_item_major(img2img, items, img2img_path):
    images, masks = items
    pipe = CallRecorder(img2img.pipe)
    g = Img2ImgGenerator(pipe, steps=STEPS, batch_size=2, info=img2img.info)
    out = g.positive(images, masks, ["a photo of a dog"] * 3, [1, 2, 3], strengths=(0.5, 1.0))
    assert len(out.images) == len(out.masks) == len(out.recipes) == 6
    assert [r["strength"] for r in out.recipes] == [0.5, 1.0] * 3
    assert [r["seed"] for r in out.recipes] == [1, 1, 2, 2, 3, 3]
    for k, (res, res_mask, r) in enumerate(zip(out.images, out.masks, out.recipes)):
        img, msk = images[k // 2], masks[k // 2]
        arr = np.asarray(res)
        assert arr.shape == img.shape
        assert np.array_equal(arr[msk], img[msk])  # object pixels exact
        assert (arr != img).any(axis=-1)[~msk].mean() > 0.9
        assert np.array_equal(np.asarray(res_mask) > 127, msk)
        assert r["generator"] == "img2img" and r["operation"] == "positive" and r["object_restored"]
        assert r["model"] == img2img_path and r["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
        assert r["package_version"] == __version__ and r["steps"] == STEPS and r["resolution"] == 64
    # one call per batch and strength: 2 batches (2 + 1 items) x 2 strengths
    assert [(len(c["prompt"]), c["strength"]) for c in pipe.calls] == [(2, 0.5), (2, 1.0), (1, 0.5), (1, 1.0)]
    assert {im.size for c in pipe.calls for im in c["image"]} == {(64, 64)}
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(out.images[1]))  # strengths differ


def test_img2img_default_strengths_are_da_fusions(img2img, items):
    images, masks = items
    out = img2img.positive(images[:1], masks[:1], ["x"], [0])
    assert [r["strength"] for r in out.recipes] == [0.25, 0.5, 0.75, 1.0]
    assert img2img.describe()["strengths"] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="strength"):
        img2img.positive(images[:1], masks[:1], ["x"], [0], strengths=[1.5])
    with pytest.raises(ValueError, match="no denoising step"):
        Img2ImgGenerator(img2img.pipe, steps=2, strengths=(0.25,))


def test_img2img_without_masks_restores_nothing(img2img, items):
    images, _ = items
    out = img2img.positive(images[:2], None, ["x", "y"], [0, 1], strengths=[1.0])
    assert out.masks == [None, None]
    assert [r["object_restored"] for r in out.recipes] == [False, False]


def test_img2img_same_seed_same_image_whatever_the_batch(img2img):
    images = [noise_image(64, 64, 20 + i) for i in range(3)]
    batch = img2img.positive(images, None, ["a", "b", "c"], [4, 5, 6], strengths=[0.75], output_type="np")
    g1 = Img2ImgGenerator(img2img.pipe, steps=STEPS, batch_size=1)
    alone = g1.positive(images[1:2], None, ["b"], [5], strengths=[0.75], output_type="np")
    diff = np.abs(alone.images[0].astype(int) - batch.images[1].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # CPU rounding across batch sizes, see test_inpaint
    other = g1.positive(images[1:2], None, ["b"], [99], strengths=[0.75], output_type="np").images[0]
    assert np.abs(other.astype(int) - batch.images[1].astype(int)).mean() > 10


# -- instruct-pix2pix --------------------------------------------------------------------------


def test_swap_background_restores_the_object_and_records_the_instruction(editor, items, ip2p_path):
    images, masks = items
    pipe = CallRecorder(editor.pipe)
    g = InstructEditGenerator(pipe, steps=STEPS, batch_size=2, info=editor.info)
    out = g.swap_background(images, masks, ["grass", "sea", "road"], ["snow", "sand", "ice"], [1, 2, 3])
    assert len(pipe.calls) == 2 and [len(c["prompt"]) for c in pipe.calls] == [2, 1]
    assert pipe.calls[0]["prompt"][1] == "turn the background of sea into sand"
    assert all(c["image_guidance_scale"] == 1.5 and c["guidance_scale"] == 7.5 for c in pipe.calls)
    for i, (img, msk, res, res_mask, r) in enumerate(zip(images, masks, out.images, out.masks, out.recipes)):
        arr = np.asarray(res)
        assert arr.shape == img.shape
        assert np.array_equal(arr[msk], img[msk])
        assert (arr != img).any(axis=-1)[~msk].mean() > 0.9
        assert np.array_equal(np.asarray(res_mask) > 127, msk)
        expected = render(
            EDIT_BACKGROUND, background=["grass", "sea", "road"][i], alt=["snow", "sand", "ice"][i]
        )
        assert r["instruction"] == r["prompt"] == expected
        assert r["template"] == EDIT_BACKGROUND == "edit_background_v1"
        assert r["generator"] == "instruct-pix2pix" and r["operation"] == "swap_background"
        assert r["model"] == ip2p_path and r["seed"] == i + 1 and r["image_guidance"] == 1.5
        assert {"revision", "steps", "guidance", "resolution", "package_version", "nsfw"} <= set(r)
    assert render(EDIT_BACKGROUND, background="grass", alt="snow") == "turn the background of grass into snow"


def test_swap_background_same_seed_same_image_whatever_the_batch(editor):
    images = [noise_image(64, 64, 30 + i) for i in range(3)]
    masks = [object_mask(64, 64)] * 3
    g3 = InstructEditGenerator(editor.pipe, steps=STEPS, batch_size=3)
    batch = g3.swap_background(images, masks, ["a", "b", "c"], ["x", "y", "z"], [4, 5, 6], output_type="np")
    g1 = InstructEditGenerator(editor.pipe, steps=STEPS, batch_size=1)
    alone = g1.swap_background(images[1:2], masks[1:2], ["b"], ["y"], [5], output_type="np")
    diff = np.abs(alone.images[0].astype(int) - batch.images[1].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_instruct_edit_describe_and_loading(editor, img2img_path, ip2p_path):
    d = editor.describe()
    assert d["model"] == ip2p_path and d["pipeline"] == "StableDiffusionInstructPix2PixPipeline"
    assert (d["steps"], d["guidance"], d["image_guidance"], d["batch_size"], d["resolution"]) == (
        STEPS,
        7.5,
        1.5,
        2,
        64,
    )
    assert d["template"] == EDIT_BACKGROUND
    with pytest.raises(ValueError, match="not an InstructPix2Pix"):
        InstructEditGenerator.from_pretrained(img2img_path, device="cpu")
    with pytest.raises(ValueError, match="--edit-model"):
        InstructEditGenerator.from_pretrained("./no/such/folder")
