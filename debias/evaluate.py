"""Background reliance, measured the way the field does: Background Challenge variants and metrics.

From a split with foreground masks the eight variants of the Background Challenge (Xiao et al.,
ICLR 2021) are built:

=============  ==============================================================================
original       the image
only_fg        the object on black
no_fg          the object's pixels blacked out
only_bg_b      the object's bounding box blacked out
only_bg_t      the box filled by tiling the image's largest box-free strip
mixed_same     the object on the only_bg_t of another image of the same class
mixed_rand     the object on the only_bg_t of an image of a random other class
mixed_next     the object on the only_bg_t of an image of the next class (y + 1 mod K)
=============  ==============================================================================

Accuracy is always measured against the object's label (for the ``only_bg`` and ``no_fg``
variants lower means less background reliance). Metrics, in percent:

* ``bg_gap`` = mixed_same - mixed_rand;
* ``challenge_accuracy``: the share of test foregrounds that no background of the only_bg_t pool can
  flip (a foreground counts only if it is classified correctly on every background);
* ``worst_group_accuracy``: the lowest accuracy over (label, bg_label) groups, where the groups are
  formed from the original test images and their background-swapped variants (mixed_same,
  mixed_rand, mixed_next), so that every object/background pairing is represented; groups with
  fewer than ``min_group_size`` images are not counted.

Texture bias (a dataset of the texture benchmark, ``generate.py --bias texture``, whose extra splits
``cue_conflict``, ``silhouette`` and ``texture_only`` are found in the dataset): the accuracy on each of
those splits joins ``accuracy`` (against the shape's class; for texture_only the class whose texture
it is), and

* ``shape_bias``: among the cue_conflict images classified as either their shape's class or their
  texture's class (``bg_label``), the share classified by the shape (Geirhos et al., ICLR 2019);
  ``details.shape_bias`` has the counts;
* ``worst_group_accuracy`` is taken over (shape, texture) groups of the originals and the cue-conflict
  images. The Background Challenge variants are not built (the background is plain and uncorrelated),
  so ``bg_gap`` and ``challenge_accuracy`` are None.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from augment import trust
from augment.imageops import box_mask, mask_bbox, paste, tile_fill, to_mask
from augment.seeding import item_rng
from augment.sources.bgchallenge import VARIANTS  # the eight, in the release's order

MIXED = ("mixed_same", "mixed_rand", "mixed_next")
TEXTURE_SPLITS = ("cue_conflict", "silhouette", "texture_only")


@dataclass
class EvalSet:
    """The originals of a split, decoded: images (N, H, W, 3) uint8, masks (N, H, W) bool or None."""

    images: np.ndarray
    labels: np.ndarray
    bg_labels: np.ndarray
    masks: np.ndarray | None
    ids: list[str]
    class_names: list[str]

    @property
    def bg_keys(self) -> np.ndarray:
        """The class whose background each image carries (bg_label, or the label when unknown)."""
        return np.where(self.bg_labels >= 0, self.bg_labels, self.labels)


@dataclass
class Variant:
    images: np.ndarray
    labels: np.ndarray
    bg_keys: np.ndarray
    source: np.ndarray  # index into the EvalSet of the image whose object the variant shows
    background: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )  # index of the bg source


def load_eval_set(
    dataset_dir: str, split: str = "test", limit: int | None = None, size: int | None = None
) -> EvalSet:
    """The ``kind=original`` rows of ``split`` of a dataset folder, resized to ``size`` if given."""
    from PIL import Image

    from augment.dataset import load_counterfactual_dataset

    from .data import decode

    ds = load_counterfactual_dataset(dataset_dir)
    if split not in ds:
        raise ValueError(f"{dataset_dir} has no {split!r} split (it has {list(ds)})")
    d = ds[split]
    class_names = list(d.features["label"].names)
    kinds = d["kind"]
    rows = [i for i, k in enumerate(kinds) if k == "original"]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{dataset_dir}: split {split!r} has no original rows")
    sub = d.select(rows)
    from datasets import Image as ImageFeature

    raw = sub.cast_column("image", ImageFeature(decode=False)).cast_column("mask", ImageFeature(decode=False))
    images, masks = [], []
    any_mask = True
    target = None
    for entry in raw.select_columns(["image", "mask"]):
        img = decode(entry["image"])
        if target is None:
            target = (size, size) if size else img.size
        if img.size != target:
            img = img.resize(target, Image.BILINEAR)
        images.append(np.asarray(img))
        m = decode(entry["mask"], "L")
        if m is None:
            any_mask = False
            masks.append(np.zeros(images[-1].shape[:2], dtype=bool))
        else:
            if m.size != target:
                m = m.resize(target, Image.NEAREST)
            masks.append(to_mask(m))
    return EvalSet(
        images=np.stack(images),
        labels=np.asarray(sub["label"], dtype=np.int64),
        bg_labels=np.asarray(sub["bg_label"], dtype=np.int64),
        masks=np.stack(masks) if any_mask else None,
        ids=list(sub["id"]),
        class_names=class_names,
    )


def load_texture_sets(dataset_dir: str, limit: int | None = None) -> dict[str, EvalSet]:
    """The texture benchmark's test splits (cue_conflict, silhouette, texture_only) that the dataset has,
    each as an :class:`EvalSet`; empty for a dataset without them."""
    from augment.dataset import load_counterfactual_dataset

    present = set(load_counterfactual_dataset(dataset_dir))
    return {name: load_eval_set(dataset_dir, name, limit) for name in TEXTURE_SPLITS if name in present}


def shape_bias(preds: np.ndarray, shape_labels: np.ndarray, texture_labels: np.ndarray) -> dict[str, Any]:
    """Shape bias (percent) of cue-conflict predictions: shape decisions / (shape + texture decisions).

    Images whose texture class equals their shape class, or whose texture class is unknown (< 0), are
    not cue-conflict images and are left out. ``value`` is None when no prediction is either class.
    """
    preds, shape_labels, texture_labels = (np.asarray(a) for a in (preds, shape_labels, texture_labels))
    conflict = (texture_labels >= 0) & (texture_labels != shape_labels)
    shape = int(((preds == shape_labels) & conflict).sum())
    texture = int(((preds == texture_labels) & conflict).sum())
    decided = shape + texture
    return {
        "value": 100.0 * shape / decided if decided else None,
        "shape_decisions": shape,
        "texture_decisions": texture,
        "cue_conflict_images": int(conflict.sum()),
    }


def _choose(rng: np.random.Generator, pool: np.ndarray) -> int:
    return int(pool[rng.integers(pool.size)]) if pool.size else -1


def build_variants(data: EvalSet, seed: int = 0, variants: tuple[str, ...] = VARIANTS) -> dict[str, Variant]:
    """Build the requested Background Challenge variants (see the module docstring).

    Images whose mask is empty are left out of every variant but ``original``; a mixed variant
    leaves out an image for which no background of the required class exists. Background choices
    are seeded per image, so the variants are the same from run to run.
    """
    n = len(data.labels)
    all_idx = np.arange(n)
    out: dict[str, Variant] = {}
    if "original" in variants:
        out["original"] = Variant(data.images, data.labels, data.bg_keys, all_idx, all_idx)
    if data.masks is None:
        return out
    masks = data.masks
    usable = np.flatnonzero(masks.reshape(n, -1).any(axis=1))
    boxes = [mask_bbox(masks[i]) for i in range(n)]
    need_tiled = any(v in variants for v in ("only_bg_t",) + MIXED)
    tiled = {int(i): tile_fill(data.images[i], masks[i], pad=0) for i in usable} if need_tiled else {}
    num_classes = len(data.class_names)

    def simple(name: str, fn) -> None:
        if name in variants and usable.size:
            imgs = np.stack([fn(int(i)) for i in usable])
            out[name] = Variant(imgs, data.labels[usable], data.bg_keys[usable], usable, usable)

    black = np.zeros_like(data.images[0])
    simple("only_fg", lambda i: paste(data.images[i], masks[i], black))
    simple("no_fg", lambda i: np.where(masks[i][..., None], 0, data.images[i]).astype(np.uint8))
    simple(
        "only_bg_b",
        lambda i: np.where(box_mask(masks[i].shape, boxes[i])[..., None], 0, data.images[i]).astype(np.uint8),
    )
    simple("only_bg_t", lambda i: tiled[i])
    labels = data.labels
    for name in MIXED:
        if name not in variants:
            continue
        imgs, src, bgs = [], [], []
        for i in usable.tolist():
            y = labels[i]
            if name == "mixed_same":
                pool = usable[(labels[usable] == y) & (usable != i)]
            elif name == "mixed_rand":
                pool = usable[labels[usable] != y]
            else:
                pool = usable[labels[usable] == (y + 1) % num_classes]
            j = _choose(item_rng(seed, f"{data.ids[i]}/{name}"), pool)
            if j < 0:
                continue
            imgs.append(paste(data.images[i], masks[i], tiled[j]))
            src.append(i)
            bgs.append(j)
        if imgs:
            src_a, bg_a = np.asarray(src), np.asarray(bgs)
            out[name] = Variant(np.stack(imgs), labels[src_a], data.bg_keys[bg_a], src_a, bg_a)
    return out


def _batches(x: np.ndarray, batch_size: int):
    for s in range(0, len(x), batch_size):
        yield s, x[s : s + batch_size]


@torch.no_grad()
def predict(
    model, images: np.ndarray | torch.Tensor, preprocessing, device, batch_size: int = 256
) -> np.ndarray:
    """Predicted classes of uint8 images (N, H, W, 3) or (N, 3, H, W) tensors."""
    from .data import BatchAugment, resize_uint8

    norm = BatchAugment(preprocessing.mean, preprocessing.std).to(device)
    res = preprocessing.resolution
    preds = np.empty(len(images), dtype=np.int64)
    for s, chunk in _batches(images, batch_size):
        x = torch.as_tensor(chunk)
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        x = resize_uint8(x.to(device), res)
        logits = model(pixel_values=norm.normalize(x)).logits
        preds[s : s + len(chunk)] = logits.argmax(-1).cpu().numpy()
    return preds


@torch.no_grad()
def challenge_accuracy(
    model,
    data: EvalSet,
    preprocessing,
    device,
    pool_per_class: int | None = None,
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = False,
    only_bg_t: Variant | None = None,
) -> tuple[float, int]:
    """Share (percent) of foregrounds that no only_bg_t background of the pool can flip, and the pool size.

    The pool holds every usable test image's only_bg_t, or ``pool_per_class`` of each class
    (chosen with ``seed``) when given, to bound the N x M forward passes. ``only_bg_t``: the variant
    already built by :func:`build_variants`, reused instead of tiling the backgrounds again.
    """
    from .data import BatchAugment, resize_uint8

    if data.masks is None:
        raise ValueError("challenge accuracy needs foreground masks")
    n = len(data.labels)
    usable = np.flatnonzero(data.masks.reshape(n, -1).any(axis=1))
    if pool_per_class:
        rng = np.random.default_rng(seed)
        pool = np.concatenate(
            [
                rng.permutation(usable[data.labels[usable] == y])[:pool_per_class]
                for y in np.unique(data.labels[usable])
            ]
        )
    else:
        pool = usable
    norm = BatchAugment(preprocessing.mean, preprocessing.std).to(device)
    res = preprocessing.resolution
    if only_bg_t is not None:
        position = {int(i): k for k, i in enumerate(only_bg_t.source)}
        tiled = [only_bg_t.images[position[int(j)]] for j in pool]
    else:
        tiled = [tile_fill(data.images[j], data.masks[j], pad=0) for j in pool]
    backgrounds = torch.as_tensor(np.stack(tiled)).permute(0, 3, 1, 2)
    fgs = torch.as_tensor(data.images[usable]).permute(0, 3, 1, 2)
    fmask = torch.as_tensor(data.masks[usable])[:, None]
    labels = torch.as_tensor(data.labels[usable])
    robust = torch.ones(len(usable), dtype=torch.bool)
    m = len(pool)
    per_fg = max(1, batch_size // m) if m <= batch_size else 1
    bg_dev = backgrounds.to(device)
    for s in tqdm(range(0, len(usable), per_fg), desc="challenge", disable=not progress, leave=False):
        f, fm = fgs[s : s + per_fg].to(device), fmask[s : s + per_fg].to(device)
        for b0 in range(0, m, batch_size):
            bg = bg_dev[b0 : b0 + batch_size]
            mixed = torch.where(fm[:, None], f[:, None], bg[None])  # (F, M', 3, H, W)
            x = resize_uint8(mixed.reshape(-1, *mixed.shape[2:]), res)
            pred = model(pixel_values=norm.normalize(x)).logits.argmax(-1).view(len(f), -1).cpu()
            robust[s : s + per_fg] &= (pred == labels[s : s + per_fg, None]).all(dim=1)
    return float(robust.float().mean() * 100), int(m)


def group_accuracies(
    preds: dict[str, np.ndarray], variants: dict[str, Variant], min_group_size: int = 5
) -> dict[str, Any]:
    """Accuracy per (label, bg_label) group over original + mixed (or cue_conflict) variants, and the
    worst group."""
    correct, total = defaultdict(int), defaultdict(int)
    for name in ("original",) + MIXED + ("cue_conflict",):
        if name not in variants:
            continue
        v = variants[name]
        for y, b, ok in zip(v.labels.tolist(), v.bg_keys.tolist(), (preds[name] == v.labels).tolist()):
            total[(y, b)] += 1
            correct[(y, b)] += int(ok)
    groups = {
        f"{y},{b}": {"n": total[(y, b)], "accuracy": 100.0 * correct[(y, b)] / total[(y, b)]}
        for (y, b) in sorted(total)
    }
    counted = [g for g in groups.values() if g["n"] >= min_group_size]
    worst = min((g["accuracy"] for g in counted), default=float("nan"))
    return {
        "worst_group_accuracy": worst,
        "groups": groups,
        "groups_counted": len(counted),
        "min_group_size": min_group_size,
    }


def evaluate_model(
    model,
    preprocessing,
    data: EvalSet,
    device: torch.device | str = "cpu",
    seed: int = 0,
    challenge_pool_per_class: int | None = 10,
    min_group_size: int = 5,
    batch_size: int = 256,
    progress: bool = False,
    texture_sets: dict[str, EvalSet] | None = None,
) -> dict[str, Any]:
    """The evaluation report (dict) of ``model`` on ``data``; keys as in DESIGN.md, values in percent.

    ``texture_sets`` (from :func:`load_texture_sets`): the texture benchmark's test splits; when given,
    the texture measures replace the Background Challenge ones (see the module docstring).
    """
    model = model.to(device).eval()
    t0 = time.perf_counter()
    texture = bool(texture_sets)
    variants = build_variants(data, seed=seed, variants=("original",) if texture else VARIANTS)
    for name, ts in (texture_sets or {}).items():
        variants[name] = Variant(ts.images, ts.labels, ts.bg_keys, np.arange(len(ts.labels)))
    preds = {}
    for name in tqdm(list(variants), desc="variants", disable=not progress, leave=False):
        preds[name] = predict(model, variants[name].images, preprocessing, device, batch_size)
    accuracy = {name: 100.0 * float((preds[name] == v.labels).mean()) for name, v in variants.items()}
    report: dict[str, Any] = {"accuracy": accuracy}
    if "mixed_same" in accuracy and "mixed_rand" in accuracy:
        report["bg_gap"] = accuracy["mixed_same"] - accuracy["mixed_rand"]
    else:
        report["bg_gap"] = None
    if texture and "cue_conflict" in texture_sets:
        cc = texture_sets["cue_conflict"]
        bias = shape_bias(preds["cue_conflict"], cc.labels, cc.bg_labels)
        report["shape_bias"] = bias.pop("value")
    groups = group_accuracies(preds, variants, min_group_size)
    report["worst_group_accuracy"] = groups.pop("worst_group_accuracy")
    if texture:
        report["challenge_accuracy"], pool = None, 0
    elif data.masks is not None:
        report["challenge_accuracy"], pool = challenge_accuracy(
            model,
            data,
            preprocessing,
            device,
            challenge_pool_per_class,
            seed,
            progress=progress,
            only_bg_t=variants.get("only_bg_t"),
        )
    else:
        report["challenge_accuracy"], pool = None, 0
    report["details"] = {
        "num_images": {name: int(len(v.labels)) for name, v in variants.items()},
        "challenge_pool": pool,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        **groups,
    }
    if texture:
        report["details"]["bias"] = "texture"
        if "cue_conflict" in texture_sets:
            report["details"]["shape_bias"] = bias
    if data.masks is None:
        report["details"]["note"] = (
            "no foreground masks in this split: only the original accuracy can be measured"
        )
    return report


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=(
            "Measure a classifier's background reliance: accuracy on the Background Challenge variants built "
            "from the split's foreground masks, BG-gap, challenge accuracy and worst-group accuracy. On a "
            "dataset of the texture benchmark (generate.py --bias texture) the texture reliance instead: "
            "accuracy on its cue_conflict, silhouette and texture_only splits and the shape bias. Writes "
            "report.json, report.md and report.png into --output."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="model folder written by scripts/train.py (or a transformers model id/folder)",
    )
    p.add_argument("--dataset", help="dataset folder written by scripts/generate.py")
    p.add_argument(
        "--bgchallenge",
        metavar="ROOT",
        help="evaluate on the Background Challenge's released variants (ROOT/<variant>/val/<class_dir>/...) "
        "instead of variants built from --dataset's masks",
    )
    p.add_argument("--output", required=True, help="folder for report.json, report.md, report.png")
    p.add_argument(
        "--split",
        help="split to evaluate (default: test; validation with --hard-imagenet, its 750-image set)",
    )
    g = p.add_argument_group("Hard ImageNet measures (--hard-imagenet)")
    g.add_argument(
        "--hard-imagenet",
        action="store_true",
        help="also measure the accuracy drop when the object is greyed / its box greyed / its box filled "
        "with background, relative foreground sensitivity (RFS) and Grad-CAM-mask IoU; writes "
        "hard_imagenet.json/.md/.png",
    )
    g.add_argument("--noise-std", type=float, default=0.25, help="RFS: Gaussian noise std in [0, 1] units")
    g.add_argument("--rfs-trials", type=int, default=3, help="RFS: noise draws averaged")
    g.add_argument("--no-saliency", dest="saliency", action="store_false", help="skip the Grad-CAM IoU")
    g.add_argument("--saliency-layer", help="module name for Grad-CAM (default: the last spatial conv stage)")
    p.add_argument("--seed", type=int, default=0, help="seed of the background choices of the mixed variants")
    p.add_argument("--limit", type=int, help="evaluate only the first N originals")
    p.add_argument(
        "--challenge-pool-per-class",
        type=int,
        default=None,
        help="only_bg_t backgrounds per class in the challenge pool; 0: all (default: 10 with --dataset, "
        "all with --bgchallenge, as the benchmark defines it: a GPU job at full size)",
    )
    p.add_argument(
        "--min-group-size",
        type=int,
        default=5,
        help="smallest (label, bg_label) group counted by worst-group accuracy",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    trust.add_arguments(p.add_argument_group("loading models"))
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    trust.configure(getattr(args, "trust_remote_code", False), getattr(args, "allow_bin_weights", False))
    from .models import load_classifier
    from .report import write_evaluation_report

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if bool(args.dataset) == bool(args.bgchallenge):
        raise ValueError("give exactly one of --dataset DIR and --bgchallenge ROOT")
    model, pre = load_classifier(args.model)
    if args.bgchallenge:
        from .bgchallenge import evaluate_shipped, write_shipped_report

        report = evaluate_shipped(
            model,
            pre,
            args.bgchallenge,
            device=device,
            batch_size=args.batch_size,
            progress=args.progress,
            split="val",
            pool_per_class=args.challenge_pool_per_class or None,
            seed=args.seed,
            min_group_size=args.min_group_size,
        )
        report["model"] = str(args.model)
        write_shipped_report(report, args.output)
        return report
    pool = 10 if args.challenge_pool_per_class is None else args.challenge_pool_per_class
    args.split = args.split or ("validation" if args.hard_imagenet else "test")
    data = load_eval_set(args.dataset, args.split, args.limit)
    texture_sets = load_texture_sets(args.dataset, args.limit) if args.split == "test" else {}
    names = list(getattr(model.config, "id2label", {}).values())
    if names and len(names) == len(data.class_names) and names != data.class_names:
        print(
            f"evaluate.py: warning: the model's classes {names} differ from the dataset's {data.class_names}",
            file=sys.stderr,
        )
    report = evaluate_model(
        model,
        pre,
        data,
        device=device,
        seed=args.seed,
        challenge_pool_per_class=pool or None,
        min_group_size=args.min_group_size,
        batch_size=args.batch_size,
        progress=args.progress,
        texture_sets=texture_sets,
    )
    report["model"] = str(args.model)
    report["dataset"] = str(args.dataset)
    report["split"] = args.split
    if args.hard_imagenet:
        from .hard_imagenet import evaluate_hard_imagenet, write_hard_imagenet_report

        sized = load_eval_set(args.dataset, args.split, args.limit, size=pre.resolution)
        if sized.masks is None:
            raise ValueError(
                f"{args.dataset}: --hard-imagenet needs object masks on every {args.split} image"
            )
        report["hard_imagenet"] = evaluate_hard_imagenet(
            model,
            pre,
            sized.images,
            sized.masks,
            sized.labels,
            device=device,
            batch_size=args.batch_size,
            noise_std=args.noise_std,
            seed=args.seed,
            progress=args.progress,
            trials=args.rfs_trials,
            saliency=args.saliency,
            saliency_layer=args.saliency_layer,
            class_names=sized.class_names,
        )
        write_hard_imagenet_report(report["hard_imagenet"], args.output)
    what = "Texture reliance" if texture_sets else "Background reliance"
    write_evaluation_report(report, args.output, title=f"{what} of {Path(args.model).name}")
    return report


def cli(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = main(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    acc = report["accuracy"]
    summary = {"accuracy": {k: round(v, 2) for k, v in acc.items()}, "bg_gap": report["bg_gap"]}
    if "shape_bias" in report:
        summary["shape_bias"] = report["shape_bias"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {os.path.join(args.output, 'report.json')}")
    return 0
