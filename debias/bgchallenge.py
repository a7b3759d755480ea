"""Evaluation on the Background Challenge's shipped variants: ``ROOT/<variant>/val/<class>/<file>``.

:func:`debias.evaluate.evaluate_model` builds the eight variants from a dataset's masks; this module
reads the ones the benchmark released (Xiao et al., ICLR 2021) and returns the same report:

* ``accuracy``: top-1 per variant present, in percent, against the class folder's label (for
  ``mixed_*`` the folder is the foreground's class);
* ``bg_gap`` = mixed_same - mixed_rand;
* ``challenge_accuracy``: the benchmark's definition, the share of foregrounds (``only_fg`` images)
  that are classified correctly when pasted onto *every* background of the ``only_bg_t`` pool
  (foreground pixels = the non-black pixels of ``only_fg``, pasted at the model's resolution);
* ``worst_group_accuracy``: the lowest accuracy over (label, background class) groups of the images
  whose background class is known: ``original`` and ``mixed_same`` (the label's own), ``mixed_next``
  (the next class). The release does not record ``mixed_rand``'s background classes.

Class folders (``00_dog`` ...) give the class indices, in the order of their numeric prefix, and must
match the model's output indices. Files are matched across variants by class folder and file stem;
a variant whose file set differs from ``original``'s is evaluated on its own files and the difference
is counted in ``details["file_mismatch"]``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from augment.sources.base import RejectedInput
from augment.sources.bgchallenge import class_dirs, class_name, class_order, file_key, list_files, non_black
from augment.sources.folder import read_rgb

from .data import to_uint8_tensor
from .evaluate import VARIANTS, Variant, group_accuracies, predict

__all__ = ["ImageFiles", "evaluate_shipped", "robust_foregrounds", "write_shipped_report"]


class ImageFiles:
    """Image files decoded on demand at one square resolution: ``files[a:b]`` is a (n, 3, R, R) uint8 tensor.

    Decoding runs on a few threads (PIL releases the GIL while decoding and resizing). Slicing
    raises :class:`~augment.sources.base.RejectedInput` for a file that cannot be decoded;
    :meth:`load` returns the decodable ones and the reasons of the others instead.
    """

    def __init__(self, paths: Sequence[Path], resolution: int, workers: int | None = None):
        self.paths = list(paths)
        self.resolution = resolution
        self.workers = workers or min(4, os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.paths)

    def _one(self, path: Path) -> torch.Tensor | RejectedInput:
        try:
            return to_uint8_tensor(read_rgb(path), self.resolution)
        except RejectedInput as e:
            return e

    def load(self, s: slice) -> tuple[torch.Tensor, list[int], list[str]]:
        """The decodable images of ``paths[s]``, their positions in the slice, and the others' reasons."""
        paths = self.paths[s]
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                got = list(pool.map(self._one, paths))
        else:
            got = [self._one(p) for p in paths]
        ok = [k for k, g in enumerate(got) if isinstance(g, torch.Tensor)]
        bad = [g.reason for g in got if isinstance(g, RejectedInput)]
        r = self.resolution
        images = torch.stack([got[k] for k in ok]) if ok else torch.zeros(0, 3, r, r, dtype=torch.uint8)
        return images, ok, bad

    def __getitem__(self, s: slice) -> torch.Tensor:
        images, ok, bad = self.load(s)
        if bad:
            raise RejectedInput(bad[0])
        return images


def _as_nchw(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.permute(0, 3, 1, 2) if t.ndim == 4 and t.shape[-1] == 3 and t.shape[1] != 3 else t


@torch.no_grad()
def robust_foregrounds(
    model,
    preprocessing,
    foregrounds: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    backgrounds,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    chunk_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """Which foregrounds the model classifies correctly on every background, and the images classified.

    ``foregrounds`` (N, H, W, 3) or (N, 3, H, W) uint8 and ``masks`` (N, H, W) bool are at the
    model's resolution, as is every background. ``backgrounds`` is anything with ``len`` whose slices
    are such uint8 batches (an array, a tensor, an :class:`ImageFiles`): it is read ``chunk_size``
    backgrounds at a time (default ``batch_size``), each chunk once. Each foreground keeps a
    "still correct" flag; a foreground found wrong is not pasted onto later chunks. The composites are
    classified by :func:`debias.evaluate.predict` in batches of about ``batch_size``.
    """
    fgs = _as_nchw(foregrounds)
    fmask = torch.as_tensor(masks, dtype=torch.bool)
    if fmask.ndim == 3:
        fmask = fmask[:, None]
    y = torch.as_tensor(labels, dtype=torch.long)
    n, m = len(fgs), len(backgrounds)
    if not (len(fmask) == len(y) == n):
        raise ValueError(f"{n} foregrounds, {len(fmask)} masks and {len(y)} labels")
    alive = torch.ones(n, dtype=torch.bool)
    classified = 0
    chunk = max(1, chunk_size or batch_size)
    bar = tqdm(total=m, desc="challenge backgrounds", disable=not progress, leave=False)
    for b0 in range(0, m, chunk):
        if not alive.any():
            break  # every foreground has been flipped: the rest cannot change the answer
        bg = _as_nchw(backgrounds[b0 : b0 + chunk]).to(device)
        if bg.shape[-2:] != fgs.shape[-2:]:
            raise ValueError(
                f"backgrounds are {tuple(bg.shape[-2:])} but foregrounds {tuple(fgs.shape[-2:])}"
            )
        per_fg = max(1, batch_size // len(bg))
        todo = torch.nonzero(alive).flatten()
        for s in range(0, len(todo), per_fg):
            idx = todo[s : s + per_fg]
            f, fm = fgs[idx].to(device), fmask[idx].to(device)
            mixed = torch.where(fm[:, None], f[:, None], bg[None])  # (F, M', 3, H, W)
            pred = predict(model, mixed.reshape(-1, *mixed.shape[2:]), preprocessing, device, batch_size)
            classified += pred.size
            ok = torch.from_numpy(pred).view(len(idx), len(bg)) == y[idx, None]
            alive[idx] &= ok.all(dim=1)
        bar.update(len(bg))
    bar.close()
    return alive.numpy(), classified


def _index(root: Path, variant: str, split: str) -> dict[str, list[tuple[str, Path]]]:
    """``{class_dir: [(stem, path), ...]}`` of one variant (``""``: files outside class folders)."""
    return {
        cdir: [(file_key(p), p) for p in files] for cdir, files in list_files(root / variant / split).items()
    }


def _subsample(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``per_class`` items of each class, chosen with ``seed``, in their order."""
    if not per_class:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _foregrounds(paths: list[Path], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """only_fg images at ``resolution`` and their masks (non-black at full size, resized, > half)."""
    images = torch.zeros(len(paths), 3, resolution, resolution, dtype=torch.uint8)
    masks = torch.zeros(len(paths), resolution, resolution, dtype=torch.bool)
    for k, p in enumerate(paths):
        img = read_rgb(p)
        images[k] = to_uint8_tensor(img, resolution)
        m = Image.fromarray(non_black(np.asarray(img)).astype(np.uint8) * 255, "L")
        if m.size != (resolution, resolution):
            m = m.resize((resolution, resolution), Image.BILINEAR)
        masks[k] = torch.from_numpy(np.asarray(m) > 127)
    return images, masks


def evaluate_shipped(
    model,
    pre,
    root: str | os.PathLike,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    split: str = "val",
    variants: Sequence[str] | None = None,
    pool_per_class: int | None = None,
    seed: int = 0,
    min_group_size: int = 5,
    challenge: bool = True,
    chunk_size: int | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """The evaluation report of ``model`` on the variants shipped under ``root`` (module docstring).

    ``model`` and ``pre`` as :func:`debias.models.load_classifier` returns them. ``variants``: the
    variants to read (default all eight; those absent on disk are listed in
    ``details["missing_variants"]``). ``pool_per_class``: only_bg_t backgrounds per class in the
    challenge pool, drawn with ``seed`` (default: every one); ``challenge=False`` skips the challenge.
    ``chunk_size``: backgrounds per chunk of the challenge (default ``batch_size``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    wanted = list(VARIANTS if variants is None else variants)
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    present = [v for v in wanted if (root / v / split).is_dir()]
    missing = [v for v in wanted if v not in present]
    if not present:
        raise FileNotFoundError(
            f"{root}: none of {wanted} has a {split}/ folder (<variant>/{split}/<class>/<file>)"
        )
    t0 = time.perf_counter()
    device = torch.device(device)
    model = model.to(device).eval()
    res = pre.resolution
    # classes: the class folders of original (else of every variant read), by numeric prefix
    reference = "original" if "original" in present else None
    dirs = class_dirs(root / "original" / split) if reference else []
    if not dirs:
        dirs = sorted({d for v in present for d in class_dirs(root / v / split)}, key=class_order)
    names = [class_name(d) for d in dirs]
    label_of = {d: i for i, d in enumerate(dirs)}
    notes: list[str] = []
    model_names = list(getattr(getattr(model, "config", None), "id2label", {}).values())
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and num_labels < len(dirs):
        notes.append(f"the model has {num_labels} outputs but the benchmark {len(dirs)} classes")
    elif model_names and len(model_names) == len(names) and model_names != names:
        notes.append(f"the model's classes {model_names} differ from the benchmark's {names}")

    index = {v: _index(root, v, split) for v in present}
    ref_keys = (
        {(c, s) for c, files in index["original"].items() if c in label_of for s, _ in files}
        if reference
        else None
    )
    preds: dict[str, np.ndarray] = {}
    labels_of: dict[str, np.ndarray] = {}
    entries: dict[str, list[tuple[str, str, Path]]] = {}
    mismatch: dict[str, dict[str, Any]] = {}
    outside: dict[str, list[str]] = {}
    unreadable: dict[str, list[str]] = {}
    for v in tqdm(present, desc="variants", disable=not progress, leave=False):
        items = [(c, s, p) for c, files in index[v].items() if c in label_of for s, p in files]
        # files outside a class folder, or in a class folder original does not have: reported
        stray = [p for c, files in index[v].items() if c not in label_of for _, p in files]
        if stray:
            outside[v] = [p.relative_to(root).as_posix() for p in stray]
        if ref_keys is not None and v != "original":
            keys = {(c, s) for c, s, _ in items}
            only_here, only_there = sorted(keys - ref_keys), sorted(ref_keys - keys)
            if only_here or only_there:
                mismatch[v] = {
                    "not_in_original": len(only_here),
                    "missing_from_variant": len(only_there),
                    "examples": [f"{c}/{s}" for c, s in (only_here + only_there)[:5]],
                }
        files = ImageFiles([p for _, _, p in items], res, workers)
        good, out, bad = [], [], []
        for s in range(0, len(items), max(1, batch_size)):
            images, ok, reasons = files.load(slice(s, s + max(1, batch_size)))
            bad += reasons
            good += [items[s + k] for k in ok]
            if ok:
                out.append(predict(model, images, pre, device, batch_size))
        if bad:
            unreadable[v] = bad  # reported, not fatal
        entries[v] = good
        y = np.asarray([label_of[c] for c, _, _ in good], dtype=np.int64)
        out = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
        preds[v], labels_of[v] = out, y
    accuracy = {v: 100.0 * float((preds[v] == labels_of[v]).mean()) for v in present if len(labels_of[v])}
    report: dict[str, Any] = {"accuracy": accuracy}
    report["bg_gap"] = (
        accuracy["mixed_same"] - accuracy["mixed_rand"]
        if "mixed_same" in accuracy and "mixed_rand" in accuracy
        else None
    )
    # worst group: the images whose background class is known
    k = len(dirs)
    known_bg = {"original": lambda y: y, "mixed_same": lambda y: y, "mixed_next": lambda y: (y + 1) % k}
    group_sets = {
        v: Variant(np.zeros(0, dtype=np.uint8), labels_of[v], known_bg[v](labels_of[v]), np.zeros(0))
        for v in known_bg
        if v in accuracy
    }
    groups = group_accuracies({v: preds[v] for v in group_sets}, group_sets, min_group_size)
    worst = groups.pop("worst_group_accuracy")
    if not group_sets or math.isnan(worst):
        worst = None
        notes.append(
            "worst-group accuracy needs original, mixed_same or mixed_next with groups of at least "
            f"{min_group_size} images"
        )
    else:
        notes.append(
            "worst group: (label, background class) groups of original and mixed_same (own class) and "
            "mixed_next (next class); mixed_rand's background classes are not in the release"
        )
    report["worst_group_accuracy"] = worst
    # challenge accuracy
    pool = 0
    challenge_details: dict[str, Any] = {}
    if not challenge:
        report["challenge_accuracy"] = None
        notes.append("challenge accuracy not computed (challenge=False)")
    elif "only_fg" not in accuracy or "only_bg_t" not in accuracy:
        report["challenge_accuracy"] = None
        notes.append("challenge accuracy needs the only_fg and only_bg_t variants")
    else:
        fg_entries = entries["only_fg"]
        bg_entries = entries["only_bg_t"]
        bg_labels = np.asarray([label_of[c] for c, _, _ in bg_entries], dtype=np.int64)
        chosen = _subsample(bg_labels, pool_per_class, seed)
        pool = int(chosen.size)
        fgs, fmasks = _foregrounds([p for _, _, p in fg_entries], res)
        robust, classified = robust_foregrounds(
            model,
            pre,
            fgs,
            fmasks,
            labels_of["only_fg"],
            ImageFiles([bg_entries[i][2] for i in chosen], res, workers),
            device=device,
            batch_size=batch_size,
            chunk_size=chunk_size,
            progress=progress,
        )
        report["challenge_accuracy"] = 100.0 * float(robust.mean())
        challenge_details = {
            "challenge_foregrounds": len(fg_entries),
            "challenge_robust_foregrounds": int(robust.sum()),
            "challenge_pool_per_class": pool_per_class,
            "challenge_composites_classified": classified,
            "challenge_composites_total": len(fg_entries) * pool,
        }
    details: dict[str, Any] = {
        "benchmark": "Background Challenge, shipped variants",
        "root": str(root),
        "split": split,
        "classes": names,
        "class_dirs": dirs,
        "num_images": {v: int(len(labels_of[v])) for v in present},
        "missing_variants": missing,
        "file_mismatch": mismatch,
        "challenge_pool": pool,
        **challenge_details,
        "seed": seed,
        "resolution": res,
        **groups,
    }
    if outside:  # files outside the class folders of original: not evaluated
        details["not_in_a_class_folder"] = {
            v: {"count": len(f), "examples": f[:5]} for v, f in outside.items()
        }
        notes.append(
            "files outside the class folders, not evaluated: "
            + ", ".join(f"{v} {len(f)}" for v, f in outside.items())
        )
    if unreadable:
        details["unreadable"] = {v: {"count": len(r), "examples": r[:5]} for v, r in unreadable.items()}
        notes.append(
            "unreadable files, not evaluated: " + ", ".join(f"{v} {len(r)}" for v, r in unreadable.items())
        )
    empty = [v for v in present if not len(labels_of[v])]
    if empty:
        notes.append(f"no images in {empty}")
    if missing:
        notes.append(f"variants not on disk: {', '.join(missing)}")
    if mismatch:
        notes.append(
            "file sets differ from original's in "
            + ", ".join(
                f"{v} ({m['not_in_original']} extra, {m['missing_from_variant']} missing)"
                for v, m in mismatch.items()
            )
        )
    details["seconds"] = round(time.perf_counter() - t0, 2)
    details["note"] = "; ".join(notes)
    report["details"] = details
    report["dataset"] = str(root)
    report["split"] = split
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    if name:
        report["model"] = str(name)
    return report


def write_shipped_report(
    report: dict[str, Any], output_dir: str | os.PathLike, title: str | None = None
) -> None:
    """report.json, report.md and report.png, as :func:`debias.report.write_evaluation_report` writes them."""
    from .report import write_evaluation_report

    if title is None:
        model = report.get("model")
        title = "Background Challenge (shipped variants)" + (f": {Path(model).name}" if model else "")
    write_evaluation_report(report, output_dir, title=title)
