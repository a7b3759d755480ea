"""The built-in benchmark: determinism, exact masks, the background correlation, captions."""

import numpy as np
import pytest

from augment.sources.synthetic import MAX_CLASSES, SyntheticBackgrounds


def test_deterministic_and_seed_dependent():
    a = SyntheticBackgrounds(seed=3).load("train", 17)
    b = SyntheticBackgrounds(seed=3).load("train", 17)
    c = SyntheticBackgrounds(seed=4).load("train", 17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    # random access does not depend on what else was generated
    src = SyntheticBackgrounds(seed=3)
    for i in range(5):
        src.load("train", i)
    assert np.array_equal(np.asarray(src.load("train", 17).image), np.asarray(a.image))


def test_sample_fields_and_exact_mask():
    src = SyntheticBackgrounds(num_classes=9, image_size=48, noise=0.0, outline=False)
    s = src.load("test", 4)
    assert s.id == "synthetic/test/4" and s.label == 4 and s.split == "test"
    assert s.image.size == (48, 48) and s.image.mode == "RGB"
    m = np.asarray(s.mask)
    assert set(np.unique(m)) <= {0, 255} and 0.03 < (m > 0).mean() < 0.6
    # without noise and outline, the object is one colour under a smooth shading: the pixels inside the
    # mask are far more uniform in hue than the textured background around them
    img = np.asarray(s.image).astype(float)
    inside = img[m > 0]
    chroma = inside / (inside.sum(axis=1, keepdims=True) + 1e-6)
    assert chroma.std(axis=0).max() < 0.02
    assert s.caption == f"a photo of a {src.class_names[4]} on {s.meta['background']}"


def test_background_correlation_is_rho():
    src = SyntheticBackgrounds(num_classes=9, rho=0.8, train_per_class=400)
    labels = src.labels("train")
    bgs = np.array([src.background_family("train", i) for i in range(len(labels))])
    agree = (bgs == labels).mean()
    assert abs(agree - 0.8) < 0.03
    off = bgs[bgs != labels]
    assert len(np.unique(off)) == 9  # conflicting backgrounds spread over all families
    assert SyntheticBackgrounds(rho=1.0).background_family("test", 5) == 5


def test_splits_and_sizes():
    src = SyntheticBackgrounds(num_classes=4, train_per_class=3, validation_per_class=0, test_per_class=2)
    assert src.splits() == ["train", "test"]
    assert src.size("train") == 12 and list(src.labels("test")) == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": MAX_CLASSES + 1}, "num_classes"),
        ({"rho": 1.5}, "rho"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticBackgrounds(**kwargs)
