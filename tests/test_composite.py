"""Pixel-level checks of the tile fill and the composite generator."""

import numpy as np
import pytest
from PIL import Image

from augment.imageops import center_on, mask_bbox, tile_fill
from augment.synthesize.composite import CompositeGenerator


def striped(h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def square_mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_tile_fill_repeats_the_largest_strip():
    img = striped(12, 10)
    mask = square_mask(12, 10, 5, 9, 3, 7)  # strips: top 5 rows (50 px) is the largest
    out = tile_fill(img, mask, pad=0)
    assert np.array_equal(out[~square_mask(12, 10, 5, 9, 3, 7)], img[~mask])  # outside the box unchanged
    for r in range(5, 9):  # box row r takes strip row (r - 5) % 5, same columns
        assert np.array_equal(out[r, 3:7], img[(r - 5) % 5, 3:7])


def test_tile_fill_uses_a_side_strip_when_it_is_largest():
    img = striped(10, 12, seed=1)
    mask = square_mask(10, 12, 1, 9, 7, 10)  # left strip 7 cols x 10 rows = 70 px wins
    out = tile_fill(img, mask, pad=0)
    for c in range(7, 10):
        assert np.array_equal(out[1:9, c], img[1:9, (c - 7) % 7])


def test_tile_fill_whole_image_box_falls_back_to_mean():
    img = striped(6, 6)
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[5, 5] = True
    out = tile_fill(img, mask, pad=0)
    expected = img[~mask].mean(axis=0).astype(np.uint8)
    assert (out == expected).all()


def test_positive_keeps_object_pixels_exactly_and_takes_the_partner_background():
    anchor = striped(16, 16, seed=2)
    a_mask = square_mask(16, 16, 4, 8, 5, 9)
    partner = striped(16, 16, seed=3)
    p_mask = square_mask(16, 16, 9, 13, 2, 6)
    out = CompositeGenerator(fill_pad=1)(
        background_image=[partner],
        background_mask=[p_mask],
        image=[anchor],
        mask_image=[a_mask],
        output_type="np",
    )
    img, msk = out.images[0], out.masks[0]
    assert np.array_equal(img[a_mask], anchor[a_mask])  # object exact
    filled = tile_fill(partner, p_mask, pad=1)
    assert np.array_equal(img[~a_mask], filled[~a_mask])  # the rest is the partner's filled background
    assert np.array_equal(msk, a_mask)
    assert out.recipes[0]["operation"] == "paste_object" and out.recipes[0]["generator"] == "composite"


def test_remove_object_and_replace_centred():
    anchor = striped(16, 16, seed=4)
    a_mask = square_mask(16, 16, 10, 14, 10, 14)
    other = striped(16, 16, seed=5)
    o_mask = square_mask(16, 16, 1, 3, 1, 3)
    gen = CompositeGenerator(fill_pad=0)
    removed = gen(background_image=[anchor], background_mask=[a_mask], output_type="np")
    assert np.array_equal(removed.images[0], tile_fill(anchor, a_mask, pad=0))
    assert not removed.masks[0].any()
    replaced = gen(
        background_image=[anchor],
        background_mask=[a_mask],
        image=[other],
        mask_image=[o_mask],
        placement="center",
        output_type="np",
    )
    box = mask_bbox(replaced.masks[0])
    assert box == (11, 13, 11, 13)  # the 2x2 object is centred on the anchor's 4x4 box
    assert np.array_equal(replaced.images[0][11:13, 11:13], other[1:3, 1:3])


def test_center_on_moves_object_and_mask_together():
    obj = striped(8, 8)
    m = square_mask(8, 8, 0, 2, 0, 2)
    moved, mm = center_on(obj, m, (4, 8, 4, 8))
    assert mask_bbox(mm) == (5, 7, 5, 7)
    assert np.array_equal(moved[5:7, 5:7], obj[0:2, 0:2])


def test_pil_inputs_and_size_mismatch():
    anchor = Image.fromarray(striped(16, 16, seed=6))
    a_mask = Image.fromarray(square_mask(16, 16, 4, 8, 4, 8).astype(np.uint8) * 255)
    partner = Image.fromarray(striped(32, 32, seed=7))
    p_mask = Image.fromarray(square_mask(32, 32, 0, 4, 0, 4).astype(np.uint8) * 255)
    out = CompositeGenerator()(
        background_image=[partner], background_mask=[p_mask], image=[anchor], mask_image=[a_mask]
    )
    # the object is resized to the background's size: its pixels occupy the scaled box
    assert out.images[0].size == (32, 32) and out.masks[0].mode == "L"
    assert mask_bbox(np.asarray(out.masks[0]) > 127) == (8, 16, 8, 16)


def test_check_inputs():
    gen = CompositeGenerator()
    with pytest.raises(ValueError, match="background_mask"):
        gen(background_image=[striped()], background_mask=[])
    with pytest.raises(ValueError, match="mask_image"):
        gen(background_image=[striped()], background_mask=[None], image=[striped()], mask_image=[None])
    with pytest.raises(ValueError, match="placement"):
        gen(background_image=[striped()], background_mask=[None], placement="somewhere")
