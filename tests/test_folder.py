"""The image-folder source, masks in a parallel tree, and bad input recorded with the file named."""

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from augment.pipeline import GenerateConfig, run
from augment.sources.folder import ImageFolderSource
from tests.conftest import python_script, run_script


def _image(path, colour, size=(24, 24), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste((255 - colour[0], 40, 40), (6, 6, 16, 16))
    img.save(path, format=fmt)


def _mask(path, size=(24, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    m[6:16, 6:16] = 1  # non-zero = foreground
    Image.fromarray(m).save(path)


@pytest.fixture()
def messy_folder(tmp_path):
    root, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(3):
        _image(root / "train" / "cat" / f"c{i}.png", (200, 100, 50))
        _mask(masks / "train" / "cat" / f"c{i}.png")
        _image(root / "train" / "dog" / f"d{i}.jpg", (50, 100, 200), fmt="JPEG")
        _mask(masks / "train" / "dog" / f"d{i}.png")  # same stem, .png
    (root / "train" / "cat" / "broken.png").write_bytes(b"this is not a png at all")
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    _image(root / "train" / "dog" / "wrongmask.png", (10, 10, 10))
    _mask(masks / "train" / "dog" / "wrongmask.png", size=(12, 12))
    _image(root / "train" / "loose.png", (1, 2, 3))
    _image(root / "val" / "cat" / "v0.png", (200, 100, 50))
    _image(root / "val" / "bird" / "v1.png", (9, 9, 9))  # class not in the train class list
    return root, masks


def test_rejections_name_the_file_and_nothing_is_lost(messy_folder, tmp_path):
    root, masks = messy_folder
    out = tmp_path / "out"
    summary = run(
        GenerateConfig(
            output=str(out), source="folder", data_dir=str(root), mask_dir=str(masks), progress=False
        )
    )
    assert summary["inputs"] == summary["originals"] + summary["rejected_inputs"]
    assert summary["originals"] == 7 and summary["rejected_inputs"] == 5
    rejected = load_dataset(str(out), "rejected")
    rows = [r for split in rejected.values() for r in split]
    found = [(r["stage"], r["reason"]) for r in rows]

    def has(fname: str, stage: str, text: str) -> bool:
        return any(fname in reason and text in reason and s == stage for s, reason in found)

    assert len(found) == 5
    assert has("broken.png", "read", "not an image")
    assert has("empty.png", "read", "empty file (0 bytes)")
    assert has("wrongmask.png", "mask", "is 12x12 but its image is 24x24")
    assert has("loose.png", "label", "not inside a class folder")
    assert has("v1.png", "label", "class folder 'bird' is not in the class list")
    ds = load_dataset(str(out))
    assert set(ds) == {"train", "validation"}
    train = ds["train"]
    assert train.features["label"].names == ["cat", "dog"]
    assert train["kind"].count("positive") == 6  # every usable train image has a mask
    orig = train.filter(lambda r: r["kind"] == "original")[0]
    assert np.asarray(orig["mask"]).max() == 255 and orig["caption"] == "a photo of a cat"


def test_no_masks_records_why_no_counterfactuals(messy_folder, tmp_path):
    root, _ = messy_folder
    out = tmp_path / "nomask"
    run(GenerateConfig(output=str(out), source="folder", data_dir=str(root), progress=False))
    rejected = load_dataset(str(out), "rejected")["train"]
    composite = [r for r in rejected if r["stage"] == "composite"]
    assert len(composite) == 7 and all("no foreground mask" in r["reason"] for r in composite)
    assert (
        load_dataset(str(out))["train"]["kind"].count("original") == 7
    )  # wrongmask.png is fine without masks


def test_source_reads_rgba_grayscale_and_exif(tmp_path):
    root = tmp_path / "r"
    (root / "train" / "a").mkdir(parents=True)
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(root / "train" / "a" / "rgba.png")
    Image.new("L", (8, 8), 77).save(root / "train" / "a" / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (10, 4), (0, 200, 0)).save(root / "train" / "a" / "rot.jpg", exif=exif)
    src = ImageFolderSource(root)
    samples = {src.path("train", i).name: src.load("train", i) for i in range(src.size("train"))}
    assert samples["rgba.png"].image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert samples["grey.png"].image.mode == "RGB" and samples["grey.png"].image.getpixel((0, 0)) == (
        77,
        77,
        77,
    )
    assert samples["rot.jpg"].image.size == (4, 10)


def test_cli_errors_are_clear(tmp_path):
    proc = run_script(
        python_script("generate.py", "--source", "folder", "--output", str(tmp_path / "x")), check=False
    )
    assert proc.returncode == 2 and "needs --data-dir" in proc.stderr
    proc = run_script(
        python_script(
            "generate.py",
            "--source",
            "folder",
            "--data-dir",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "y"),
        ),
        check=False,
    )
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
