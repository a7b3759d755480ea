"""Explanation-driven positives (ExCon): content-preserving views from the classifier's own saliency.

For an image x of class y, the Grad-CAM map of y (:func:`debias.saliency.grad_cam`, min-max normalised
per image to [0, 1]) splits the pixels in two: those with importance above ``threshold`` are kept and
the others are replaced by the dataset's mean colour. That masked view is the positive of x when the
classifier still predicts y on it (the explanation was sufficient for the decision); otherwise the
positive falls back to x itself, which the trainer augments like any view (a SimCLR-style positive).
The complement (the low-saliency pixels kept, the salient ones replaced) can serve as a negative: the
part of the image the classifier did not need.

Everything is batched: one Grad-CAM pass and one forward pass over the masked views per batch, the
masking a ``torch.where``. No segmentation is needed, so every dataset can be trained with the CLAD
objective, with or without masks.

* :func:`excon_views`: the views of a batch (used by the trainer's refresh and by the generator).
* :class:`SaliencyPositives`: the trainer's per-row cache of keep-masks, refreshed every
  ``--saliency-refresh-epochs`` epochs and saved with every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

MODES = ("missing", "all")
CAM_MIN_SIZE = 4  # as the demo: the deepest stage whose map is at least 4 x 4 (the last is 2 x 2 at 64 px)


class _LogitsOf(nn.Module):
    """``model(pixel_values=x)`` -> logits, for a classifier returning ``(logits, features)`` or a
    transformers output (what :func:`debias.saliency.grad_cam` calls)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values)
        if isinstance(out, tuple):
            return out[0]
        return out.logits if hasattr(out, "logits") else out


def keep_masks(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels kept in the masked view: importance strictly above ``threshold``. # maps: (B, H, W)"""
    return maps > threshold


def mask_views(images: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """``images`` (B, 3, H, W) uint8 with the pixels outside ``keep`` (B, H, W) set to ``fill`` (3,)."""
    return torch.where(keep[:, None], images, fill.to(images.dtype).view(1, 3, 1, 1).to(images.device))


def complement_views(images: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The complement of :func:`mask_views`: the pixels inside ``keep`` set to ``fill``."""
    return mask_views(images, ~keep, fill)


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    """The mean RGB colour (3,) uint8 of uint8 images (N, 3, H, W), rounded."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    total = images.double().sum(dim=(0, 2, 3)) / max(images.shape[0] * images.shape[2] * images.shape[3], 1)
    return total.round().clamp(0, 255).to(torch.uint8)


@dataclass
class ExConViews:
    """Saliency views of a batch of B images of H x W pixels.

    ``positives`` (B, 3, H, W) uint8: the masked view where ``kept_prediction``, else the image itself;
    ``keep`` (B, H, W) bool: the pixels the masked view keeps; ``kept_prediction`` (B,) bool: the
    classifier predicts the label on the masked view (the item got a saliency view); ``predictions``
    (B,): its prediction on the masked view; ``complements`` (B, 3, H, W) uint8 or None: the
    complement views; ``maps`` (B, H, W): the Grad-CAM maps in [0, 1].
    """

    positives: torch.Tensor
    keep: torch.Tensor
    kept_prediction: torch.Tensor
    predictions: torch.Tensor
    complements: torch.Tensor | None
    maps: torch.Tensor


def cam_layer(model: nn.Module, example: torch.Tensor, min_size: int | None = CAM_MIN_SIZE) -> str:
    """Name of the Grad-CAM layer for ``model`` (``(logits, features)`` or transformers outputs):
    the deepest convolutional stage with a map of at least ``min_size`` x ``min_size``, else the
    deepest one. ``example``: one normalised input (1, 3, H, W)."""
    from .saliency import find_cam_layer

    adapter = _LogitsOf(model)
    was_training = model.training
    try:
        try:
            name = find_cam_layer(adapter, example, min_size=min_size)[0]
        except ValueError:
            name = find_cam_layer(adapter, example)[0]
    finally:
        model.train(was_training)
    return name.removeprefix("model.")


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _LogitsOf(model)(x).argmax(-1)


def excon_views(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    normalize,
    fill: torch.Tensor | Sequence[int],
    threshold: float = 0.5,
    layer: str | None = None,
    negatives: bool = False,
    batch_size: int = 64,
) -> ExConViews:
    """ExCon views of uint8 ``images`` (B, 3, H, W) of classes ``labels`` (B,) (module docstring).

    Args:
        model: the classifier, ``model(x) -> (logits, features)`` (:class:`~debias.models.ClassifierWithFeatures`)
            or a transformers image classifier; it is put in eval mode for the duration and its
            training flag restored after; parameters, their ``.grad`` and BN statistics are untouched.
        normalize: maps a uint8 batch (b, 3, H, W) on the model's device to the model's input (resizing
            it when the model wants another size; the maps are brought back to H x W).
        fill: the colour (3,) uint8 that replaces the dropped pixels (the dataset's mean colour).
        threshold: pixels whose normalised Grad-CAM value is <= ``threshold`` are replaced.
        layer: Grad-CAM layer, a name in ``model.named_modules()`` (default: :func:`cam_layer`).
        negatives: also return the complement views.
    """
    from .saliency import grad_cam

    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    labels = torch.as_tensor(labels).long()
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    fill = torch.as_tensor(fill, dtype=torch.uint8)
    if fill.shape != (3,):
        raise ValueError(f"fill must be an RGB colour (3,), got shape {tuple(fill.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    adapter = _LogitsOf(model)
    size = tuple(images.shape[-2:])
    positives, keeps, kept, preds, comps, all_maps = [], [], [], [], [], []
    try:
        for s in range(0, len(images), batch_size):
            x = images[s : s + batch_size].to(device)
            y = labels[s : s + batch_size].to(device)
            xin = normalize(x)
            name = layer or cam_layer(model, xin[:1])
            module = dict(model.named_modules()).get(name)
            if module is None:
                raise ValueError(f"{type(model).__name__} has no module named {name!r} for Grad-CAM")
            maps = torch.from_numpy(grad_cam(adapter, xin, y, layer=module, batch_size=len(x))).to(device)
            if tuple(maps.shape[-2:]) != size:
                maps = nn.functional.interpolate(maps[:, None], size=size, mode="bilinear")[:, 0]
            keep = keep_masks(maps, threshold)
            view = mask_views(x, keep, fill)
            pred = _predict(model, normalize(view))
            ok = pred == y
            positives.append(torch.where(ok[:, None, None, None], view, x).cpu())
            keeps.append(keep.cpu())
            kept.append(ok.cpu())
            preds.append(pred.cpu())
            all_maps.append(maps.cpu())
            if negatives:
                comps.append(complement_views(x, keep, fill).cpu())
    finally:
        model.train(was_training)
    if not positives:
        h, w = size
        empty = torch.zeros(0, 3, h, w, dtype=torch.uint8)
        return ExConViews(
            empty,
            torch.zeros(0, h, w, dtype=torch.bool),
            torch.zeros(0, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
            empty if negatives else None,
            torch.zeros(0, h, w),
        )
    return ExConViews(
        positives=torch.cat(positives),
        keep=torch.cat(keeps),
        kept_prediction=torch.cat(kept),
        predictions=torch.cat(preds),
        complements=torch.cat(comps) if negatives else None,
        maps=torch.cat(all_maps),
    )


# ----------------------------------------------------------------------------------------------
# The trainer's cache
# ----------------------------------------------------------------------------------------------


class SaliencyPositives:
    """Per training row, the keep-mask of its saliency view and whether the view kept the prediction.

    Rows that take part (``eligible``): with ``mode="missing"`` the rows for which the data set has no
    counterfactual positive (no stored ``kind=positive`` row and no mask to composite one from); with
    ``mode="all"`` every row, its counterfactual positives ignored. :meth:`refresh` recomputes the
    masks of the eligible rows with the current model (eval mode, on every process a share of the
    rows, gathered); :meth:`apply` puts the views into a training batch:

    * ``positive``: the masked view where it kept the prediction, else the anchor itself (augmented by
      the trainer like any positive); ``has_positive`` is set;
    * ``positive_bg`` (the dictionary key the positive's features are pushed under): never the anchor's
      class, since the view carries no background of its own: the anchor's background class when it is
      known and differs from the label (a bias-conflicting original), else another class, spread over
      the classes by row;
    * with ``negatives``: the complement view as one more stored negative, valid where the masked view
      kept the prediction.

    Only the masks (bool, at the training resolution) are stored: the views are recomputed from the
    anchors, so :meth:`state_dict` is small and a resumed run uses exactly the same views.
    """

    def __init__(
        self,
        train_set,
        mode: str = "missing",
        threshold: float = 0.5,
        refresh_epochs: int = 1,
        negatives: bool = False,
        layer: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if refresh_epochs < 1:
            raise ValueError(f"refresh_epochs must be >= 1, got {refresh_epochs}")
        self.train_set = train_set
        self.mode, self.threshold, self.refresh_epochs = mode, threshold, refresh_epochs
        self.negatives, self.layer = negatives, layer
        idx = train_set.index
        n, r = len(train_set), train_set.resolution
        if mode == "all":
            eligible = np.ones(n, dtype=bool)
        else:
            eligible = np.array([not train_set.has_counterfactual_positive(k) for k in range(n)], dtype=bool)
        self.eligible = torch.from_numpy(eligible)
        labels = torch.as_tensor(idx.labels, dtype=torch.long)
        self.labels = labels
        bg = torch.tensor([train_set.anchor_bg_key(k) for k in range(n)], dtype=torch.long)
        self.anchor_bg = bg
        c = max(int(train_set.num_classes), 1)
        spread = (labels + 1 + torch.arange(n) % max(c - 1, 1)) % c
        self.push_key = torch.where(bg != labels, bg, spread if c > 1 else labels)
        self.keep = torch.zeros(n, r, r, dtype=torch.bool)
        self.kept = torch.zeros(n, dtype=torch.bool)
        self.fill = mean_colour(torch.stack([train_set.store.image(int(o)) for o in idx.originals]))
        self.refreshed_epoch = -1
        self.refreshes: list[dict[str, Any]] = []

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "kept": self.kept,
            "eligible": self.eligible,
            "refreshed_epoch": self.refreshed_epoch,
            "refreshes": list(self.refreshes),
            "layer": self.layer,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["keep"].shape != self.keep.shape or not torch.equal(state["eligible"], self.eligible):
            raise ValueError(
                "the checkpoint's saliency cache was made for other training rows or another resolution "
                f"({tuple(state['keep'].shape)} vs {tuple(self.keep.shape)}) or another --saliency-positives mode"
            )
        self.keep.copy_(state["keep"])
        self.kept.copy_(state["kept"])
        self.refreshed_epoch = int(state["refreshed_epoch"])
        self.refreshes = list(state["refreshes"])
        self.layer = state["layer"]

    # -- refresh --------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """Whether :meth:`refresh` runs at the start of ``epoch``: every ``refresh_epochs`` epochs from
        epoch 0, and whenever the cache is still empty (not at a resumed epoch already refreshed)."""
        if self.refreshed_epoch < 0:
            return True
        return epoch % self.refresh_epochs == 0 and self.refreshed_epoch != epoch

    def refresh(
        self, model: nn.Module, normalize, epoch: int, accelerator=None, batch_size: int = 256
    ) -> dict:
        """Recompute the keep-masks of the eligible rows with ``model`` (unwrapped, ``(logits, features)``).

        With several processes each computes a contiguous share of the rows and the shares are
        gathered, so every process ends with the same cache. Returns the refresh's record.
        """
        rows = torch.nonzero(self.eligible).flatten()
        n = len(rows)
        procs = accelerator.num_processes if accelerator is not None else 1
        rank = accelerator.process_index if accelerator is not None else 0
        share = math.ceil(n / procs) if n else 0
        mine = rows[rank * share : (rank + 1) * share]
        pad = share - len(mine)
        if pad and n:  # equal sizes for the gather; the padding rows are dropped after it
            mine = torch.cat([mine, rows[:1].repeat(pad)])
        orig = self.train_set.index.originals
        r = self.train_set.resolution
        if len(mine):
            images = torch.stack([self.train_set.store.image(int(orig[k])) for k in mine.tolist()])
        else:
            images = torch.zeros(0, 3, r, r, dtype=torch.uint8)
        if self.layer is None and len(images):
            device = next(model.parameters()).device
            self.layer = cam_layer(model, normalize(images[:1].to(device)))
        views = excon_views(
            model,
            images,
            self.labels[mine],
            normalize,
            self.fill,
            self.threshold,
            layer=self.layer,
            batch_size=batch_size,
        )
        keep, kept = views.keep, views.kept_prediction
        if procs > 1:
            device = accelerator.device
            keep = accelerator.gather(keep.to(torch.uint8).to(device)).cpu().bool()
            kept = accelerator.gather(kept.to(torch.uint8).to(device)).cpu().bool()
            order = torch.cat([torch.arange(p * share, p * share + share) for p in range(procs)])
            keep, kept = keep[order][:n], kept[order][:n]
        else:
            keep, kept = keep[:n], kept[:n]
        self.keep[rows] = keep
        self.kept[rows] = kept
        self.refreshed_epoch = epoch
        record = {
            "epoch": epoch,
            "rows": n,
            "saliency_views": int(kept.sum()),
            "fallbacks": n - int(kept.sum()),
        }
        self.refreshes.append(record)
        return record

    # -- batches --------------------------------------------------------------------------------
    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with the saliency views put in (see the class docstring); ``batch["index"]`` names
        the training rows. Adds ``saliency_view`` (B,) bool: the items whose positive is a saliency view."""
        k = batch["index"].cpu()
        anchor = batch["anchor"]
        device = anchor.device
        use = self.eligible[k].to(device)
        if self.mode == "missing" and "has_positive" in batch:
            use = use & ~batch["has_positive"].bool()
        keep = self.keep[k].to(device)
        kept = self.kept[k].to(device) & use
        view = torch.where(kept[:, None, None, None], mask_views(anchor, keep, self.fill), anchor)
        out = dict(batch)
        u4 = use[:, None, None, None]
        out["positive"] = torch.where(u4, view, batch["positive"]) if "positive" in batch else view
        out["has_positive"] = batch["has_positive"].bool() | use if "has_positive" in batch else use.clone()
        key = self.push_key[k].to(device)
        out["positive_bg"] = torch.where(use, key, batch["positive_bg"]) if "positive_bg" in batch else key
        if "anchor_bg" not in batch:
            out["anchor_bg"] = self.anchor_bg[k].to(device)
        out["saliency_view"] = kept
        if self.negatives:
            comp = complement_views(anchor, keep, self.fill)[:, None]
            if "negatives" in batch:
                out["negatives"] = torch.cat([batch["negatives"], comp], 1)
                out["negative_valid"] = torch.cat([batch["negative_valid"], kept[:, None]], 1)
            else:
                out["negatives"], out["negative_valid"] = comp, kept[:, None].clone()
        return out

    def summary(self, epochs: Sequence[int] = ()) -> dict[str, Any]:
        """The settings and counts for the trainer's summary and model card. ``epochs``: the epochs run;
        ``saliency_positives_total`` sums, over them, the rows offered a saliency view in that epoch (by
        the refresh in force; each row is drawn once per epoch, less the rows a dropped last batch leaves
        out)."""
        in_force = []
        for e in sorted(set(epochs)):
            done = [r for r in self.refreshes if r["epoch"] <= e]
            if done:
                in_force.append(done[-1]["saliency_views"])
        last = self.refreshes[-1] if self.refreshes else None
        return {
            "mode": self.mode,
            "threshold": self.threshold,
            "refresh_epochs": self.refresh_epochs,
            "negatives": self.negatives,
            "cam_layer": self.layer,
            "fill": self.fill.tolist(),
            "eligible_rows": int(self.eligible.sum()),
            "refreshes": self.refreshes,
            "saliency_positives_last_refresh": last["saliency_views"] if last else 0,
            "saliency_positives_total": int(sum(in_force)),
        }
