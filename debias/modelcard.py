"""The model card (README.md) of a trained model folder.

``scripts/train.py`` writes it next to the final model; ``scripts/publish.py --model`` re-renders it
before uploading, so that an evaluation run after training (``scripts/evaluate.py --output
DIR/eval``) shows up in the card. ``python -m debias.modelcard DIR`` refreshes it by hand. A card whose
marker line has been removed is the user's and is never overwritten by publishing.

The card has YAML metadata (``library_name``, ``pipeline_tag``, ``license``, ``tags``, ``datasets``,
``metrics``, ``base_model``) and sections: the method with its hyper-parameters, the data, the
evaluation (the ``report.json`` files in or under the folder, as written by
:func:`debias.report.write_evaluation_report`), how to load the model, intended use and limitations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

# the Background Challenge's variants (a torch-free module, so reading a card needs no torch)
from augment.sources.bgchallenge import VARIANTS as VARIANT_ORDER

CARD_MARKER = "<!-- model card written by debias/modelcard.py; delete this line to keep your edits -->"
BACKGROUND_ONLY = ("no_fg", "only_bg_b", "only_bg_t")
METHODS = {
    "erm": "ERM: cross-entropy on the original images, CE(x). The baseline, with no counterfactual data.",
    "augment": "Background-swap augmentation: cross-entropy over each original x and its positive x+ "
    "(the same object on the background of an image of another class).",
    "clad": "CLAD (Wang et al., BMVC 2022): CE(x) + lambda * InfoNCE(x, x+, x-). The contrastive term pulls "
    "an image towards its positive (same object, other background) and away from negatives that share "
    "its background (features of other classes' objects on backgrounds of its class, from a "
    "per-background dictionary, plus stored object-removed/replaced negatives).",
    "clad+": "CLAD+: CE(x) + CE(x+) + lambda * InfoNCE(x, x+, x-), CLAD with the positives also classified.",
}
SMALL_RESNET_TYPE = "clad-small-resnet"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _card_license(path: Path) -> str | None:
    """The ``license`` of an existing card's YAML (kept when the card is re-rendered)."""
    try:
        text = path.read_text(encoding="utf-8")
        end = text.find("\n---", 3)
        meta = yaml.safe_load(text[3:end]) if text.startswith("---") and end > 0 else None
    except (OSError, yaml.YAMLError):
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.1f}" if isinstance(x, (int, float)) else str(x)


def _weights_mtime(model_dir: Path) -> float | None:
    times = [
        (model_dir / w).stat().st_mtime
        for w in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
        if (model_dir / w).is_file()
    ]
    return max(times) if times else None


def find_reports(model_dir: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """The evaluation reports of this model: ``report.json`` in the folder or a subfolder (never in a
    ``checkpoint-*``), written after the weights, and not naming another model. ``(relative path,
    report)`` pairs, sorted by path."""
    model_dir = Path(model_dir)
    saved = _weights_mtime(model_dir)
    found = []
    for path in sorted(model_dir.rglob("report.json")):
        rel = path.relative_to(model_dir)
        if any(p.startswith(("checkpoint-", ".")) for p in rel.parts[:-1]):
            continue
        if saved is not None and path.stat().st_mtime < saved:
            continue  # from an earlier model trained into the same folder
        report = _read_json(path)
        if not isinstance(report, dict) or not isinstance(report.get("accuracy"), dict):
            continue
        named = report.get("model")
        if named and os.path.isdir(named) and Path(named).resolve() != model_dir.resolve():
            continue
        found.append((rel.as_posix(), report))
    return found


def _dataset_counts(dataset: str | None) -> dict[str, dict[str, int]]:
    """split -> kind -> rows of a local dataset folder (reads the ``kind`` column only)."""
    if not dataset or not (Path(dataset) / "data").is_dir():
        return {}
    import pyarrow.parquet as pq

    counts: dict[str, dict[str, int]] = {}
    order = ("train", "validation", "test")
    files = sorted(
        (Path(dataset) / "data").glob("*.parquet"),
        key=lambda f: (order.index(s) if (s := f.name.split("-")[0]) in order else len(order), f.name),
    )
    for f in files:
        split = f.name.split("-")[0]
        try:
            kinds = pq.read_table(f, columns=["kind"]).column("kind").to_pylist()
        except Exception:  # an unreadable shard leaves the counts out, not the card
            return {}
        c = counts.setdefault(split, {})
        for k in kinds:
            c[k] = c.get(k, 0) + 1
    return counts


def _hyperparameters(args: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, Any]]:
    method = args.get("method", "n/a")
    rows: list[tuple[str, Any]] = [
        ("method", f"`{method}`"),
        ("backbone", f"`{args.get('backbone', 'n/a')}`"),
    ]
    if args.get("backbone") == "small-resnet":
        rows.append(("widths", args.get("widths") or "16 32 64 128 (default)"))
    rows += [
        ("resolution", f"{summary.get('resolution', args.get('resolution', 'n/a'))} px"),
        ("epochs (run)", f"{args.get('epochs', 'n/a')} ({summary.get('epochs_run', 'n/a')})"),
        ("max train steps", args.get("max_train_steps") or "-"),
        ("optimizer steps", summary.get("steps", "n/a")),
        (
            "batch",
            f"{args.get('batch_size', 'n/a')} anchors per process x {summary.get('num_processes', 1)} processes"
            f" x {args.get('gradient_accumulation_steps', 1)} accumulation steps",
        ),
        ("optimizer", f"Adam, lr {args.get('lr')}, weight decay {args.get('weight_decay')}"),
        ("lr schedule", f"x {args.get('lr_decay')} at epochs {args.get('lr_decay_epochs')}"),
        (
            "augmentation",
            f"random resized crop {args.get('crop_scale')}, flip, colour jitter {args.get('color_jitter')}"
            + (", positives cropped like their anchors" if args.get("paired_crops") else ""),
        ),
    ]
    if method in ("clad", "clad+"):
        rows += [
            ("InfoNCE temperature tau", args.get("temperature")),
            ("contrastive weight lambda", args.get("lambda_con")),
            ("dictionary negatives per anchor", args.get("queue_size")),
            ("stored negatives per anchor", args.get("max_stored_negatives")),
        ]
    excon = summary.get("excon")
    if excon:
        rows.append(
            (
                "saliency positives (ExCon)",
                f"{excon['mode']} rows ({excon['eligible_rows']}), Grad-CAM `{excon['cam_layer']}` > "
                f"{excon['threshold']} kept, refreshed every {excon['refresh_epochs']} epoch(s) "
                f"({len(excon['refreshes'])} refreshes); {excon['saliency_positives_last_refresh']} rows kept the "
                f"prediction at the last refresh, {excon['saliency_positives_total']} saliency positives offered in all"
                + (", complements as negatives" if excon["negatives"] else ""),
            )
        )
    rows += [
        (
            "model selection",
            f"validation `{args.get('selection_metric', 'n/a')}`, epoch {summary.get('best_epoch', 'n/a')}",
        ),
        ("mixed precision", args.get("mixed_precision") or "accelerate default"),
        ("seed", args.get("seed")),
    ]
    return rows


def _evaluation(reports: list[tuple[str, dict[str, Any]]], model_ref: str, dataset: str | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not reports:
        lines += [
            "Not evaluated yet. Measure background reliance on the test split and refresh this card:",
            "",
            "```bash",
            f"python scripts/evaluate.py --model {model_ref} --dataset {dataset or 'DATASET_DIR'} "
            f"--output {model_ref}/eval",
            f"python -m debias.modelcard {model_ref}   # or scripts/publish.py --model, which refreshes it",
            "```",
            "",
        ]
        return lines
    variants = [v for v in VARIANT_ORDER if any(v in r["accuracy"] for _, r in reports)]
    lines += [
        "Top-1 accuracy in percent on the Background Challenge variants built from the test images' "
        "foreground masks (Xiao et al., ICLR 2021). `bg_gap` = mixed_same - mixed_rand (lower is better); "
        "for " + ", ".join(BACKGROUND_ONLY) + " lower means less background reliance; challenge accuracy is "
        "the share of foregrounds no background can flip; worst group is the lowest accuracy over "
        "(label, bg_label) groups.",
        "",
        "| report | split | " + " | ".join(variants) + " | bg_gap | challenge | worst group |",
        "| --- | --- | " + " | ".join("---" for _ in variants) + " | --- | --- | --- |",
    ]
    for rel, r in reports:
        acc = r["accuracy"]
        lines.append(
            f"| `{rel}` | {r.get('split', 'test')} | "
            + " | ".join(_fmt(acc.get(v)) for v in variants)
            + f" | {_fmt(r.get('bg_gap'))} | {_fmt(r.get('challenge_accuracy'))} | {_fmt(r.get('worst_group_accuracy'))} |"
        )
    lines.append("")
    for rel, r in reports:
        details = r.get("details") or {}
        where = f"`{r['dataset']}`" if r.get("dataset") else "the dataset"
        extra = []
        if details.get("num_images"):
            extra.append(f"{details['num_images'].get('original', 'n/a')} test originals")
        if details.get("note"):
            extra.append(details["note"])
        lines.append(f"- `{rel}`: {where}{'; ' + '; '.join(extra) if extra else ''}.")
        hin = r.get("hard_imagenet")
        if isinstance(hin, dict):  # object ablation, relative foreground sensitivity, saliency alignment
            parts = []
            if isinstance(hin.get("ablation_drop"), dict):
                parts.append(
                    "accuracy drop when the object is ablated "
                    + ", ".join(f"{k} {_fmt(v)}" for k, v in hin["ablation_drop"].items())
                )
            if hin.get("rfs") is not None:
                parts.append(f"relative foreground sensitivity {hin['rfs']:.3f}")
            if hin.get("saliency_iou") is not None:
                parts.append(f"saliency-mask IoU {_fmt(hin['saliency_iou'])}")
            if parts:
                lines.append(f"  Hard ImageNet measures: {'; '.join(parts)}.")
    return lines + [""]


def render_model_card(
    model_dir: str | os.PathLike,
    args: dict[str, Any] | argparse.Namespace | None = None,
    class_names: list[str] | None = None,
    summary: dict[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
) -> str:
    """The README.md text of a model folder. What is not given is read from the folder:
    ``training_args.json``, ``train_summary.json``, ``config.json`` and the evaluation reports."""
    model_dir = Path(model_dir)
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    args = dict(args or _read_json(model_dir / "training_args.json") or {})
    summary = dict(summary or _read_json(model_dir / "train_summary.json") or {})
    config = _read_json(model_dir / "config.json") or {}
    if class_names is None:
        id2label = config.get("id2label") or {}
        class_names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
    license = license or _card_license(model_dir / "README.md") or "other"
    method = args.get("method", "unknown")
    dataset = args.get("dataset")
    generation = _read_json(Path(dataset) / "generation.json") if dataset else None
    generation = generation if isinstance(generation, dict) else {}
    hub = generation.get("hub") or {}
    datasets = [d for d in (dataset_id, None if hub.get("local") else hub.get("dataset")) if d]
    backbone = str(args.get("backbone", ""))
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-classification",
        "license": license,
        "tags": [
            "image-classification",
            "background-bias",
            "counterfactual-augmentation",
            method.replace("+", "-plus"),
        ],
        "metrics": ["accuracy"],
    }
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    if backbone and backbone != "small-resnet" and not os.path.exists(backbone) and "/" in backbone:
        meta["base_model"] = backbone
    ref = repo_id or "path/to/this/folder"
    small = config.get("model_type") == SMALL_RESNET_TYPE
    reports = find_reports(model_dir)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", CARD_MARKER, ""]
    lines += [
        f"# {method} image classifier"
        + (f" ({', '.join(class_names)})" if 0 < len(class_names) <= 10 else ""),
        "",
        f"An image classifier trained to rely on the object rather than its background, with "
        f"`scripts/train.py --method {method}` of this package on a counterfactual dataset "
        "(originals, positives with the object on another background, negatives with the object removed or "
        "replaced).",
        "",
        "## Method",
        "",
        METHODS.get(method, f"`{method}`."),
        "",
        "| hyper-parameter | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v} |" for k, v in _hyperparameters(args, summary)]
    lines += ["", "All arguments are in `training_args.json`; the per-epoch log in `log.jsonl`.", ""]
    lines += ["## Data", ""]
    if dataset_id:
        lines.append(
            f"Dataset: [`{dataset_id}`](https://huggingface.co/datasets/{dataset_id}) (trained from the folder `{dataset}`)."
        )
    else:
        lines.append(f"Dataset: the folder `{dataset or 'n/a'}` written by `scripts/generate.py`.")
    if generation.get("source"):
        src = f"`{generation['source']}`"
        if hub.get("dataset") and not hub.get("local"):
            src += f" ([`{hub['dataset']}`](https://huggingface.co/datasets/{hub['dataset']}))"
        lines.append(f"Its source: {src}.")
    if class_names:
        lines.append(f"Classes ({len(class_names)}): " + ", ".join(f"`{c}`" for c in class_names) + ".")
    counts = _dataset_counts(dataset)
    if counts:
        kinds = ["original", "positive", "negative", "generated"]
        lines += ["", "| split | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        lines += [f"| {s} | " + " | ".join(str(c.get(k, 0)) for k in kinds) + " |" for s, c in counts.items()]
    lines += [
        "",
        "Training uses the `train` split; the epoch kept is chosen on the `validation` split's "
        "original / mixed_same / mixed_rand variants.",
        "",
    ]
    best = summary.get("best_validation")
    if best:
        lines += [
            "Validation accuracy of the kept epoch (percent): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in best.items())
            + ".",
            "",
        ]
    lines += _evaluation(reports, str(model_dir) if repo_id is None else "MODEL_DIR", dataset)
    lines += ["## How to use", ""]
    if small:
        lines += [
            "The backbone is this package's small ResNet: install the package (`pip install .` in a "
            "checkout of its repository) and `import debias.models`, which registers it with the Auto "
            "classes.",
            "",
        ]
    lines += [
        "```python",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
    ]
    if small:
        lines.append("import debias.models  # noqa: F401  (registers the small ResNet)")
    lines += [
        "",
        f'model = AutoModelForImageClassification.from_pretrained("{ref}").eval()',
        f'processor = AutoImageProcessor.from_pretrained("{ref}")',
        'inputs = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")',
        "label = model.config.id2label[model(**inputs).logits.argmax(-1).item()]",
        "```",
        "",
        "`preprocessor_config.json` holds the input size and normalisation used in training.",
        "",
        "## Intended use and limitations",
        "",
        "- Research on background reliance and its mitigation; it recognises only the classes above, at "
        "the training resolution.",
        "- Lower background reliance is measured on the variants above, built from the test split of the "
        "same source; it is not a guarantee on other data, and the variants themselves are cut-and-paste "
        "images.",
        "- The counterfactuals it was trained on inherit the dataset card's limitations (mask errors, "
        "composite or diffusion artefacts).",
    ]
    if generation.get("source") == "synthetic":
        lines.append(
            "- Trained on the synthetic benchmark (shapes on textures): a demonstration, not a model of "
            "natural images."
        )
    lines += ["- Not for decisions about people.", ""]
    return "\n".join(lines)


def write_model_card(
    output_dir: str | os.PathLike,
    args: dict[str, Any] | argparse.Namespace | None = None,
    class_names: list[str] | None = None,
    summary: dict[str, Any] | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
) -> Path:
    """Write ``README.md`` into the model folder (see :func:`render_model_card`); returns its path."""
    path = Path(output_dir) / "README.md"
    path.write_text(
        render_model_card(output_dir, args, class_names, summary, license, repo_id, dataset_id),
        encoding="utf-8",
    )
    return path


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m debias.modelcard",
        description="(Re)write the model card of a folder written by scripts/train.py, with its evaluation reports.",
    )
    p.add_argument("model_dir")
    p.add_argument("--license", help="license id for the card (default: other)")
    p.add_argument("--repo-id", help="the Hub repository the card's loading example names")
    p.add_argument("--dataset-id", help="the Hub dataset the model was trained on")
    a = p.parse_args(argv)
    if not (Path(a.model_dir) / "config.json").is_file():
        print(f"modelcard: error: {a.model_dir} has no config.json (not a model folder)", file=sys.stderr)
        return 2
    path = write_model_card(a.model_dir, license=a.license, repo_id=a.repo_id, dataset_id=a.dataset_id)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
