"""InpaintGenerator on a tiny random inpainting pipeline loaded with from_pretrained (64 px, 3 steps).

The weights are random, so the repainted pixels are noise; what is tested is the plumbing: which
pixels are kept exactly, sizes, seeds and batches, recipes.
"""

import numpy as np
import pytest
from PIL import Image

from augment import __version__
from augment.imageops import mask_bbox
from augment.segment import dilate
from augment.synthesize.inpaint import DEFAULT_NEGATIVE_PROMPT, InpaintGenerator
from augment.tiny_diffusion import build_tiny_diffusion

STEPS = 3
SIZES = [(64, 64), (50, 70), (96, 40)]  # (H, W): the working size, and two others
RECIPE_KEYS = {
    "generator",
    "operation",
    "model",
    "revision",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "strength",
    "resolution",
    "package_version",
}


class CallRecorder:
    """A pipeline stand-in that records every call's arguments and forwards it to the real pipeline."""

    def __init__(self, pipe, extra_output=None):
        self._pipe, self.calls, self.extra_output = pipe, [], extra_output or {}

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        out = self._pipe(**kwargs)
        for key, make in self.extra_output.items():
            setattr(out, key, make(len(kwargs["prompt"])))
        return out


def noise_image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def object_mask(h, w):
    m = np.zeros((h, w), dtype=bool)
    m[h // 4 : h // 2 + 4, w // 3 : 2 * w // 3] = True
    m[h // 2, 2] = True  # a stray pixel near the border: dilation and the box must reach it
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
def tiny_path(tmp_path_factory):
    return build_tiny_diffusion(tmp_path_factory.mktemp("inpaint") / "pipe", kind="inpaint", seed=0)


@pytest.fixture(scope="module")
def gen(tiny_path):
    return InpaintGenerator.from_pretrained(tiny_path, device="cpu", steps=STEPS, batch_size=3)


@pytest.fixture(scope="module")
def items():
    images = [noise_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    masks = [object_mask(h, w) for h, w in SIZES]
    return images, masks


def changed(a, b, where):
    """Fraction of the pixels under ``where`` that differ between two images."""
    return (np.asarray(a) != np.asarray(b)).any(axis=-1)[where].mean()


def test_positive_keeps_the_object_exactly_and_repaints_the_rest(gen, items):
    images, masks = items
    out = gen.positive(images, masks, ["a photo of snow"] * 3, [1, 2, 3])
    for img, msk, res, res_mask in zip(images, masks, out.images, out.masks):
        arr = np.asarray(res)
        assert res.mode == "RGB" and arr.shape == img.shape  # back at its own size
        assert np.array_equal(arr[msk], img[msk])  # the object, pixel for pixel
        assert changed(arr, img, ~msk) > 0.9  # the background is new
        assert np.array_equal(np.asarray(res_mask) > 127, msk)


def test_masks_may_be_mode_l_images(gen, items):
    images, masks = items
    as_arrays = gen.positive(images[:1], masks[:1], ["snow"], [5], output_type="np")
    as_images = gen.positive(
        images[:1], [Image.fromarray(masks[0].astype(np.uint8) * 200, "L")], ["snow"], [5], output_type="np"
    )
    assert np.array_equal(as_arrays.images[0], as_images.images[0])
    assert as_arrays.masks[0].dtype == bool


def test_remove_restores_every_pixel_outside_the_dilated_mask(gen, items):
    images, masks = items
    out = gen.remove(images, masks, ["grass"] * 3, [1, 2, 3])
    for img, msk, res, res_mask in zip(images, masks, out.images, out.masks):
        arr = np.asarray(res)
        grown = dilate(msk, gen.dilate)
        assert arr.shape == img.shape
        # exact outside the dilated mask: no tolerance, the pixels are copied from the input
        assert np.array_equal(arr[~grown], img[~grown])
        assert changed(arr, img, msk) > 0.9  # the object is repainted ...
        assert changed(arr, img, grown & ~msk) > 0.9  # ... and so is the ring the dilation adds
        assert not (np.asarray(res_mask) > 0).any()  # no object left


def test_replace_keeps_pixels_outside_the_object_box(gen, items):
    images, masks = items
    out = gen.replace(images, masks, ["a photo of a boat"] * 3, [1, 2, 3])
    for img, msk, res in zip(images, masks, out.images):
        arr = np.asarray(res)
        box = np.zeros_like(msk)
        y0, y1, x0, x1 = mask_bbox(msk, gen.dilate)
        box[y0:y1, x0:x1] = True
        assert np.array_equal(arr[~box], img[~box])
        assert changed(arr, img, box & ~msk) > 0.9  # the whole box is repainted, not only the mask
    assert out.masks == [None] * 3
    assert all("unknown" in r["mask"] for r in out.recipes)


def test_same_seed_same_image_whatever_the_batch(gen, tiny_path):
    images = [noise_image(64, 64, 10 + i) for i in range(3)]
    masks = [object_mask(64, 64)] * 3
    prompts, seeds = ["a beach", "a forest", "a street"], [7, 8, 9]
    batch = gen.remove(images, masks, prompts, seeds, output_type="np").images
    alone = InpaintGenerator(gen.pipe, steps=STEPS, batch_size=1).remove(
        images[1:2], masks[1:2], prompts[1:2], seeds[1:2], output_type="np"
    )
    # Same batch size, other order and companions: bit-exact (each item's noise comes from its own
    # generator, and the kernels see the same shapes).
    reordered = gen.remove(
        [images[2], images[1], images[0]],
        masks,
        [prompts[2], prompts[1], "a desert"],
        [9, 8, 42],
        output_type="np",
    )
    assert np.array_equal(reordered.images[1], batch[1])
    # Alone (batch 1) against inside a batch of 3: float32 CPU kernels for another batch size round
    # differently (about 2e-6 in [0, 1] measured), which can flip a uint8 rounding: at most 1 level,
    # on a few pixels.
    diff = np.abs(alone.images[0].astype(int) - batch[1].astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 0.01
    # another seed, another image
    other = gen.remove(images[1:2], masks[1:2], prompts[1:2], [1234], output_type="np").images[0]
    grown = dilate(masks[1], gen.dilate)
    assert np.abs(other.astype(int) - batch[1].astype(int))[grown].mean() > 10


def test_batches_of_batch_size_one_call_each_with_per_item_generators(gen, items):
    pipe = CallRecorder(gen.pipe)
    g = InpaintGenerator(pipe, steps=STEPS, batch_size=2)
    images = [noise_image(40, 48, i) for i in range(5)]
    masks = [object_mask(40, 48)] * 5
    out = g.positive(images, masks, [f"prompt {i}" for i in range(5)], list(range(5)))
    assert len(pipe.calls) == 3 and g.calls == 3
    assert [len(c["prompt"]) for c in pipe.calls] == [2, 2, 1]
    assert [len(c["generator"]) for c in pipe.calls] == [2, 2, 1]
    assert pipe.calls[2]["generator"][0].initial_seed() == 4
    # the pipeline works at the working resolution; the outputs come back at 40x48
    assert {im.size for c in pipe.calls for im in c["image"] + c["mask_image"]} == {(64, 64)}
    assert all(c["height"] == c["width"] == 64 for c in pipe.calls)
    assert {im.size for im in out.images} == {(48, 40)}
    assert all(c["negative_prompt"] == [DEFAULT_NEGATIVE_PROMPT] * len(c["prompt"]) for c in pipe.calls)
    assert all(c["num_inference_steps"] == STEPS and c["strength"] == 1.0 for c in pipe.calls)


def test_repaint_mask_reaches_the_working_size_grown_not_shrunk(gen):
    pipe = CallRecorder(gen.pipe)
    g = InpaintGenerator(pipe, steps=1, resolution=32, dilate=0)
    mask = np.zeros((100, 100), dtype=bool)
    mask[50, 50] = True  # one pixel: a nearest-neighbour resize to 32 px could lose it
    out = g.remove([noise_image(100, 100, 0)], [mask], ["grass"], [0])
    sent = np.asarray(pipe.calls[0]["mask_image"][0]) > 127
    assert sent.shape == (32, 32) and 1 <= sent.sum() <= 9
    assert np.asarray(out.images[0]).shape == (100, 100, 3)


def test_recipes_carry_every_field(gen, items, tiny_path):
    images, masks = items
    for op in ("positive", "remove", "replace"):
        out = getattr(gen, op)(images[:2], masks[:2], ["p0", "p1"], [11, 12])
        assert len(out.recipes) == 2
        for i, r in enumerate(out.recipes):
            assert RECIPE_KEYS <= set(r), RECIPE_KEYS - set(r)
            assert r["generator"] == "inpaint" and r["operation"] == op
            assert r["model"] == tiny_path and r["revision"] is None
            assert r["prompt"] == f"p{i}" and r["seed"] == 11 + i
            assert r["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
            assert (r["steps"], r["guidance"], r["strength"], r["resolution"]) == (STEPS, 7.5, 1.0, 64)
            assert r["package_version"] == __version__
            assert r["nsfw"] is None  # the tiny pipeline has no safety checker


def test_safety_checker_flags_go_into_the_recipes(gen, items):
    images, masks = items
    flags = iter([True, False, True])
    pipe = CallRecorder(gen.pipe, {"nsfw_content_detected": lambda n: [next(flags) for _ in range(n)]})
    out = InpaintGenerator(pipe, steps=1, batch_size=2).positive(images, masks, ["x"] * 3, [0, 1, 2])
    assert [r["nsfw"] for r in out.recipes] == [True, False, True]


def test_describe_and_settings(gen, tiny_path):
    d = gen.describe()
    assert d["model"] == tiny_path and d["dtype"] == "float32" and d["device"] == "cpu"
    assert d["pipeline"] == "StableDiffusionInpaintPipeline" and d["safety_checker"] is False
    for key, value in dict(
        steps=STEPS, guidance=7.5, strength=1.0, batch_size=3, resolution=64, dilate=4
    ).items():
        assert d[key] == value, key
    assert d["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and "revision" in d and "commit" in d
    assert gen.pipe._progress_bar_config.get("disable") is True
    with pytest.raises(ValueError, match="multiple of 8"):
        InpaintGenerator(gen.pipe, resolution=60)
    with pytest.raises(ValueError, match="strength"):
        InpaintGenerator(gen.pipe, strength=0.0)
    with pytest.raises(ValueError, match="--inpaint-model"):
        InpaintGenerator.from_pretrained("/no/such/folder")


def test_one_progress_bar_over_items_and_none_from_the_pipeline(gen, items, capsys):
    images, masks = items
    g = InpaintGenerator(gen.pipe, steps=1, batch_size=2)
    g.remove(images, masks, ["a"] * 3, [0, 1, 2], progress=True)
    err = capsys.readouterr().err
    assert "inpaint" in err and "3/3" in err and "it/s" not in err  # ours counts img; no step bar
    g.remove(images, masks, ["a"] * 3, [0, 1, 2])
    assert capsys.readouterr().err == ""


def test_inputs_are_checked(gen, items):
    images, masks = items
    with pytest.raises(ValueError, match="seeds"):
        gen.remove(images, masks, ["a"] * 3, [0, 1])
    with pytest.raises(ValueError, match="mask"):
        gen.remove(images, [masks[0], None, masks[2]], ["a"] * 3, [0, 1, 2])
    with pytest.raises(ValueError, match="shape"):
        gen.remove(images[:1], masks[1:2], ["a"], [0])
