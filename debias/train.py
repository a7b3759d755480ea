"""The Accelerate trainer: ERM, augmentation, CLAD and CLAD+.

Run it with ``accelerate launch scripts/train.py --dataset DIR --method clad --output-dir DIR`` on one
process or many (``--multi_gpu --num_processes N``; on CPUs too). Methods, with x an original, x+ its
positive and x- negatives sharing x's background:

=========  ===========================================================================
erm        CE(x)
augment    CE over x and x+ (training on background-swapped images, the "mixed-rand" baseline)
clad       CE(x) + lambda * InfoNCE(x, x+, x-)
clad+      CE(x) + CE(x+) + lambda * InfoNCE(x, x+, x-)
=========  ===========================================================================

The negatives of an anchor of class y are the ``--queue-size`` entries of key y of the negative
dictionary (:mod:`debias.negatives`), as in the CLAD paper, plus, with ``--max-stored-negatives`` k > 0,
k of its stored ``kind=negative`` rows (in-batch). Anchors and positives go through the model in one
forward pass; stored negatives, whose features the loss treats as constants as it does the
dictionary's, in a second one without gradients.

``--loss`` picks the contrastive term (:mod:`debias.losses`): ``infonce`` (CLAD's, one positive), or
``supcon`` / ``eps-supinfonce`` with several positives per anchor: its counterfactual positive and the
other originals of its class in the batch (negatives as for InfoNCE). ``--fairkl-weight`` w > 0 adds
FairKL to the contrastive term, which becomes L_con + w * FairKL (still scaled by ``--lambda-con``);
see :meth:`Objective.candidate_set` for the pairs and backgrounds it uses.

``--saliency-positives`` (:mod:`debias.excon`, ExCon) gives rows without a counterfactual positive
(``missing``) or every row (``all``) a positive made from the model's own Grad-CAM: recomputed at the
start of every ``--saliency-refresh-epochs``-th epoch in eval mode (nothing of the optimiser or the BN
statistics changes), cached per row and saved with each checkpoint, so a resumed run uses the same
views. Its features enter the dictionary under a key other than the anchor's class (the view has no
background of its own). ``train_summary.json`` records the settings and refreshes under ``excon``.

Every epoch the model is evaluated on the validation split's original, mixed_same and mixed_rand
variants, and the epoch with the best ``--selection-metric`` (CLAD's choice: validation mixed_rand)
is the one saved with ``save_pretrained``, with its model card (:mod:`debias.modelcard`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from augment import trust

from .losses import clad_infonce, eps_supinfonce, fairkl, supcon
from .negatives import NegativeDictionary

METHODS = ("erm", "augment", "clad", "clad+")
LOSSES = ("infonce", "supcon", "eps-supinfonce")


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=(
            "Train an image classifier on a counterfactual dataset with ERM, background-swap augmentation, "
            "CLAD or CLAD+ under Hugging Face Accelerate. Defaults follow the CLAD paper (lambda 1, tau 0.2, 32 negatives, "
            "batch 64, Adam 1e-3 divided by 10 at epoch 20, 60 epochs) except where docs/BENCHMARKS.md measured better on "
            "the built-in benchmark: crops of 70-100%% of the image, positives cropped like their anchors."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="dataset folder written by scripts/generate.py")
    p.add_argument("--method", choices=METHODS, default="clad", help="training objective")
    p.add_argument("--output-dir", required=True, help="where checkpoints, logs and the final model go")
    p.add_argument(
        "--backbone",
        default="small-resnet",
        help="'small-resnet' (from scratch, sized for 64 px) or a transformers image-classification model id or folder, e.g. microsoft/resnet-50",
    )
    p.add_argument(
        "--resolution",
        type=int,
        help="training side in pixels (default: the dataset's image size for small-resnet, the model's own otherwise)",
    )
    p.add_argument("--widths", type=int, nargs=4, help="small-resnet stage widths (default 16 32 64 128)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument(
        "--max-train-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="anchors per process per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--lr-decay-epochs",
        type=int,
        nargs="*",
        default=[20],
        help="epochs at which the learning rate is multiplied by --lr-decay",
    )
    p.add_argument("--lr-decay", type=float, default=0.1)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.2,
        help="temperature tau of the contrastive loss, every --loss (the CLAD paper's 0.2)",
    )
    p.add_argument(
        "--lambda-con",
        type=float,
        default=1.0,
        help="weight lambda of the contrastive term (the CLAD paper's 1, with a pretrained backbone; the demo trains from scratch with 5)",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="infonce",
        help="contrastive term of clad/clad+: 'infonce' = CLAD's InfoNCE (one positive per anchor); 'supcon' = SupCon "
        "(L_out) and 'eps-supinfonce' = epsilon-SupInfoNCE (Barbano et al. 2023), both with several positives per "
        "anchor: its counterfactual positive plus the other originals of its class in the batch; negatives as for "
        "infonce (dictionary key y + stored negatives)",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=0.1,
        help="margin epsilon of --loss eps-supinfonce, in units of s = cos/tau (0: plain SupInfoNCE, the paper code's "
        "default; 0.1 is a small margin, a cosine margin of eps * tau = 0.02 at tau 0.2)",
    )
    p.add_argument(
        "--no-class-positives",
        dest="class_positives",
        action="store_false",
        help="supcon / eps-supinfonce: only the counterfactual positive is a positive (by default the other "
        "originals of the class in the batch are too; on a biased dataset they mostly share the background)",
    )
    p.add_argument(
        "--fairkl-weight",
        type=float,
        default=0.0,
        help="weight w of the FairKL regulariser (clad/clad+; 0: off): the contrastive term becomes L_con + w * FairKL, "
        "the symmetric KL between Gaussians fitted to same-background and different-background pair similarities, "
        "for positives and negatives separately",
    )
    p.add_argument(
        "--fairkl-bandwidth",
        type=float,
        default=0.5,
        help="FairKL's bandwidth h on the cosine scale: h^2 is added to every group's variance (keeps it finite "
        "for small groups). 0.5 measured harmless over 3 seeds at weight 0.1; 0.05 broke training (original "
        "accuracy 66, docs/BENCHMARKS.md)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=32,
        help="entries per key of the negative dictionary (= dictionary negatives per anchor)",
    )
    p.add_argument(
        "--max-stored-negatives",
        type=int,
        default=0,
        help="stored kind=negative rows used per anchor and step, drawn per epoch, through a third, gradient-free "
        "forward pass (default 0: the dictionary only, as the CLAD paper; 1 costs about +19%% step time for about "
        "+1 point of mixed_rand on the built-in benchmark, see docs/BENCHMARKS.md)",
    )
    p.add_argument(
        "--crop-scale", type=float, nargs=2, default=[0.7, 1.0], help="random resized crop area range"
    )
    p.add_argument(
        "--paired-crops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give each positive its anchor's crop and flip, so that the pair differs only in background (colour jitter stays independent)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels-last memory format (faster convolutions)",
    )
    p.add_argument(
        "--color-jitter", type=float, default=0.4, help="brightness/contrast/saturation jitter strength"
    )
    p.add_argument(
        "--selection-metric",
        choices=["mixed_rand", "original", "last"],
        default="mixed_rand",
        help="validation metric that picks the saved epoch",
    )
    g = p.add_argument_group("explanation-driven positives (ExCon)")
    g.add_argument(
        "--saliency-positives",
        nargs="?",
        const="missing",
        choices=["missing", "all"],
        help="positives from the model's own Grad-CAM (ExCon): pixels of importance <= --saliency-threshold replaced "
        "by the dataset's mean colour; where the model no longer predicts the label on that view, the anchor itself "
        "(augmented) is the positive. 'missing' (the default when the flag is given bare): only for rows without a "
        "counterfactual positive (no stored positive and no mask to composite one from), so a dataset of originals "
        "only can be trained with augment/clad/clad+; 'all': for every row, ignoring the counterfactual positives",
    )
    g.add_argument(
        "--saliency-refresh-epochs",
        type=int,
        default=1,
        help="recompute the saliency views with the current model (eval mode) at the start of every N-th epoch",
    )
    g.add_argument(
        "--saliency-threshold",
        type=float,
        default=0.5,
        help="pixels whose Grad-CAM importance (normalised per image to [0, 1]) is <= this are replaced",
    )
    g.add_argument(
        "--saliency-negatives",
        action="store_true",
        help="also use the complement view (the salient pixels replaced, the rest kept) as one more stored "
        "negative of its anchor, where the masked view kept the prediction",
    )
    g.add_argument(
        "--saliency-layer",
        help="module name (in the classifier's named_modules) for Grad-CAM (default: the deepest convolutional "
        "stage whose map is at least 4 x 4)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers (images are cached in memory, so 0 is usually fastest)",
    )
    p.add_argument(
        "--cache-gb",
        type=float,
        default=4.0,
        help="decode the training images once into memory when they fit in this many GiB",
    )
    p.add_argument("--val-limit", type=int, help="use at most N validation originals for model selection")
    p.add_argument(
        "--checkpointing-steps", type=int, default=500, help="save_state every N steps (0: only at the end)"
    )
    p.add_argument(
        "--checkpoints-total-limit", type=int, default=2, help="keep at most this many checkpoint folders"
    )
    p.add_argument("--resume-from-checkpoint", help="'latest' or a checkpoint folder to resume from")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], help="default: from the accelerate config"
    )
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")
    trust.add_arguments(p.add_argument_group("loading models"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.batch_size < 2:
        raise SystemExit("train.py: error: --batch-size must be at least 2")
    if args.temperature <= 0:
        raise SystemExit("train.py: error: --temperature must be > 0")
    if args.eps < 0:
        raise SystemExit("train.py: error: --eps must be >= 0")
    if args.fairkl_weight < 0:
        raise SystemExit("train.py: error: --fairkl-weight must be >= 0")
    if args.fairkl_bandwidth <= 0:
        raise SystemExit("train.py: error: --fairkl-bandwidth must be > 0")
    if args.method not in ("clad", "clad+") and (args.loss != "infonce" or args.fairkl_weight > 0):
        raise SystemExit(
            f"train.py: error: --loss {args.loss} / --fairkl-weight apply to --method clad or clad+, not {args.method}"
        )
    if getattr(args, "saliency_positives", None):
        if args.method == "erm":
            raise SystemExit(
                "train.py: error: --saliency-positives needs --method augment, clad or clad+, not erm"
            )
        if args.saliency_refresh_epochs < 1:
            raise SystemExit("train.py: error: --saliency-refresh-epochs must be >= 1")
        if not 0 <= args.saliency_threshold < 1:
            raise SystemExit("train.py: error: --saliency-threshold must be in [0, 1)")
    elif args.saliency_negatives:
        raise SystemExit("train.py: error: --saliency-negatives needs --saliency-positives")
    return args


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


class Objective(torch.nn.Module):
    """One training step's loss for a method. ``model(x) -> (logits, features)``.

    ``forward(model, batch)`` returns ``(loss, parts)`` where ``parts`` holds the detached terms and,
    for CLAD, the positives' features and keys to push into the dictionary after the step.
    """

    def __init__(self, method: str, augment, num_classes: int, feature_dim: int, args: argparse.Namespace):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.augment = augment
        self.temperature = args.temperature
        self.lambda_con = args.lambda_con
        self.loss = getattr(args, "loss", "infonce")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        self.eps = getattr(args, "eps", 0.1)
        self.fairkl_weight = getattr(args, "fairkl_weight", 0.0)
        self.fairkl_bandwidth = getattr(args, "fairkl_bandwidth", 0.5)
        self.class_positives = getattr(args, "class_positives", True)
        self.contrastive = method in ("clad", "clad+")
        self.paired = getattr(args, "paired_crops", False) and self.contrastive
        self.memory_format = (
            torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
        )
        self.dictionary = (
            NegativeDictionary(num_classes, args.queue_size, feature_dim) if self.contrastive else None
        )

    def forward(
        self, model, batch: dict[str, torch.Tensor], gather=None, plain_model=None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``plain_model``: the same network without its DDP wrapper, for the gradient-free pass over the
        stored negatives (how many a batch has differs between processes, and a DDP forward may
        synchronise buffers, so that pass must not go through DDP)."""
        y = batch["label"]
        b = y.shape[0]
        crops = self.augment.geometry(b, y.device) if self.paired else None
        x = self.augment(batch["anchor"], crops)
        if self.method == "erm":
            logits, _ = model(x.contiguous(memory_format=self.memory_format))
            ce = F.cross_entropy(logits, y)
            return ce, {"ce": ce.detach()}
        has_pos = batch["has_positive"]
        neg_feats = None
        if self.contrastive and "negatives" in batch and batch["negative_valid"].any():
            valid = batch["negative_valid"]
            with torch.no_grad():
                # constants in the loss, like the dictionary's entries: cropped like their anchor, no jitter
                neg_crops = (
                    crops[:, None].expand(-1, valid.shape[1], -1)[valid] if crops is not None else None
                )
                xn = self.augment(batch["negatives"][valid], neg_crops, jitter=False).contiguous(
                    memory_format=self.memory_format
                )
                net = plain_model or model
                if xn.shape[0] == 1 and net.training:
                    # batch statistics of one image are undefined where a stage's map is 1x1 (BatchNorm
                    # raises): a lone stored negative is embedded with the running statistics instead
                    net.eval()
                    try:
                        _, f = net(xn)
                    finally:
                        net.train()
                else:
                    _, f = net(xn)
            neg_feats = torch.zeros(*valid.shape, f.shape[-1], device=f.device, dtype=f.dtype)
            neg_feats[valid] = f
        xp = self.augment(batch["positive"], crops)
        logits, feats = model(torch.cat([x, xp]).contiguous(memory_format=self.memory_format))
        la, lp = logits[:b], logits[b:]
        ce = F.cross_entropy(la, y)
        w = has_pos.float()
        ce_pos = (F.cross_entropy(lp, y, reduction="none") * w).sum() / w.sum().clamp_min(1.0)
        parts: dict[str, Any] = {"ce": ce.detach()}
        if self.method == "augment":
            n = b + w.sum()
            loss = (ce * b + ce_pos * w.sum()) / n
            parts["ce_pos"] = ce_pos.detach()
            return loss, parts
        z, zp = feats[:b], feats[b:]
        d = self.dictionary
        if int(d.count.min()) == 0:
            zs, ys = (gather(z.detach()), gather(y)) if gather else (z.detach(), y)
            d.fill_empty_from(zs, ys)
        cands = None
        if self.loss == "infonce":
            dict_feats, dict_valid = d.lookup(y)
            if neg_feats is not None:
                z_neg = torch.cat([dict_feats.to(z.dtype), neg_feats], dim=1)
                mask = torch.cat([dict_valid, batch["negative_valid"]], dim=1)
            else:
                z_neg, mask = dict_feats.to(z.dtype), dict_valid
            con = clad_infonce(z, zp, z_neg, self.temperature, neg_mask=mask, weight=w)
        else:
            cands = self.candidate_set(z, zp, batch, neg_feats)
            if self.loss == "supcon":
                con = supcon(z, cands["feats"], cands["pos"], self.temperature, neg_mask=cands["neg"])
            else:
                con = eps_supinfonce(
                    z,
                    cands["feats"],
                    cands["feats"],
                    self.temperature,
                    self.eps,
                    neg_mask=cands["neg"],
                    pos_mask=cands["pos"],
                )
        total_con = con
        if self.fairkl_weight > 0:
            if cands is None:
                cands = self.candidate_set(z, zp, batch, neg_feats)
            fk = fairkl(
                z,
                cands["feats"],
                cands["same_bg"],
                cands["pos"],
                cands["fair_neg"],
                bandwidth=self.fairkl_bandwidth,
            )
            total_con = con + self.fairkl_weight * fk
            parts["fairkl"] = fk.detach()
        loss = ce + self.lambda_con * total_con
        if self.method == "clad+":
            loss = loss + ce_pos
            parts["ce_pos"] = ce_pos.detach()
        parts["con"] = con.detach()
        parts["push"] = (zp.detach()[has_pos], batch["positive_bg"][has_pos])
        return loss, parts

    def candidate_set(
        self,
        z: torch.Tensor,
        zp: torch.Tensor,
        batch: dict[str, torch.Tensor],
        neg_feats: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The candidates shared by the whole batch for supcon / eps-supinfonce / FairKL, and their masks.

        Candidates (M, D), in four blocks: this step's positives zp (B), the anchors z (B), every entry
        of the negative dictionary (num_keys * queue_size, constants) and the stored negatives' features
        (B * max_stored_negatives, constants). Masks (B, M), for anchor i of class y_i:

        * ``pos``: i's own positive (when it has one) and, unless ``--no-class-positives``, the other
          anchors of class y_i (never i itself);
        * ``neg``: CLAD's negatives of i: valid dictionary entries of key y_i and i's own stored negatives;
        * ``fair_neg`` (FairKL only): ``neg`` plus the other classes' anchors and positives in the batch,
          so that both background groups occur among the negatives;
        * ``same_bg``: the candidate's background equals i's. Backgrounds: a positive's ``positive_bg``;
          a dictionary entry's key; an anchor's ``anchor_bg`` when the batch carries it, else its label
          (the key its negatives are looked up under); a stored negative's is its anchor's.
        """
        y = batch["label"]
        b, dev = y.shape[0], z.device
        has_pos = batch["has_positive"].bool()
        anchor_bg = batch.get("anchor_bg", y).long()
        d = self.dictionary
        k, q = d.num_keys, d.size
        dict_feats = d.queue.reshape(k * q, -1).to(device=dev, dtype=z.dtype)
        dict_key = torch.arange(k, device=dev).repeat_interleave(q)
        dict_valid = (torch.arange(q, device=dev)[None, :] < d.count.to(dev)[:, None]).reshape(-1)
        idx = torch.arange(b, device=dev)
        eye = idx[:, None] == idx[None, :]
        same_class = y[:, None] == y[None, :]
        feats = [zp, z, dict_feats]
        bgs = [batch["positive_bg"].long(), anchor_bg, dict_key]
        no = torch.zeros(b, b, dtype=torch.bool, device=dev)
        others = same_class & ~eye if self.class_positives else no
        pos = [eye & has_pos[:, None], others, torch.zeros(b, k * q, dtype=torch.bool, device=dev)]
        neg = [no, no, (dict_key[None, :] == y[:, None]) & dict_valid[None, :]]
        if neg_feats is not None:
            s = neg_feats.shape[1]
            owner = idx.repeat_interleave(s)
            feats.append(neg_feats.reshape(b * s, -1).to(z.dtype))
            bgs.append(anchor_bg[owner])
            pos.append(torch.zeros(b, b * s, dtype=torch.bool, device=dev))
            neg.append((owner[None, :] == idx[:, None]) & batch["negative_valid"].reshape(-1).bool()[None, :])
        pos_m, neg_m = torch.cat(pos, 1), torch.cat(neg, 1)
        other_class = ~same_class
        in_batch = torch.cat([other_class & has_pos[None, :], other_class], 1)
        fair_neg = neg_m.clone()
        fair_neg[:, : 2 * b] |= in_batch
        return {
            "feats": torch.cat(feats, 0),
            "pos": pos_m,
            "neg": neg_m,
            "fair_neg": fair_neg,
            "same_bg": torch.cat(bgs, 0)[None, :] == anchor_bg[:, None],
        }

    @torch.no_grad()
    def after_step(self, parts: dict[str, Any], gather=None) -> None:
        """Push this step's positives into the dictionary (gathered over processes first)."""
        if self.dictionary is None or "push" not in parts:
            return
        feats, keys = parts["push"]
        if gather is not None:
            feats, keys = gather(feats), gather(keys)
        self.dictionary.push(feats, keys)


# ----------------------------------------------------------------------------------------------
# Checkpointed progress
# ----------------------------------------------------------------------------------------------


class TrainProgress:
    """Counters and model-selection state, saved with every checkpoint."""

    def __init__(self):
        self.global_step = 0
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.history: list[dict[str, Any]] = []
        # the running sums of the epoch in progress, so that a run resumed mid-epoch logs the same means
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
            "epoch_sums": json.dumps(self.epoch_sums),
            "epoch_count": self.epoch_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])
        self.history = json.loads(state["history"])
        self.epoch_sums = json.loads(state.get("epoch_sums", "{}"))
        self.epoch_count = int(state.get("epoch_count", 0))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def get_dataloaders(args: argparse.Namespace, dataset, resolution: int):
    """The training DataLoader and its dataset, and the validation variants (or None)."""
    from .data import CounterfactualTrainSet
    from .evaluate import EvalSet, build_variants

    if "train" not in dataset:
        raise ValueError(f"{args.dataset} has no train split (it has {list(dataset)})")
    saliency = getattr(args, "saliency_positives", None)
    train_set = CounterfactualTrainSet(
        dataset["train"],
        resolution,
        seed=args.seed,
        max_negatives=args.max_stored_negatives,
        need_positives=args.method != "erm" and saliency != "all",
        need_negatives=args.method in ("clad", "clad+"),
        cache_gb=args.cache_gb,
    )
    if args.method != "erm" and not saliency:
        with_pos = sum(1 for k in range(len(train_set)) if train_set.index.positives[k])
        if with_pos + train_set.on_the_fly == 0:
            raise ValueError(
                f"--method {args.method} needs positives, but {args.dataset} has no kind=positive rows and no masks to "
                "composite them from; generate the dataset with masks, add --saliency-positives or use --method erm"
            )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= args.batch_size,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val = None
    if "validation" in dataset:
        from .evaluate import load_eval_set

        data: EvalSet = load_eval_set(args.dataset, "validation", args.val_limit)
        val = build_variants(data, seed=args.seed, variants=("original", "mixed_same", "mixed_rand"))
    return loader, train_set, val


@torch.no_grad()
def validate(accelerator, model, augment, val, resolution: int, batch_size: int = 256) -> dict[str, float]:
    """Accuracy (percent) on each validation variant, sharded over processes."""
    from .data import resize_uint8

    names = list(val)
    imgs = torch.cat([torch.as_tensor(val[n].images).permute(0, 3, 1, 2) for n in names])
    labels = torch.cat([torch.as_tensor(val[n].labels) for n in names])
    vid = torch.cat([torch.full((len(val[n].labels),), i) for i, n in enumerate(names)])
    loader = accelerator.prepare_data_loader(
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, labels, vid), batch_size=batch_size),
        device_placement=True,
    )
    model.eval()
    correct = torch.zeros(len(names))
    total = torch.zeros(len(names))
    for x, y, v in loader:
        logits, _ = model(augment.normalize(resize_uint8(x, resolution)))
        pred, y, v = accelerator.gather_for_metrics((logits.argmax(-1), y, v))
        ok = (pred == y).float().cpu()
        correct.index_add_(0, v.cpu(), ok)
        total.index_add_(0, v.cpu(), torch.ones_like(ok))
    model.train()
    return {n: float(100 * correct[i] / total[i].clamp_min(1)) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str) -> list[Path]:
    found = [
        p
        for p in Path(output_dir).glob("checkpoint-*")
        if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(output_dir: str, value: str | None) -> Path | None:
    if not value:
        return None
    if value == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint {value}: no such checkpoint folder")
    return path


def save_checkpoint(accelerator, args, progress: TrainProgress, best_state: dict | None) -> None:
    path = Path(args.output_dir) / f"checkpoint-{progress.global_step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        if best_state is not None:
            from safetensors.torch import save_file

            save_file(best_state, str(path / "best_model.safetensors"))
        old = _checkpoints(args.output_dir)
        for stale in old[: max(0, len(old) - args.checkpoints_total_limit)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    _fault_point(progress.global_step)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _fault_point(step: int) -> None:
    """Fault injection for the resume tests: ``DEBIAS_FAULT_KILL_AT_STEP=k`` kills this process with
    SIGKILL right after checkpoint k is written (no clean-up runs, as in a real crash)."""
    if os.environ.get("DEBIAS_FAULT_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _lr_factor(step: int, steps_per_epoch: int, decay_epochs: list[int], gamma: float) -> float:
    epoch = step // max(steps_per_epoch, 1)
    return gamma ** sum(1 for e in decay_epochs if epoch >= e)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns a summary (steps, best epoch, validation metrics, time)."""
    trust.configure(args.trust_remote_code, args.allow_bin_weights)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    from augment.dataset import load_counterfactual_dataset

    from .data import BatchAugment
    from .models import SMALL_RESNET, ClassifierWithFeatures, build_model, save_preprocessing

    has_accelerator = torch.cuda.is_available() or (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )
    accelerator = Accelerator(
        cpu=args.cpu or not has_accelerator,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_args.json").write_text(json.dumps(vars(args), indent=2))
    dataset = load_counterfactual_dataset(args.dataset)
    class_names = list(dataset["train"].features["label"].names)
    resolution = args.resolution
    if resolution is None and args.backbone == SMALL_RESNET:
        resolution = dataset["train"][0]["image"].size[0]
    model, pre = build_model(
        args.backbone, class_names, resolution, tuple(args.widths) if args.widths else None
    )
    resolution = pre.resolution
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = ClassifierWithFeatures(model)
    loader, train_set, val = get_dataloaders(args, dataset, resolution)
    train_set.warm()
    augment = BatchAugment(pre.mean, pre.std, scale=tuple(args.crop_scale), jitter=args.color_jitter)
    objective = Objective(args.method, augment, len(class_names), wrapped.feature_dim, args)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    wrapped, optimizer, loader = accelerator.prepare(wrapped, optimizer, loader)
    objective.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps_per_epoch, args.lr_decay_epochs, args.lr_decay)
    )
    progress = TrainProgress()
    accelerator.register_for_checkpointing(scheduler, progress)
    if objective.dictionary is not None:
        accelerator.register_for_checkpointing(objective.dictionary)
    excon = None
    if getattr(args, "saliency_positives", None):
        from .excon import SaliencyPositives

        excon = SaliencyPositives(
            train_set,
            args.saliency_positives,
            args.saliency_threshold,
            args.saliency_refresh_epochs,
            args.saliency_negatives,
            args.saliency_layer,
        )
        accelerator.register_for_checkpointing(excon)
    best_state: dict[str, torch.Tensor] | None = None
    resume = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume is None:
        accelerator.print(f"no checkpoint found in {args.output_dir}; starting from scratch")
    if resume is not None:
        accelerator.print(f"resuming from {resume}")
        accelerator.load_state(str(resume))
        best_file = resume / "best_model.safetensors"
        if best_file.is_file():
            from safetensors.torch import load_file

            best_state = load_file(str(best_file))
    start_epoch, skip = divmod(progress.global_step * args.gradient_accumulation_steps, len(loader))
    gather = accelerator.gather if accelerator.num_processes > 1 else None
    plain = accelerator.unwrap_model(wrapped)
    log_path = out / "log.jsonl"
    bar = tqdm(
        total=max_steps,
        initial=progress.global_step,
        desc=f"train {args.method}",
        disable=not (args.progress and accelerator.is_local_main_process),
    )
    wrapped.train()
    done = progress.global_step >= max_steps
    # decided from the step counter, never from the file system: processes must agree on every collective
    last_saved = progress.global_step if resume is not None else -1
    for epoch in range(start_epoch, epochs):
        if done:
            break
        train_set.set_epoch(epoch)
        loader.set_epoch(epoch)
        active = accelerator.skip_first_batches(loader, skip) if epoch == start_epoch and skip else loader
        if excon is not None and excon.due(epoch):
            record = excon.refresh(plain, augment.normalize, epoch, accelerator)
            accelerator.print(f"saliency positives refreshed: {json.dumps(record)}")
        if not (epoch == start_epoch and skip):
            progress.epoch_sums, progress.epoch_count = {}, 0
        sums = progress.epoch_sums
        t_epoch = time.perf_counter()
        for batch in active:
            if excon is not None:
                batch = excon.apply(batch)
                parts_extra = {"saliency_share": batch.pop("saliency_view").float().mean()}
            with accelerator.accumulate(wrapped):
                loss, parts = objective(wrapped, batch, gather, plain)
                accelerator.backward(loss)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            objective.after_step(parts, gather)
            if excon is not None:
                parts.update(parts_extra)
            for k, v in parts.items():
                if k != "push":
                    sums[k] = sums.get(k, 0.0) + float(v)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            progress.epoch_count += 1
            if accelerator.sync_gradients:
                progress.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", epoch=epoch)
                epoch_end = progress.global_step % steps_per_epoch == 0
                if progress.global_step >= max_steps:
                    done = True
                due = args.checkpointing_steps and progress.global_step % args.checkpointing_steps == 0
                if due and not (epoch_end or done):
                    save_checkpoint(accelerator, args, progress, best_state)
                    last_saved = progress.global_step
                if done:
                    break
        entry: dict[str, Any] = {
            "epoch": epoch,
            "step": progress.global_step,
            "lr": scheduler.get_last_lr()[0],
            **{k: v / max(progress.epoch_count, 1) for k, v in sums.items()},
            "seconds": round(time.perf_counter() - t_epoch, 3),
        }
        if val is not None:
            entry["validation"] = validate(accelerator, wrapped, augment, val, resolution)
        metric = _selection_value(args.selection_metric, entry.get("validation"), epoch)
        entry["selection"] = metric
        if metric is not None and metric >= progress.best_metric:
            progress.best_metric, progress.best_epoch = metric, epoch
            state = accelerator.unwrap_model(wrapped).model.state_dict()
            best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        entry["partial_epoch"] = done and progress.global_step % steps_per_epoch != 0
        progress.history.append(entry)
        if accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        skip = 0
        # a checkpoint due at the epoch's last step is written after the epoch's validation and model
        # selection, so that a run resumed from it has the same history and best model as one that was not
        if (
            args.checkpointing_steps
            and progress.global_step % args.checkpointing_steps == 0
            and last_saved != progress.global_step
        ):
            save_checkpoint(accelerator, args, progress, best_state)
            last_saved = progress.global_step
    bar.close()
    if last_saved != progress.global_step:  # the final state, so that a rerun can resume (or stop at once)
        save_checkpoint(accelerator, args, progress, best_state)
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(wrapped).model
    if best_state is not None:
        final.load_state_dict(best_state)
    best_val = next(
        (h.get("validation") for h in progress.history if h["epoch"] == progress.best_epoch), None
    )
    summary = {
        "method": args.method,
        "loss": getattr(args, "loss", "infonce") if args.method in ("clad", "clad+") else None,
        "steps": progress.global_step,
        "steps_per_epoch": steps_per_epoch,
        "epochs_run": len({h["epoch"] for h in progress.history}),
        "best_epoch": progress.best_epoch,
        "best_validation": best_val,
        "resolution": resolution,
        "num_processes": accelerator.num_processes,
        **({"excon": excon.summary([h["epoch"] for h in progress.history])} if excon is not None else {}),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if accelerator.is_main_process:
        final.save_pretrained(str(out), safe_serialization=True)
        save_preprocessing(str(out), pre)
        from .modelcard import write_model_card

        write_model_card(out, args=args, class_names=class_names, summary=summary)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _selection_value(metric: str, validation: dict[str, float] | None, epoch: int) -> float | None:
    if metric == "last" or not validation:
        return float(epoch)
    if metric in validation:
        return validation[metric]
    return validation.get("original")


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = main(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"train.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
