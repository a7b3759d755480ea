"""The segmentation stage: mask helpers, SAM backends (embedding reuse), detectors, the Segmenter."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from augment.segment import (
    SEGMENT_ANYTHING_TYPES,
    PostProcess,
    SegmentAnythingSam,
    Segmenter,
    TextDetector,
    TransformersSam,
    box_from_mask,
    dilate,
    fill_holes,
    postprocess,
    union_masks,
)
from augment.tiny import build_tiny_grounding_dino, build_tiny_owlv2, build_tiny_sam

KEEP_ALL = PostProcess(fill_holes=False, dilate=0, min_area=0.0, max_area=1.0)


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _arr(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows])


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment-models")
    return {
        "sam": build_tiny_sam(root / "sam"),
        "owlv2": build_tiny_owlv2(root / "owlv2"),
        "gdino": build_tiny_grounding_dino(root / "gdino"),
    }


@pytest.fixture(scope="module")
def sam(tiny_paths):
    return TransformersSam.from_pretrained(tiny_paths["sam"], device="cpu")


class FakeDetector:
    """Returns fixed ``(box, score)`` lists per query, records what it was asked."""

    def __init__(self, found: dict[str, list]):
        self.found = found
        self.calls: list[list[list[str]]] = []

    def detect(self, images, queries):
        self.calls.append([list(q) for q in queries])
        return [{q: list(self.found.get(q, [])) for q in qs} for qs in queries]

    def describe(self):
        return {"model": "fake"}


# ------------------------------------------------------------------------------------------ helpers


def test_box_from_mask_exact_and_empty():
    m = np.zeros((8, 10), bool)
    m[3, 5] = True
    assert box_from_mask(m) == [5.0, 3.0, 6.0, 4.0]  # exclusive right/bottom edges
    m[2:5, 1:7] = True
    m[7, 9] = True  # a second blob widens the box to the corner
    assert box_from_mask(m) == [1.0, 2.0, 10.0, 8.0]
    assert box_from_mask(np.ones((4, 6), bool)) == [0.0, 0.0, 6.0, 4.0]
    assert box_from_mask(np.zeros((4, 6), bool)) is None
    assert box_from_mask(np.zeros((4, 6), np.uint8)) is None


def test_union_masks():
    a = _arr(["#..", "..."])
    b = _arr(["...", ".##"])
    np.testing.assert_array_equal(union_masks([a, b], (2, 3)), _arr(["#..", ".##"]))
    out = union_masks([], (2, 3))
    assert out.dtype == bool and out.shape == (2, 3) and not out.any()
    with pytest.raises(ValueError):
        union_masks([a], (3, 3))


def test_fill_holes_ring_c_shape_border_and_diagonal():
    ring = _arr(["......", ".####.", ".#..#.", ".#..#.", ".####.", "......"])
    filled = _arr(["......", ".####.", ".####.", ".####.", ".####.", "......"])
    np.testing.assert_array_equal(fill_holes(ring), filled)
    c_shape = _arr(["......", ".####.", ".#....", ".#....", ".####.", "......"])  # open to the right
    np.testing.assert_array_equal(fill_holes(c_shape), c_shape)
    u_on_border = _arr([".#..#.", ".#..#.", ".####.", "......"])  # its inside touches the top edge
    np.testing.assert_array_equal(fill_holes(u_on_border), u_on_border)
    # an outline closed only diagonally: background connectivity is 4, so the inside is a hole
    diamond = _arr([".....", "..#..", ".#.#.", "..#..", "....."])
    np.testing.assert_array_equal(fill_holes(diamond), _arr([".....", "..#..", ".###.", "..#..", "....."]))
    assert not fill_holes(np.zeros((3, 3), bool)).any()


def test_dilate_is_an_exact_disk():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    np.testing.assert_array_equal(
        dilate(m, 1), _arr([".......", ".......", "...#...", "..###..", "...#...", ".......", "......."])
    )
    np.testing.assert_array_equal(
        dilate(m, 2), _arr([".......", "...#...", "..###..", ".#####.", "..###..", "...#...", "......."])
    )
    assert dilate(m, 2).sum() == 13
    corner = np.zeros((4, 4), bool)
    corner[0, 0] = True
    np.testing.assert_array_equal(dilate(corner, 2), _arr(["###.", "##..", "#...", "...."]))
    np.testing.assert_array_equal(dilate(m, 0), m)
    assert not dilate(np.zeros((5, 5), bool), 3).any()


def test_postprocess_area_bounds_and_reasons():
    settings = PostProcess(fill_holes=True, dilate=0, min_area=0.005, max_area=0.95)
    empty, why = postprocess(np.zeros((100, 100), bool), settings)
    assert not empty.any() and why == "mask is empty"
    tiny = np.zeros((100, 100), bool)
    tiny[0, :20] = True  # 0.2%
    out, why = postprocess(tiny, settings)
    assert why == "mask covers 0.2% of the image (min 0.5%)"
    np.testing.assert_array_equal(out, tiny)
    full = np.ones((100, 100), bool)
    full[0, :] = False  # 99%
    _, why = postprocess(full, settings)
    assert why == "mask covers 99% of the image (max 95%)"
    ring = np.zeros((100, 100), bool)
    ring[10:30, 10:30] = True
    ring[15:25, 15:25] = False  # a hole, filled before the area is measured
    out, why = postprocess(ring, settings)
    assert why is None and out.sum() == 400 and out[20, 20]
    exact = np.zeros((100, 100), bool)
    exact[0, :50] = True  # exactly min_area: kept
    assert postprocess(exact, settings)[1] is None
    grown, why = postprocess(tiny, PostProcess(dilate=1, min_area=0.0))
    assert why is None and grown.sum() == 20 + 20 + 1  # the row below and one pixel past the right end
    assert PostProcess().describe()["hole_connectivity"] == 4
    with pytest.raises(ValueError):
        PostProcess(min_area=0.5, max_area=0.1)


# ------------------------------------------------------------------------------------- SAM backend


def test_embedding_computed_once_per_image(sam):
    sizes = [(60, 90), (100, 40), (33, 77), (64, 64), (50, 50)]
    images = _images(sizes)
    encoder_batches, decoder_prompts = [], []
    h1 = sam.model.vision_encoder.register_forward_hook(
        lambda mod, args, out: encoder_batches.append(args[0].shape[0])
    )
    h2 = sam.model.prompt_encoder.register_forward_hook(
        lambda mod, args, kwargs, out: decoder_prompts.append(kwargs["input_boxes"].shape[1]),
        with_kwargs=True,
    )
    boxes = [[0, 0, 10, 10], [5, 5, 20, 30], [1, 2, 8, 9]]
    det = FakeDetector(
        {"dog": [(boxes[0], 0.9), (boxes[1], 0.8)], "grass": [(boxes[2], 0.7)], "sky": [(boxes[1], 0.6)]}
    )
    seg = Segmenter("grounded", sam, detector=det, post=KEEP_ALL, batch_size=2)
    try:
        results = seg(images, ["dog"] * 5, phrases=[["grass", "sky"]] * 5)
    finally:
        h1.remove()
        h2.remove()
    assert encoder_batches == [2, 2, 1]  # N images encoded, not N * prompts
    assert decoder_prompts == [4] * 5  # one decoder call per image with all its boxes
    for r, (h, w) in zip(results, sizes):
        assert r.error is None and r.mask.shape == (h, w) and r.mask.dtype == bool
        assert set(r.phrase_masks) == {"grass", "sky"}
        assert all(m.shape == (h, w) for m in r.phrase_masks.values())
        assert r.boxes == [list(map(float, boxes[0])), list(map(float, boxes[1]))]
        assert r.box_scores == pytest.approx([0.9, 0.8])


def test_masks_at_original_size(sam):
    sizes = [(60, 90), (100, 40), (17, 129)]
    images = _images(sizes, seed=1)
    embedded = sam.embed(images)
    masks = sam.masks_from_boxes(embedded, [[[0, 0, 30, 20]], [], [[1, 1, 5, 5], [2, 2, 100, 15]]])
    assert [m.shape for m in masks] == [(1, 60, 90), (0, 100, 40), (2, 17, 129)]
    assert all(m.dtype == bool for m in masks)


def test_reuse_path_matches_plain_forward(sam, tiny_paths):
    """Embedding once + prompt-only decoding gives SamModel's plain pixel_values + boxes forward."""
    from transformers import AutoProcessor, SamModel

    model = SamModel.from_pretrained(tiny_paths["sam"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_paths["sam"])
    images = _images([(60, 90), (100, 40)], seed=2)
    boxes = [[[3, 4, 50, 40], [10, 10, 80, 55]], [[0, 0, 40, 100], [5, 20, 30, 60]]]
    ours = sam.masks_from_boxes(sam.embed(images), boxes)
    low_res: list[torch.Tensor] = []
    hook = sam.model.mask_decoder.register_forward_hook(lambda m, a, out: low_res.append(out[0]))
    try:
        sam.masks_from_boxes(sam.embed(images), boxes)
    finally:
        hook.remove()
    for i, image in enumerate(images):
        enc = processor(images=[image], input_boxes=[boxes[i]], return_tensors="pt")
        with torch.inference_mode():
            out = model(
                pixel_values=enc["pixel_values"], input_boxes=enc["input_boxes"], multimask_output=False
            )
        torch.testing.assert_close(low_res[i], out.pred_masks, atol=1e-5, rtol=1e-4)
        plain = processor.post_process_masks(
            out.pred_masks, enc["original_sizes"], enc["reshaped_input_sizes"]
        )[0][:, 0]
        np.testing.assert_array_equal(ours[i], plain.numpy())


# ----------------------------------------------------------------------------------------- modes


def test_sam_mode_uses_the_given_masks_boxes(sam):
    images = _images([(60, 90), (48, 64)], seed=3)
    m1 = np.zeros((60, 90), bool)
    m1[10:30, 20:50] = True
    m2 = np.zeros((48, 64), np.uint8)
    m2[5:9, 40:41] = 255
    seg = Segmenter("sam", sam, post=KEEP_ALL)
    results = seg(images, ["dog", "cat"], given_masks=[m1, m2])
    assert [r.boxes for r in results] == [[box_from_mask(m1)], [box_from_mask(m2 > 0)]]
    assert [r.box_source for r in results] == ["given-mask", "given-mask"]
    expected = sam.masks_from_boxes(sam.embed(images), [[box_from_mask(m1)], [box_from_mask(m2 > 0)]])
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r.mask, e[0])
        assert r.area == pytest.approx(e[0].mean())
        assert r.phrase_masks == {}


def test_sam_mode_without_mask_or_detector_is_a_per_item_error(sam):
    images = _images([(40, 40), (40, 40), (40, 40)], seed=4)
    given = np.zeros((40, 40), bool)
    given[5:20, 5:20] = True
    seg = Segmenter("sam", sam, post=KEEP_ALL)
    results = seg(images, ["dog", "cat", "bird"], given_masks=[None, given, np.zeros((40, 40), bool)])
    assert results[0].mask is None and results[0].box_source == "none"
    assert results[0].error == "no given mask and no detector to find a box for 'dog'"
    assert results[1].error is None and results[1].mask.shape == (40, 40)
    assert results[2].mask is None and "empty" in results[2].error
    assert seg(images[:1], ["dog"])[0].error.startswith("no given mask")  # no given_masks at all


def test_sam_mode_falls_back_to_the_detector(sam):
    det = FakeDetector({"dog": [([2, 3, 30, 25], 0.8), ([0, 0, 5, 5], 0.05)]})
    seg = Segmenter("sam", sam, detector=det, post=KEEP_ALL)
    given = np.zeros((40, 40), bool)
    given[1:4, 1:4] = True
    results = seg(_images([(40, 40), (40, 40)]), ["dog", "dog"], given_masks=[None, given])
    assert det.calls == [[["dog"]]]  # only the item without a mask is detected
    assert results[0].box_source == "detector" and results[0].boxes == [[2.0, 3.0, 30.0, 25.0]]
    assert results[1].box_source == "given-mask" and results[1].boxes == [[1.0, 1.0, 4.0, 4.0]]


def test_grounded_mode_thresholds_phrases_and_errors(sam):
    det = FakeDetector(
        {
            "dog": [([2, 2, 30, 30], 0.9), ([20, 20, 39, 39], 0.5), ([0, 0, 3, 3], 0.05)],
            "red ball": [([5, 5, 15, 15], 0.4)],
            "grass": [([0, 30, 40, 40], 0.08)],  # below the threshold: absent
            "cat": [([1, 1, 9, 9], 0.03)],
        }
    )
    seg = Segmenter("grounded", sam, detector=det, post=KEEP_ALL, box_threshold=0.1, max_boxes=4)
    images = _images([(40, 40), (40, 40), (40, 40)], seed=5)
    given = np.ones((40, 40), bool)  # ignored in grounded mode
    results = seg(
        images,
        ["dog", "cat", "Bird"],
        phrases=[["red ball", "grass", "sky"], ["red ball"], []],
        given_masks=[given, None, None],
    )
    dog, cat, bird = results
    assert det.calls == [[["dog", "red ball", "grass", "sky"], ["cat", "red ball"], ["Bird"]]]
    assert dog.box_source == "detector" and dog.boxes == [[2.0, 2.0, 30.0, 30.0], [20.0, 20.0, 39.0, 39.0]]
    assert dog.box_scores == pytest.approx([0.9, 0.5])
    assert set(dog.phrase_masks) == set(dog.phrase_boxes) == set(dog.phrase_scores) == {"red ball"}
    assert dog.phrase_boxes["red ball"] == [[5.0, 5.0, 15.0, 15.0]]
    expected = sam.masks_from_boxes(
        sam.embed(images[:1]), [[[2, 2, 30, 30], [20, 20, 39, 39], [5, 5, 15, 15]]]
    )[0]
    np.testing.assert_array_equal(dog.mask, expected[0] | expected[1])
    np.testing.assert_array_equal(dog.phrase_masks["red ball"], expected[2])
    assert cat.mask is None and cat.error == "detector found no box for 'cat' (best score 0.03 < 0.1)"
    assert cat.phrase_masks == {} and cat.phrase_boxes == {}
    assert bird.error == "detector found no box for 'bird'"
    # max_boxes keeps the best ones only
    two = Segmenter("grounded", sam, detector=det, post=KEEP_ALL, box_threshold=0.0, max_boxes=1)
    assert two(images[:1], ["dog"], phrases=[[]])[0].boxes == [[2.0, 2.0, 30.0, 30.0]]


def test_area_rejection_keeps_the_area(sam):
    det = FakeDetector({"dog": [([2, 2, 30, 30], 0.9)]})
    seg = Segmenter("grounded", sam, detector=det, post=PostProcess(min_area=0.0, max_area=0.0001))
    (r,) = seg(_images([(40, 40)]), ["dog"], phrases=[[]])
    assert r.mask is None and r.area > 0.0001 and r.error.startswith("mask covers")


def test_grounded_with_tiny_owlv2(sam, tiny_paths):
    det = TextDetector.from_pretrained(tiny_paths["owlv2"], device="cpu")
    seg = Segmenter(
        "grounded", sam, detector=det, post=KEEP_ALL, box_threshold=0.0, max_boxes=2, batch_size=2
    )
    sizes = [(60, 90), (100, 40), (64, 64)]
    phrases = [["grass", "red ball"], ["tree"], []]
    results = seg(_images(sizes, seed=6), ["dog", "cat", "bird"], phrases=phrases, progress=True)
    for r, (h, w), ph in zip(results, sizes, phrases):
        assert r.error is None and r.mask.shape == (h, w) and r.box_source == "detector"
        assert 1 <= len(r.boxes) <= 2
        for b in r.boxes:
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h
        assert set(r.phrase_masks) == set(r.phrase_boxes) == set(r.phrase_scores) <= set(ph)
        for p in ph:  # a phrase has a mask of the image's size, or is absent
            assert p not in r.phrase_masks or r.phrase_masks[p].shape == (h, w)
    strict = Segmenter("grounded", sam, detector=det, post=KEEP_ALL, box_threshold=1.01)
    (r,) = strict(_images([(60, 90)], seed=6), ["dog"], phrases=[["grass"]])
    assert r.mask is None and r.error.startswith("detector found no box for 'dog' (best score")
    assert r.error.endswith("< 1.01)") and r.phrase_masks == {}


def test_owlv2_boxes_match_the_processor(tiny_paths):
    """Scaling to pixels (OWLv2 pads to a square) agrees with transformers' own post-processing."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    det = TextDetector.from_pretrained(tiny_paths["owlv2"], device="cpu", top_k=1000, nms_iou=1.0)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_paths["owlv2"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_paths["owlv2"])
    images = _images([(60, 90), (100, 40)], seed=7)
    ours = det.detect(images, [["dog"], ["cat"]])
    enc = processor(text=[["dog"], ["cat"]], images=images, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc)
    theirs = processor.post_process_grounded_object_detection(
        out, threshold=-1.0, target_sizes=[(60, 90), (100, 40)]
    )
    for i, (query, (h, w)) in enumerate(zip(["dog", "cat"], [(60, 90), (100, 40)])):
        expected = []
        for box, score in zip(theirs[i]["boxes"].tolist(), theirs[i]["scores"].tolist()):
            x0, y0, x1, y1 = (
                min(max(box[0], 0), w),
                min(max(box[1], 0), h),
                min(max(box[2], 0), w),
                min(max(box[3], 0), h),
            )
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                expected.append(([x0, y0, x1, y1], score))
        expected.sort(key=lambda e: -e[1])
        got = ours[i][query]
        assert len(got) == len(expected) > 0
        for (gb, gs), (eb, es) in zip(got, expected):
            assert gs == pytest.approx(es, abs=1e-6)
            assert gb == pytest.approx(eb, abs=1e-3)


def test_grounding_dino_phrase_scores(tiny_paths):
    """A phrase's score is the best token probability inside its span of "dog. red ball."."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    det = TextDetector.from_pretrained(tiny_paths["gdino"], device="cpu", top_k=1000, nms_iou=1.0)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_paths["gdino"]).eval()
    processor = AutoProcessor.from_pretrained(tiny_paths["gdino"])
    (image,) = _images([(60, 90)], seed=8)
    ours = det.detect([image], [["Dog", "red ball."]])[0]
    assert set(ours) == {"dog", "red ball"}
    enc = processor(images=[image], text=["dog. red ball."], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    tok = processor.tokenizer
    pos = {t: ids.index(tok.convert_tokens_to_ids(t)) for t in ("dog", "red", "ball")}
    with torch.inference_mode():
        out = model(**enc)
    probs = torch.sigmoid(out.logits[0])
    boxes = out.pred_boxes[0]
    x0y0 = (boxes[:, :2] - boxes[:, 2:] / 2) * torch.tensor([90, 60])
    x1y1 = (boxes[:, :2] + boxes[:, 2:] / 2) * torch.tensor([90, 60])
    expected = {
        "dog": probs[:, pos["dog"]],
        "red ball": torch.maximum(probs[:, pos["red"]], probs[:, pos["ball"]]),
    }
    for phrase, scores in expected.items():
        by_box = {}
        for j in range(len(scores)):
            b = [
                min(max(float(x0y0[j, 0]), 0), 90),
                min(max(float(x0y0[j, 1]), 0), 60),
                min(max(float(x1y1[j, 0]), 0), 90),
                min(max(float(x1y1[j, 1]), 0), 60),
            ]
            if b[2] - b[0] >= 1 and b[3] - b[1] >= 1:
                by_box[tuple(round(v, 2) for v in b)] = float(scores[j])
        got = {tuple(round(v, 2) for v in b): s for b, s in ours[phrase]}
        assert got.keys() == by_box.keys() and len(got) > 0
        for k in got:
            assert got[k] == pytest.approx(by_box[k], abs=1e-6)


def test_grounded_with_tiny_grounding_dino(sam, tiny_paths):
    det = TextDetector.from_pretrained(tiny_paths["gdino"], device="cpu")
    seg = Segmenter("grounded", sam, detector=det, post=KEEP_ALL, box_threshold=0.0, max_boxes=2)
    (r,) = seg(_images([(60, 90)], seed=9), ["dog"], phrases=[["red ball", "grass"]])
    assert r.error is None and r.mask.shape == (60, 90) and 1 <= len(r.boxes) <= 2
    assert set(r.phrase_masks) == {"red ball", "grass"}
    assert seg.describe()["detector"]["family"] == "grounding-dino"


# ------------------------------------------------------------------------------------- from_flags


def test_from_flags_errors_and_loading(tiny_paths, tmp_path):
    assert Segmenter.from_flags("given") is None
    with pytest.raises(ValueError, match="unknown mask source"):
        Segmenter.from_flags("magic", sam=tiny_paths["sam"])
    with pytest.raises(ValueError, match="needs a SAM"):
        Segmenter.from_flags("sam")
    with pytest.raises(ValueError, match="not both"):
        Segmenter.from_flags("sam", sam=tiny_paths["sam"], sam_checkpoint="x.pth")
    with pytest.raises(ValueError, match="needs --detector"):
        Segmenter.from_flags("grounded", sam=tiny_paths["sam"])
    with pytest.raises(ValueError, match="--sam-type"):
        Segmenter.from_flags("sam", sam_checkpoint=str(tmp_path / "x.pth"), sam_type="vit_q")
    with pytest.raises(FileNotFoundError):
        Segmenter.from_flags("sam", sam_checkpoint=str(tmp_path / "missing.pth"), sam_type="vit_b")
    sam = TransformersSam.from_pretrained(tiny_paths["sam"], device="cpu")
    with pytest.raises(ValueError, match="unsupported detector"):
        TextDetector(sam.model, sam.processor)  # a SAM is not a detector
    owl = TextDetector.from_pretrained(tiny_paths["owlv2"], device="cpu")
    with pytest.raises(ValueError, match="SamModel"):
        TransformersSam(owl.model, owl.processor)  # nor a detector a SAM
    seg = Segmenter.from_flags(
        "grounded",
        sam=tiny_paths["sam"],
        detector=tiny_paths["owlv2"],
        device="cpu",
        box_threshold=0.2,
        max_boxes=3,
        post=PostProcess(dilate=2),
    )
    d = seg.describe()
    assert d["mode"] == "grounded" and d["box_threshold"] == 0.2 and d["max_boxes"] == 3
    assert d["sam"]["model"] == tiny_paths["sam"] and d["sam"]["backend"] == "transformers"
    assert d["detector"]["model"] == tiny_paths["owlv2"] and d["detector"]["family"] == "owlv2"
    assert d["postprocess"]["dilate"] == 2 and "revision" in d["sam"] and "commit" in d["detector"]


# ------------------------------------------------------------------------- segment-anything package


def _tiny_segment_anything():
    from augment.segment import import_segment_anything

    build_sam = import_segment_anything()
    modeling = sys.modules["segment_anything.modeling"]
    assert build_sam is not None
    from functools import partial

    return modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=2,
            embed_dim=32,
            img_size=64,
            patch_size=8,
            num_heads=2,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=4,
            out_chans=32,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    )


@pytest.mark.skipif(
    importlib.util.find_spec("segment_anything") is None, reason="segment-anything not installed"
)
def test_segment_anything_backend(tmp_path, monkeypatch):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(_tiny_segment_anything().state_dict(), checkpoint)
    assert "segment_anything" not in sys.modules or hasattr(sys.modules["segment_anything"], "SamPredictor")
    monkeypatch.setitem(SEGMENT_ANYTHING_TYPES, "tiny", _tiny_segment_anything)
    seg = Segmenter.from_flags(
        "sam", sam_checkpoint=str(checkpoint), sam_type="tiny", device="cpu", post=KEEP_ALL, batch_size=4
    )
    backend = seg.sam
    assert isinstance(backend, SegmentAnythingSam) and seg.describe()["sam"]["sam_type"] == "tiny"
    assert backend._input_size(60, 90) == (43, 64) and backend._input_size(100, 40) == (64, 26)
    sizes = [(60, 90), (100, 40), (64, 64)]
    images = _images(sizes, seed=10)
    masks = []
    for h, w in sizes:
        m = np.zeros((h, w), bool)
        m[h // 4 : h // 2, w // 5 : w // 2] = True
        masks.append(m)
    batches = []
    hook = backend.model.image_encoder.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    try:
        results = seg(images, ["dog"] * 3, given_masks=masks)
        embedded = backend.embed(images)
        several = backend.masks_from_boxes(
            embedded, [[[0, 0, 40, 30], [10, 10, 80, 50]], [], [[1, 1, 60, 60]]]
        )
    finally:
        hook.remove()
    assert batches == [3, 3]  # one encoder pass per batch of images, whatever the boxes
    assert [r.mask.shape for r in results] == sizes
    assert [r.boxes for r in results] == [[box_from_mask(m)] for m in masks]
    assert [m.shape for m in several] == [(2, 60, 90), (0, 100, 40), (1, 64, 64)]
    # the package's own end-to-end forward on the same resized image gives the same masks
    image = images[0]
    nh, nw = backend._input_size(60, 90)
    resized = torch.from_numpy(np.asarray(image.resize((nw, nh), Image.BILINEAR), dtype=np.float32))
    scaled = torch.tensor(
        [[0, 0, 40 * nw / 90, 30 * nh / 60], [10 * nw / 90, 10 * nh / 60, 80 * nw / 90, 50 * nh / 60]]
    )
    with torch.inference_mode():
        (ref,) = backend.model(
            [{"image": resized.permute(2, 0, 1), "original_size": (60, 90), "boxes": scaled}],
            multimask_output=False,
        )
    np.testing.assert_array_equal(several[0], ref["masks"][:, 0].numpy())
