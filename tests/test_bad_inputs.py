"""The bad-input matrix: every odd or broken file is converted exactly or rejected with its name and
reason; rows in = rows out + rows rejected; safe loading defaults; the Hub token never written."""

import io
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from augment import trust
from augment.inputs import display_name, fit_mask, scale_to_uint8
from augment.pipeline import GenerateConfig, cli, run
from augment.sources.base import RejectedInput
from augment.sources.folder import ImageFolderSource
from tests.conftest import ROOT, python_script

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefghijKLMN"
LONG = "x" * 230 + ".png"  # a long but legal file name (255 bytes is the usual limit)
NEWLINE = "new\nline.png"  # control characters are legal in Linux file names


def _scene(size=(24, 24), colour=(200, 100, 50)) -> np.ndarray:
    """An RGB array with a distinct object square, every pixel different from its neighbours."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 9 + colour[0]) % 256, (yy * 7 + colour[1]) % 256, (xx + yy + colour[2]) % 256], -1)
    return arr.astype(np.uint8)


def _mask(size=(24, 24), value=None) -> Image.Image:
    w, h = size
    m = np.zeros((h, w), dtype=np.uint8)
    if value is None:
        m[h // 4 : h // 2, w // 4 : w // 2] = 1  # non-zero = foreground
    else:
        m[:] = value
    return Image.fromarray(m)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (PIL writes no such file)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# what each odd-but-good file must decode to: name -> expected RGB array
EXPECTED: dict[str, np.ndarray] = {}


@pytest.fixture()
def bad_folder(tmp_path):
    """A folder with every case of the matrix; returns (root, masks, expected rejections)."""
    root, masks = tmp_path / "images", tmp_path / "masks"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    mcat, mdog = masks / "train" / "cat", masks / "train" / "dog"
    for d in (cat, dog, mcat, mdog, root / "train" / "bird"):
        d.mkdir(parents=True)
    EXPECTED.clear()

    def good(folder, mfolder, name, arr=None, mask=True, **save):
        arr = _scene() if arr is None else arr
        Image.fromarray(arr).save(folder / name, **save)
        if mask:
            _mask((arr.shape[1], arr.shape[0])).save(mfolder / Path(name).with_suffix(".png"))
        EXPECTED[name] = arr

    for i in range(2):
        good(cat, mcat, f"c{i}.png")
        good(dog, mdog, f"d{i}.png", _scene(colour=(10, 200, 90)))
    # converted: grayscale, RGBA, CMYK, 16-bit grey, 16-bit RGB, palette with and without transparency
    grey = (np.arange(24 * 24).reshape(24, 24) % 251).astype(np.uint8)
    Image.fromarray(grey, "L").save(cat / "grey.png")
    EXPECTED["grey.png"] = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.dstack([_scene(), np.tile(np.array([0, 128, 255], dtype=np.uint8), 8)[None].repeat(24, 0)])
    Image.fromarray(rgba, "RGBA").save(cat / "rgba.png")
    a = rgba[..., 3:4].astype(np.float64) / 255
    EXPECTED["rgba.png"] = np.floor(rgba[..., :3] * a + 255 * (1 - a) + 0.5).astype(np.uint8)
    cmyk = np.dstack([_scene(), (np.arange(24 * 24).reshape(24, 24) % 200).astype(np.uint8)])
    Image.fromarray(cmyk, "CMYK").save(cat / "cmyk.tif")
    k = cmyk[..., 3:4].astype(np.float64)
    EXPECTED["cmyk.tif"] = np.floor((255 - cmyk[..., :3]) * (255 - k) / 255 + 0.5).astype(np.uint8)
    v16 = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 113 % 65536).astype(np.uint16)
    Image.fromarray(v16).save(cat / "grey16.png")
    EXPECTED["grey16.png"] = np.repeat((v16 >> 8).astype(np.uint8)[..., None], 3, axis=2)
    dark16 = np.full((24, 24), 200, dtype=np.uint16)  # a dark 16-bit image: 200/65535, nearly black
    Image.fromarray(dark16).save(dog / "dark16.png")
    EXPECTED["dark16.png"] = np.zeros((24, 24, 3), dtype=np.uint8)
    rgb16 = (_scene().astype(np.uint16) * 257 + 3).astype(np.uint16)
    (dog / "rgb16.png").write_bytes(_png16_rgb(rgb16))
    EXPECTED["rgb16.png"] = (rgb16 >> 8).astype(np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (256 * 3 - 12)
    idx = (np.arange(24 * 24).reshape(24, 24) % 4).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    p.save(dog / "palette.png")
    table = np.array(palette, dtype=np.uint8).reshape(256, 3)
    EXPECTED["palette.png"] = table[idx]
    p.save(dog / "palette_t.png", transparency=3)  # index 3 is transparent: white
    EXPECTED["palette_t.png"] = np.where((idx == 3)[..., None], np.uint8(255), table[idx])
    # EXIF orientation 6 (turn 90 degrees clockwise to view): stored 30x10, upright 10x30
    upright = _scene((10, 30))
    stored = np.rot90(upright, k=1)  # what a camera writes for that orientation
    Image.fromarray(stored).save(dog / "rot.png", exif=_exif(6))
    EXPECTED["rot.png"] = upright
    up_mask = np.zeros((30, 10), dtype=np.uint8)
    up_mask[2:9, 1:4] = 1  # an asymmetric object
    Image.fromarray(np.rot90(up_mask, k=1).copy()).save(mdog / "rot.png")  # drawn on the stored pixels
    Image.fromarray(stored).save(dog / "rot_up.png", exif=_exif(6))
    EXPECTED["rot_up.png"] = upright
    Image.fromarray(up_mask).save(mdog / "rot_up.png")  # drawn on the upright view
    # names that must not break anything: same name in two classes, control characters, long, NFD
    good(cat, mcat, "same.png")
    good(dog, mdog, "same.png", _scene(colour=(1, 2, 3)))
    good(dog, mdog, NEWLINE)
    good(dog, mdog, LONG)
    good(cat, mcat, "cafe\u0301.png")
    # kept, flagged: empty and full masks
    good(cat, mcat, "emptymask.png", mask=False)
    _mask(value=0).save(mcat / "emptymask.png")
    good(cat, mcat, "fullmask.png", mask=False)
    _mask(value=255).save(mcat / "fullmask.png")
    # rejected
    big = _scene((64, 64))
    Image.fromarray(big).save(dog / "huge.png")  # over --max-image-pixels 2000
    (cat / "empty.png").write_bytes(b"")
    (cat / "text.jpg").write_bytes(b"<html>not an image</html>")
    buf = io.BytesIO()
    Image.fromarray(_scene((40, 40))).save(buf, "PNG")  # under the pixel limit: truncation is the fault
    (cat / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (dog / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    good(dog, mdog, "wrongmask.png", mask=False)
    _mask((12, 12)).save(mdog / "wrongmask.png")
    (mdog / "badmask.png").write_bytes(b"not a mask")
    good(dog, mdog, "badmask.png", mask=False)
    good(root / "train" / "bird", masks, "b0.png", mask=False)  # class not in --classes cat dog
    Image.fromarray(_scene()).save(root / "train" / "loose.png")  # outside any class folder
    for folder, mfolder in ((cat, mcat), (dog, mdog)):  # the converted images get a mask too
        for f in folder.iterdir():
            if f.name in EXPECTED and not (mfolder / f.with_suffix(".png").name).exists():
                _mask().save(mfolder / f.with_suffix(".png").name)
    rejections = {
        "huge.png": ("read", "image is 64x64 = 4096 pixels, over the limit of 2000"),
        "empty.png": ("read", "empty file (0 bytes)"),
        "text.jpg": ("read", "not an image PIL can identify"),
        "truncated.png": ("read", "cannot be decoded"),
        "dangling.png": ("read", "cannot be read (No such file or directory)"),
        "wrongmask.png": ("mask", "is 12x12 but its image is 24x24"),
        "badmask.png": ("mask", "not an image PIL can identify"),
        "b0.png": ("label", "class folder 'bird' is not in the class list"),
        "loose.png": ("label", "not inside a class folder"),
    }
    return root, masks, rejections


def _source(root, masks, **kw):
    return ImageFolderSource(root, masks, classes=["cat", "dog"], max_pixels=2000, **kw)


def test_odd_images_decode_to_the_expected_pixels(bad_folder):
    root, masks, rejections = bad_folder
    src = _source(root, masks)
    seen = set()
    for i in range(src.size("train")):
        name = src.path("train", i).name
        if name in rejections:
            with pytest.raises(RejectedInput) as err:
                src.load("train", i)
            stage, text = rejections[name]
            assert err.value.stage == stage and text in err.value.reason and name in err.value.reason
            seen.add(name)
            continue
        sample = src.load("train", i)
        assert sample.image.mode == "RGB"
        if name in EXPECTED and name != "same.png":
            np.testing.assert_array_equal(np.asarray(sample.image), EXPECTED[name], err_msg=name)
        seen.add(name)
    assert seen >= set(rejections) | set(EXPECTED)


def test_masks_follow_exif_and_empty_or_full_masks_are_read(bad_folder):
    root, masks, _ = bad_folder
    src = _source(root, masks)
    by_name = {src.path("train", i).name: i for i in range(src.size("train"))}
    want = np.zeros((30, 10), dtype=bool)
    want[2:9, 1:4] = True
    for name in ("rot.png", "rot_up.png"):  # stored-grid mask is turned; upright mask is kept
        sample = src.load("train", by_name[name])
        assert sample.image.size == (10, 30) and sample.mask.size == (10, 30)
        np.testing.assert_array_equal(np.asarray(sample.mask) > 0, want, err_msg=name)
    assert not np.asarray(src.load("train", by_name["emptymask.png"]).mask).any()
    assert np.asarray(src.load("train", by_name["fullmask.png"]).mask).all()


def test_names_stay_ids_free_and_are_shown_escaped(bad_folder):
    root, masks, _ = bad_folder
    src = _source(root, masks)
    ids = [src.item_id("train", i) for i in range(src.size("train"))]
    assert len(set(ids)) == len(ids)  # the same file name in two classes is two rows
    by_name = {src.path("train", i).name: i for i in range(src.size("train"))}
    assert src.load("train", by_name[NEWLINE]).meta["file"] == "dog/new\\x0aline.png"
    assert len(src.load("train", by_name[LONG]).meta["file"]) <= 200
    nfd = next(n for n in by_name if n.startswith("cafe"))
    assert src.load("train", by_name[nfd]).meta["file"] == "cat/caf\u00e9.png"  # NFC
    assert display_name("a\x00b\x1b[31m") == "a\\x00b\\x1b[31m"


def test_class_folders_match_after_unicode_normalisation(tmp_path):
    d = tmp_path / "r" / "train" / "cafe\u0301"  # decomposed, as macOS file systems store it
    d.mkdir(parents=True)
    Image.fromarray(_scene()).save(d / "a.png")
    src = ImageFolderSource(tmp_path / "r", classes=["caf\u00e9"])  # composed, as typed
    assert src.labels("train").tolist() == [0]
    with pytest.raises(ValueError, match="more than once"):
        ImageFolderSource(tmp_path / "r", classes=["caf\u00e9", "cafe\u0301"])
    (tmp_path / "r" / "tr ain").mkdir()
    with pytest.raises(ValueError, match="cannot be a split name"):
        ImageFolderSource(tmp_path / "r")


def test_pixel_scaling_reference_cases():
    assert scale_to_uint8(np.array([0, 255, 256, 65535], dtype=np.uint16), "x").tolist() == [0, 0, 1, 255]
    assert scale_to_uint8(np.array([0.0, 0.5, 1.0]), "x").tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([0.0, 127.4, 255.0]), "x").tolist() == [0, 127, 255]
    assert scale_to_uint8(np.array([0, 7, 255], dtype=np.int64), "x").tolist() == [0, 7, 255]
    for bad, text in (
        (np.array([-1, 3], dtype=np.int32), "outside 0..65535"),
        (np.array([70000], dtype=np.int32), "outside 0..65535"),
        (np.array([0.0, 300.0]), "outside 0..1 and 0..255"),
        (np.array([np.nan]), "NaN"),
    ):
        with pytest.raises(RejectedInput, match=text):
            scale_to_uint8(bad, "file.tif")
    with pytest.raises(RejectedInput, match="is 5x5 but its image is 6x6"):
        fit_mask(np.ones((5, 5), bool), (6, 6), "m.png", image_orientation=6)


def _read_all(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_whole_job_accounts_for_every_file_and_never_writes_the_token(bad_folder, tmp_path):
    root, masks, rejections = bad_folder
    out = tmp_path / "out"
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "PYTHONPATH": str(ROOT)}
    args = [
        "--source",
        "folder",
        "--data-dir",
        str(root),
        "--mask-dir",
        str(masks),
        "--classes",
        "cat",
        "dog",
    ]
    args += ["--output", str(out), "--max-image-pixels", "2000", "--no-progress"]
    proc = subprocess.run(
        python_script("generate.py", *args), env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    files = [p for p in (root / "train").rglob("*") if not p.is_dir()]
    assert summary["inputs"] == len(files) == summary["originals"] + summary["rejected_inputs"]
    assert summary["rejected_inputs"] == len(rejections)
    from datasets import load_dataset

    rejected = [r for split in load_dataset(str(out), "rejected").values() for r in split]
    inputs = {r["reason"]: r["stage"] for r in rejected if r["stage"] in ("read", "mask", "label")}
    for name, (stage, text) in rejections.items():
        hits = [s for reason, s in inputs.items() if name in reason and text in reason]
        assert hits == [stage], (name, inputs)
    flagged = {r["reason"] for r in rejected if r["stage"] == "composite"}
    assert any("emptymask.png: the foreground mask is empty" in r for r in flagged)
    assert any("fullmask.png: the foreground mask covers the whole image" in r for r in flagged)
    train = load_dataset(str(out))["train"]
    kinds = train["kind"]
    assert kinds.count("original") == summary["originals"]
    files_kept = {json.loads(r)["file"] for r, k in zip(train["recipe"], kinds) if k == "original"}
    assert {"cat/fullmask.png", "cat/emptymask.png", "dog/rot.png", "dog/new\\x0aline.png"} <= files_kept
    # counterfactuals from every original with a usable mask; none from the empty or full ones
    assert kinds.count("positive") == summary["originals"] - 2
    assert FAKE_TOKEN.encode() not in _read_all(out)
    assert FAKE_TOKEN not in proc.stdout + proc.stderr
    settings = json.loads((out / "generation.json").read_text())
    assert settings["loading"] == {"trust_remote_code": False, "weights": "safetensors only"}
    assert settings["max_image_pixels"] == 2000


def test_nothing_usable_exits_non_zero_with_the_reasons(tmp_path):
    root = tmp_path / "bad" / "train" / "cat"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"")
    (root / "b.jpg").write_bytes(b"GIF89a? no")
    proc = subprocess.run(
        python_script("generate.py", "--source", "folder", "--data-dir", str(tmp_path / "bad"),
                      "--output", str(tmp_path / "o"), "--no-progress"),
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no usable input: all 2 inputs were rejected" in proc.stderr
    assert "a.png: empty file (0 bytes)" in proc.stderr and "b.jpg: not an image" in proc.stderr


def test_bad_flag_values_exit_non_zero(tmp_path, capsys):
    (tmp_path / "d" / "train" / "cat").mkdir(parents=True)
    code = cli(["--source", "folder", "--data-dir", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
                "--max-image-pixels", "-5", "--no-progress"])  # fmt: skip
    assert code == 2 and "--max-image-pixels must be >= 0" in capsys.readouterr().err


def test_error_messages_redact_the_token(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    code = cli(
        ["--source", "folder", "--data-dir", str(tmp_path / FAKE_TOKEN), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is not a folder" in err and FAKE_TOKEN not in err and "<redacted>" in err
    assert trust.redact("x hf_abcdefghijklmnopqrstuvwxyz012345 y") == "x <redacted> y"


class _FixedCaptions:
    """A captioner stand-in: the cat image gets a background, the dog image none."""

    def __call__(self, images, progress=False):
        return [
            "a photo of a cat on the grass" if i % 2 == 0 else "a photo of a dog" for i in range(len(images))
        ]

    def describe(self):
        return {"captioner": "fixed"}


def test_llm_answers_that_are_not_json_are_recorded(tmp_path, monkeypatch):
    from datasets import load_dataset

    from augment.describe import Captioner
    from augment.extract import LLMExtractor

    root = tmp_path / "r"
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        Image.fromarray(_scene()).save(root / "train" / cls / "a.png")
    calls = []

    def garbage(conversations):
        calls.append(len(conversations))
        return ["Sure! The background is grass." for _ in conversations]

    monkeypatch.setattr(
        LLMExtractor, "from_pretrained", classmethod(lambda cls, *a, **k: cls(garbage, max_repairs=1))
    )
    monkeypatch.setattr(Captioner, "from_pretrained", classmethod(lambda cls, *a, **k: _FixedCaptions()))
    out = tmp_path / "o"
    summary = run(
        GenerateConfig(output=str(out), source="folder", data_dir=str(root), llm="any/llm",
                       captioner="any/captioner", progress=False)
    )  # fmt: skip
    assert summary["inputs"] == summary["originals"] + summary["rejected_inputs"] == 2
    assert calls == [2, 2]  # the first answer and one repair, both conversations in one batch
    train = load_dataset(str(out))["train"]
    originals = [json.loads(r)["extract"] for r, k in zip(train["recipe"], train["kind"]) if k == "original"]
    assert [e["method"] for e in originals] == ["caption-parser-fallback", "rejected"]
    assert all("LLM answer invalid after 2 attempts" in e["error"] for e in originals)
    rejected = [r for split in load_dataset(str(out), "rejected").values() for r in split]
    extract = [r for r in rejected if r["stage"] == "extract"]
    assert len(extract) == 1 and "dog/a.png: LLM answer invalid after 2 attempts" in extract[0]["reason"]


class _Stop(Exception):
    """Raised by a recording loader once it has seen its arguments."""


def _recorder(log: list, name: str, result=None):
    def load(*args, **kwargs):
        log.append((name, kwargs))
        if result is None:
            raise _Stop(name)
        return result

    return load


def test_loaders_pass_trust_remote_code_false_and_safetensors(tmp_path, monkeypatch):
    import datasets
    import transformers

    trust.configure()  # the defaults
    log: list = []
    tok = SimpleNamespace(chat_template="t", pad_token="p", padding_side="right", eos_token="e")
    for cls in ("AutoTokenizer", "AutoProcessor", "AutoImageProcessor"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", _recorder(log, cls, tok))
    for cls in (
        "AutoModelForCausalLM",
        "AutoModelForImageTextToText",
        "AutoModel",
        "AutoModelForMaskGeneration",
        "AutoModelForZeroShotObjectDetection",
        "AutoModelForImageClassification",
    ):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", _recorder(log, cls))
    from augment.describe import Captioner
    from augment.discover import PhraseEncoder
    from augment.extract import LLMExtractor
    from augment.filters import SemanticFilter
    from augment.segment import TextDetector, TransformersSam
    from augment.synthesize.diffusion_common import load_pipeline
    from debias.models import load_classifier

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    loaders = [
        lambda: LLMExtractor.from_pretrained(str(model_dir), device="cpu"),
        lambda: Captioner.from_pretrained(str(model_dir), device="cpu"),
        lambda: SemanticFilter.from_pretrained(str(model_dir), device="cpu"),
        lambda: TransformersSam.from_pretrained(str(model_dir), device="cpu"),
        lambda: TextDetector.from_pretrained(str(model_dir), device="cpu"),
        lambda: PhraseEncoder.from_pretrained(str(model_dir), device="cpu"),
        lambda: load_classifier(str(model_dir)),
        lambda: load_pipeline(
            SimpleNamespace(from_pretrained=_recorder(log, "diffusers")),
            str(model_dir),
            "x",
            "cpu",
            None,
            None,
        ),
    ]
    for load in loaders:
        with pytest.raises(_Stop):
            load()
    models = [(n, k) for n, k in log if n.startswith("AutoModel") or n == "diffusers"]
    assert len(models) == len(loaders)  # every loader reached its weights
    assert all(k["trust_remote_code"] is False for _, k in log), log
    assert all(k["use_safetensors"] is True for _, k in models), models
    # a datasets version that still takes the keyword gets False; the installed one runs no scripts
    seen = {}

    def fake_load_dataset(path, revision=None, cache_dir=None, trust_remote_code=None):
        seen["trust_remote_code"] = trust_remote_code
        raise _Stop("load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from augment.sources.hub import load_any

    with pytest.raises(ValueError, match="_Stop"):
        load_any(str(model_dir))
    assert seen == {"trust_remote_code": False}
    # the flags turn both on, for this process only while configured
    try:
        trust.configure(trust_remote_code=True, allow_bin_weights=True)
        assert trust.model_kwargs() == {"trust_remote_code": True, "use_safetensors": None}
    finally:
        trust.configure()


def test_flags_reach_the_policy(tmp_path):
    from augment.pipeline import build_parser, parse_args

    base = ["--output", str(tmp_path / "o")]
    assert not parse_args(base).trust_remote_code and not parse_args(base).allow_bin_weights
    config = parse_args([*base, "--trust-remote-code", "--allow-bin-weights"])
    assert config.trust_remote_code and config.allow_bin_weights
    help_text = build_parser().format_help()
    for flag in ("--trust-remote-code", "--allow-bin-weights", "--max-image-pixels"):
        assert flag in help_text


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_checkpoint_is_refused(tmp_path):
    import torch

    evil = _Evil()
    evil.marker = str(tmp_path / "pwned")
    path = tmp_path / "sam_vit_h.pth"
    torch.save({"weight": torch.zeros(2), "payload": evil}, path)
    with pytest.raises(ValueError, match="sam_vit_h.pth.*refused"):
        trust.load_weights(path, "--sam-checkpoint")
    assert not (tmp_path / "pwned").exists()
    plain = tmp_path / "plain.pth"
    torch.save({"weight": torch.arange(3.0)}, plain)
    assert trust.load_weights(plain)["weight"].tolist() == [0.0, 1.0, 2.0]


def test_hub_rows_paths_outside_the_dataset_are_not_opened(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from augment.sources.hub import HubSource

    folder = tmp_path / "ds"
    (folder / "imgs").mkdir(parents=True)
    (folder / "data").mkdir()
    Image.fromarray(_scene()).save(folder / "imgs" / "ok.png")
    Image.fromarray(_scene()).save(tmp_path / "outside.png")  # exists, but outside the dataset
    v16 = (np.arange(24 * 24, dtype=np.uint32).reshape(24, 24) * 97 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(v16).save(buf, "PNG")
    cells = [
        {"bytes": buf.getvalue(), "path": None},
        {"bytes": None, "path": "/etc/hostname"},
        {"bytes": None, "path": "../outside.png"},
        {"bytes": None, "path": "imgs/ok.png"},
        {"bytes": b"", "path": None},
    ]
    # written with pyarrow: datasets' own writer would try to read the path-only cells
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=cell), "label": [0, 1, 0, 1, 0]})
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    src = HubSource(str(folder))
    got = np.asarray(src.load("train", 0).image)
    np.testing.assert_array_equal(got, np.repeat((v16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    for row, text in (
        (1, "'/etc/hostname' is outside the dataset folder"),
        (2, "'../outside.png' is outside"),
    ):
        with pytest.raises(RejectedInput, match=text):
            src.load("train", row)
    np.testing.assert_array_equal(np.asarray(src.load("train", 3).image), _scene())
    with pytest.raises(RejectedInput, match="row 4 image: empty file"):
        src.load("train", 4)


class _Configured(Exception):
    pass


@pytest.mark.parametrize(
    "script,argv",
    [
        ("train", ["--dataset", "d", "--output-dir", "o"]),
        ("evaluate", ["--model", "m", "--dataset", "d", "--output", "o"]),
        ("discover", ["--dataset", "d", "--classifier", "c", "--output", "o"]),
        (
            "personalize-train",
            ["train", "--dataset", "d", "--output", "o", "--model", "m", "--method", "lora"],
        ),
        (
            "personalize-generate",
            ["generate", "--dataset", "d", "--adapters", "a", "--output", "o", "--per-class", "1"],
        ),
    ],
)
def test_every_script_takes_the_loading_flags_and_sets_the_policy_first(monkeypatch, script, argv):
    """train / evaluate / discover / personalize take --trust-remote-code and --allow-bin-weights (off by
    default) and hand them to the process-wide policy before loading anything."""
    from augment import trust

    seen = []

    def fake_configure(trust_remote_code=False, allow_bin_weights=False):
        seen.append((trust_remote_code, allow_bin_weights))
        raise _Configured

    monkeypatch.setattr(trust, "configure", fake_configure)
    if script == "train":
        from debias import train as mod

        run = lambda a: mod.main(mod.build_parser().parse_args(a))  # noqa: E731
    elif script == "evaluate":
        from debias import evaluate as mod

        run = lambda a: mod.main(mod.build_parser().parse_args(a))  # noqa: E731
    elif script == "discover":
        from augment import discover as mod

        run = lambda a: mod.run(mod.parse_args(a))  # noqa: E731
    else:
        from augment.synthesize import personalize as mod

        run = lambda a: (mod.train if a[0] == "train" else mod.generate)(mod.parse_args(a))  # noqa: E731
    for extra, want in (([], (False, False)), (["--trust-remote-code", "--allow-bin-weights"], (True, True))):
        with pytest.raises(_Configured):
            run([*argv, *extra])
        assert seen[-1] == want
