"""Reports: ``report.json`` (machine-readable), ``report.md`` (tables) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .evaluate import VARIANTS

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
    names = [v for v in VARIANTS if v in acc]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = ["#9e9e9e" if n in LOWER_IS_BETTER else "#3b75af" for n in names]
    bars = ax.bar(names, [acc[n] for n in names], color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Accuracy per variant (grey: background-only, lower = less reliance)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluation_markdown(report: dict[str, Any], title: str) -> str:
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
    cols = ["original", "only_fg", "mixed_same", "mixed_rand", "mixed_next", "only_bg_t"]
    lines = [f"# {title}", ""]
    lines.append("| method | " + " | ".join(cols) + " | bg_gap | challenge | worst group |")
    lines.append("|" + " --- |" * (len(cols) + 4))
    for method, r in reports.items():
        acc = r["accuracy"]
        lines.append(
            f"| {method} | "
            + " | ".join(_fmt(acc.get(c)) for c in cols)
            + f" | {_fmt(r.get('bg_gap'))} | {_fmt(r.get('challenge_accuracy'))} | {_fmt(r.get('worst_group_accuracy'))} |"
        )
    lines += [
        "",
        "Top-1 accuracy in percent on the test split's Background Challenge variants. bg_gap = mixed_same - mixed_rand",
        "(lower is better); only_bg_t: background alone (lower = less background reliance).",
    ]
    for note in notes or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot_methods(reports: dict[str, dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """mixed_same vs mixed_rand accuracy per method (grouped bars, the gap annotated), as CLAD plots it."""
    plt = _plt()
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
