"""Reports: ``report.json`` (machine-readable), ``report.md`` (tables) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .evaluate import TEXTURE_SPLITS, VARIANTS

LOWER_IS_BETTER = ("no_fg", "only_bg_b", "only_bg_t")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.1f}" if isinstance(x, (int, float)) else str(x)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_variant_accuracy(report: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    """Bar chart of accuracy per Background Challenge variant."""
    plt = _plt()
    acc = report["accuracy"]
    names = [v for v in VARIANTS + TEXTURE_SPLITS if v in acc]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = ["#9e9e9e" if n in LOWER_IS_BETTER else "#3b75af" for n in names]
    bars = ax.bar(names, [acc[n] for n in names], color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)")
    if report.get("shape_bias") is not None:
        title = f"{title or 'Accuracy per test split'} (shape bias {report['shape_bias']:.1f}%)"
    ax.set_title(title or "Accuracy per variant (grey: background-only, lower = less reliance)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def texture_markdown(report: dict[str, Any], title: str) -> str:
    """The report of a model on the texture benchmark: accuracy per texture split and the shape bias."""
    acc = report["accuracy"]
    names = ["original", *(n for n in TEXTURE_SPLITS if n in acc)]
    lines = [f"# {title}", ""]
    if report.get("model"):
        lines += [
            f"Model `{report['model']}` on split `{report.get('split', 'test')}` of `{report.get('dataset', '')}`.",
            "",
        ]
    lines += ["| " + " | ".join(names) + " | shape bias | worst group |", "|" + " --- |" * (len(names) + 2)]
    lines.append(
        "| "
        + " | ".join(_fmt(acc.get(n)) for n in names)
        + f" | {_fmt(report.get('shape_bias'))} | {_fmt(report.get('worst_group_accuracy'))} |"
    )
    d = report.get("details", {})
    sb = d.get("shape_bias", {})
    lines += [
        "",
        "Accuracy in percent against the shape's class (texture_only: the class whose texture fills the square).",
        "Shape bias: shape decisions / (shape + texture decisions) on the cue_conflict images "
        f"({sb.get('shape_decisions', 'n/a')} shape, {sb.get('texture_decisions', 'n/a')} texture decisions of "
        f"{sb.get('cue_conflict_images', 'n/a')} images); 100 = purely by shape. Worst group: lowest accuracy over "
        f"(shape, texture) groups of at least {d.get('min_group_size', 'n/a')} images among the originals and "
        "cue_conflict images.",
    ]
    if "num_images" in d:
        lines += ["", "Images per split: " + ", ".join(f"{k} {v}" for k, v in d["num_images"].items())]
    return "\n".join(lines) + "\n"


def evaluation_markdown(report: dict[str, Any], title: str) -> str:
    if report.get("details", {}).get("bias") == "texture":
        return texture_markdown(report, title)
    acc = report["accuracy"]
    names = [v for v in VARIANTS if v in acc]
    lines = [f"# {title}", ""]
    if report.get("model"):
        lines += [
            f"Model `{report['model']}` on split `{report.get('split', 'test')}` of `{report.get('dataset', '')}`.",
            "",
        ]
    lines += [
        "| " + " | ".join(names) + " | bg_gap | challenge | worst group |",
        "|" + " --- |" * (len(names) + 3),
    ]
    lines.append(
        "| "
        + " | ".join(_fmt(acc[n]) for n in names)
        + f" | {_fmt(report.get('bg_gap'))} | {_fmt(report.get('challenge_accuracy'))} | {_fmt(report.get('worst_group_accuracy'))} |"
    )
    d = report.get("details", {})
    lines += [
        "",
        "Accuracy in percent against the object's label. `bg_gap` = mixed_same - mixed_rand (lower is better);",
        f"challenge accuracy uses a pool of {d.get('challenge_pool', 'n/a')} only_bg_t backgrounds; worst group is the",
        f"lowest accuracy over (label, bg_label) groups of at least {d.get('min_group_size', 'n/a')} images among the",
        "originals and their mixed variants. For only_bg_b, only_bg_t and no_fg lower means less background reliance.",
    ]
    if "num_images" in d:
        lines += ["", "Images per variant: " + ", ".join(f"{k} {v}" for k, v in d["num_images"].items())]
    if d.get("note"):
        lines += ["", f"Note: {d['note']}"]
    return "\n".join(lines) + "\n"


def write_evaluation_report(
    report: dict[str, Any], output_dir: str | os.PathLike, title: str = "Background reliance"
) -> None:
    """Write report.json, report.md and report.png for one model."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(evaluation_markdown(report, title))
    plot_variant_accuracy(report, out / "report.png", title)


# ----------------------------------------------------------------------------------------------
# Comparison of several methods (the demo)
# ----------------------------------------------------------------------------------------------


def comparison_markdown(
    reports: dict[str, dict[str, Any]], title: str = "Methods compared", notes: list[str] | None = None
) -> str:
    """A table with one row per method."""
    if any(r.get("details", {}).get("bias") == "texture" for r in reports.values()):
        return texture_comparison_markdown(reports, title, notes)
    return _method_table(
        reports,
        title,
        ["original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "only_bg_t"],
        [("bg_gap", "bg_gap"), ("challenge", "challenge_accuracy"), ("worst group", "worst_group_accuracy")],
        "Top-1 accuracy in percent on the test split's Background Challenge variants. bg_gap = mixed_same - mixed_rand\n"
        "(lower is better); only_bg_t: background alone (lower = less background reliance).",
        notes,
    )


def texture_comparison_markdown(
    reports: dict[str, dict[str, Any]], title: str = "Methods compared", notes: list[str] | None = None
) -> str:
    """A table with one row per method on the texture benchmark: texture splits and shape bias."""
    return _method_table(
        reports,
        title,
        ["original", *TEXTURE_SPLITS],
        [("shape bias", "shape_bias"), ("worst group", "worst_group_accuracy")],
        "Top-1 accuracy in percent on the texture benchmark's test splits: original (texture = class with "
        "probability rho), cue_conflict (one class's shape, another's texture; label = the shape), silhouette "
        "(the shape filled flat), texture_only (a square of a class's texture; label = that class). Shape bias: "
        "share of shape decisions among cue_conflict predictions that are either the shape's or the texture's "
        "class (higher = less texture reliance).",
        notes,
    )


def _method_table(
    reports: dict[str, dict[str, Any]],
    title: str,
    cols: list[str],
    extra: list[tuple[str, str]],
    caption: str,
    notes: list[str] | None,
) -> str:
    """``# title``, a row per method: the accuracy of each of ``cols``, then each ``(header, key)`` of
    ``extra`` read from the report itself; the caption and the notes below."""
    lines = [f"# {title}", ""]
    lines.append("| method | " + " | ".join([*cols, *(h for h, _ in extra)]) + " |")
    lines.append("|" + " --- |" * (len(cols) + len(extra) + 1))
    for method, r in reports.items():
        acc = r["accuracy"]
        cells = [_fmt(acc.get(c)) for c in cols] + [_fmt(r.get(k)) for _, k in extra]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", caption]
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _grouped_bars(ax, methods: list[str], series: list[tuple[str, list[float], str]]) -> None:
    """Bars of each series side by side per method, labelled with their values."""
    w = 0.8 / len(series)
    for k, (name, values, colour) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * w
        bars = ax.bar([i + offset for i in range(len(methods))], values, w, label=name, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(range(len(methods))), methods)
    ax.set_ylim(0, 108)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(loc="lower right", fontsize=8)


def plot_methods(reports: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """mixed_same vs mixed_rand accuracy per method (grouped bars, the gap annotated), as CLAD plots it;
    on the texture benchmark, accuracy per texture split with the shape bias."""
    plt = _plt()
    if any(r.get("details", {}).get("bias") == "texture" for r in reports.values()):
        methods = list(reports)
        colours = ("#bdbdbd", "#ef8636", "#3b75af", "#9e9e9e")
        series = [
            (name, [reports[m]["accuracy"].get(name, float("nan")) for m in methods], colour)
            for name, colour in zip(("original", *TEXTURE_SPLITS), colours)
        ]
        fig, ax = plt.subplots(figsize=(1.8 + 2.0 * len(methods), 4))
        _grouped_bars(ax, methods, series)
        for i, m in enumerate(methods):
            sb = reports[m].get("shape_bias")
            if sb is not None:
                ax.text(i, 101, f"shape bias {sb:.1f}", ha="center", fontsize=8, fontweight="bold")
        ax.set_title(
            title or "Texture benchmark: cue conflict and shape bias (higher = less texture reliance)"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    methods = list(reports)
    same = [reports[m]["accuracy"].get("mixed_same", float("nan")) for m in methods]
    rand = [reports[m]["accuracy"].get("mixed_rand", float("nan")) for m in methods]
    orig = [reports[m]["accuracy"].get("original", float("nan")) for m in methods]
    x = range(len(methods))
    w = 0.27
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(methods), 4))
    b0 = ax.bar([i - w for i in x], orig, w, label="original", color="#bdbdbd")
    b1 = ax.bar(list(x), same, w, label="mixed_same", color="#3b75af")
    b2 = ax.bar([i + w for i in x], rand, w, label="mixed_rand", color="#ef8636")
    for bars in (b0, b1, b2):
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    for i, m in enumerate(methods):
        gap = reports[m].get("bg_gap")
        if gap is not None:
            ax.text(i, 3, f"gap {gap:.1f}", ha="center", fontsize=8, color="white", fontweight="bold")
    ax.set_xticks(list(x), methods)
    ax.set_ylim(0, 108)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Same vs random backgrounds (smaller gap = less background reliance)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Saliency: where the models look (the demo)
# ----------------------------------------------------------------------------------------------

MAP_NAMES = {"grad_cam": "Grad-CAM", "input_gradients": "input grad."}
# saliency.png's layout in pixels (at SALIENCY_DPI): one square cell per panel, margins for the row
# labels (left), the title and column titles (top) and the legend (bottom)
SALIENCY_DPI = 100
SALIENCY_CELL_PX = 140
SALIENCY_MARGINS_PX = {"left": 34, "top": 72, "bottom": 28}


def saliency_figure_size(rows: int, columns: int) -> tuple[int, int]:
    """Width and height in pixels of :func:`saliency_figure`'s PNG with ``rows`` images and ``columns``
    panels per row (the image itself plus one per method and map)."""
    m = SALIENCY_MARGINS_PX
    return m["left"] + columns * SALIENCY_CELL_PX, m["top"] + rows * SALIENCY_CELL_PX + m["bottom"]


def saliency_examples(labels, masks, max_images: int = 6) -> list[int]:
    """Rows for :func:`saliency_figure`: the first image of each class (in class order) whose mask is not
    empty, for up to ``max_images`` classes. ``labels``: (N,); ``masks``: (N, H, W)."""
    import numpy as np

    labels = np.asarray(labels)
    has_object = np.asarray(masks).reshape(len(labels), -1).any(axis=1)
    rows: list[int] = []
    for c in np.unique(labels).tolist():
        idx = np.flatnonzero((labels == c) & has_object)
        if idx.size:
            rows.append(int(idx[0]))
        if len(rows) == max_images:
            break
    return rows


def saliency_figure(
    images,
    masks,
    maps_by_method: dict[str, dict[str, Any]],
    labels,
    class_names: list[str] | None,
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Write a PNG of saliency maps: one row per image, the image with its mask outlined, then for each
    method (``maps_by_method`` order) each of its maps (its dict's order, e.g. ``{"grad_cam": maps,
    "input_gradients": maps}``) over the greyed image, the mask outlined and the share of the map's mass
    on the object written in the corner. The size in pixels is :func:`saliency_figure_size`.

    Args:
        images: (N, H, W, 3) uint8 (or floats in [0, 1]), one row each.
        masks: (N, H, W) object masks, boolean or non-zero = object.
        maps_by_method: method -> map name -> maps (N, H, W) in [0, 1]. Input-gradient maps
            (``"input_gradients"``) are shown divided by their 99th percentile (clipped at 1), since
            their mass is spread over many faint pixels; the number in the corner uses the maps as given.
        labels: (N,) class index of each image; ``class_names`` names them in the row labels.
    """
    import numpy as np

    from .saliency import saliency_mass_on_object

    plt = _plt()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    n, h, w = images.shape[:3]
    masks = np.asarray(masks)
    masks = masks if masks.dtype == bool else masks > 0
    if masks.shape != (n, h, w):
        raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    panels: list[tuple[str, str, np.ndarray]] = []
    for method, maps in maps_by_method.items():
        for kind, m in maps.items():
            m = np.asarray(m, dtype=np.float64)
            if m.shape != (n, h, w):
                raise ValueError(f"maps_by_method[{method!r}][{kind!r}] is {m.shape}, not {(n, h, w)}")
            panels.append((method, kind, m))
    grey = images.astype(np.float64)
    grey = grey / 255.0 if images.dtype == np.uint8 else grey
    grey = grey @ np.array([0.299, 0.587, 0.114])

    width, height = saliency_figure_size(n, 1 + len(panels))
    fig = plt.figure(figsize=(width / SALIENCY_DPI, height / SALIENCY_DPI), dpi=SALIENCY_DPI)
    mg, cell, pad = SALIENCY_MARGINS_PX, SALIENCY_CELL_PX, 5

    def axes(row: int, col: int):
        x0 = mg["left"] + col * cell + pad
        y0 = height - mg["top"] - (row + 1) * cell + pad
        ax = fig.add_axes((x0 / width, y0 / height, (cell - 2 * pad) / width, (cell - 2 * pad) / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    def outline(ax, mask, colour):
        if mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=0.9)

    for r in range(n):
        ax = axes(r, 0)
        ax.imshow(images[r], interpolation="nearest")
        outline(ax, masks[r], "white")
        y = int(labels[r])
        ax.set_ylabel(class_names[y] if class_names and 0 <= y < len(class_names) else str(y), fontsize=9)
        if r == 0:
            ax.set_title("image\n(object outlined)", fontsize=8.5)
        for c, (method, kind, maps) in enumerate(panels, start=1):
            ax = axes(r, c)
            shown = maps[r]
            if kind == "input_gradients":
                top = np.percentile(shown, 99)
                shown = np.clip(shown / top, 0, 1) if top > 0 else shown
            ax.imshow(grey[r], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(shown, cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear")
            outline(ax, masks[r], "white")
            share = saliency_mass_on_object(maps[r : r + 1], masks[r : r + 1])[0]
            if not np.isnan(share):
                ax.text(
                    0.03,
                    0.04,
                    f"{100 * share:.0f}%",
                    transform=ax.transAxes,
                    fontsize=8,
                    color="white",
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="black", alpha=0.6, linewidth=0),
                )
            if r == 0:
                ax.set_title(f"{method}\n{MAP_NAMES.get(kind, kind)}", fontsize=8.5, fontweight="bold")
    fig.suptitle(
        title or "Where each model looks (target: the true class)",
        y=1 - 8 / height,
        fontsize=11,
    )
    fig.text(
        0.5,
        6 / height,
        "Overlay: saliency (blue low, red high) on the greyed image; white line: the object's mask; "
        "number: share of the map's mass on the object.",
        ha="center",
        va="bottom",
        fontsize=8,
    )
    fig.savefig(path, dpi=SALIENCY_DPI)
    plt.close(fig)


def saliency_markdown(reports: dict[str, dict[str, Any]], figure: str | None = "saliency.png") -> str:
    """A section with one row per method whose report has ``saliency`` (from the demo): IoU, Dice and
    mass on the object of its Grad-CAM and input-gradient maps; and a link to ``figure``."""
    rows = {m: r["saliency"] for m, r in reports.items() if r.get("saliency")}
    if not rows:
        return ""
    kinds = [k for k in MAP_NAMES if any(k in s for s in rows.values())]
    header = "| method | " + " | ".join(
        f"{MAP_NAMES[k]} {col}" for k in kinds for col in ("IoU", "Dice", "mass on object")
    )
    lines = ["## Where the models look", "", header + " |", "|" + " --- |" * (1 + 3 * len(kinds))]
    for method, s in rows.items():
        cells = []
        for k in kinds:
            summ = s.get(k) or {}
            cells += [_fmt(summ.get("iou")), _fmt(summ.get("dice")), _fmt(summ.get("mass_on_object"))]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    first = next(iter(rows.values()))
    ref = next((first[k] for k in kinds if k in first), {})
    lines += [
        "",
        "Saliency maps of the true class on the test originals with a non-empty mask "
        f"({ref.get('num_with_mask', 'n/a')} images), in percent. IoU and Dice binarise each map by keeping "
        "as many of its most salient pixels as the mask has; mass on object is the share of the map's total "
        f"mass inside the mask (a map spread evenly scores the objects' mean area, {_fmt(ref.get('object_area'))}).",
        f"Grad-CAM layer: `{first.get('layer', 'n/a')}` (map {first.get('layer_map_size', 'n/a')}). "
        "Higher = the model looks at the object rather than the background.",
    ]
    zero = [
        f"{m} {MAP_NAMES[k]} {s[k]['num_with_mask'] - s[k]['num_with_mass']}"
        for m, s in rows.items()
        for k in kinds
        if k in s and s[k]["num_with_mass"] < s[k]["num_with_mask"]
    ]
    if zero:
        lines += [
            "",
            "Maps that are zero everywhere (no positive evidence for the true class) have no mass and are left "
            "out of the mass column: " + ", ".join(zero) + ".",
        ]
    if figure:
        lines += ["", f"![Grad-CAM and input gradients per method]({figure})"]
    return "\n".join(lines) + "\n"
