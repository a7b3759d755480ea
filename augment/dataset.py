"""The dataset: schema, the sharded writer, the dataset card and the preview sheet.

The output folder is a Hugging Face dataset in the Hub's layout, so ``datasets.load_dataset(folder)``
reads it back with its features, and publishing is an upload of the folder::

    folder/
      README.md                  dataset card; YAML ``configs:`` (default, rejected) and ``dataset_info``
      data/<split>-0000i-of-0000n.parquet
      rejected/<split>-00000-of-00001.parquet   every refused input: id, split, stage, reason
      phrase_masks/<split>-00000-of-00001.parquet  per-phrase masks of the segmentation stage (when made)
      generation.json            the settings that produced the folder
      preview.png                original | mask | positives | negatives, one row per sampled original

Every file is written to a temporary name, flushed to disk and renamed into place
(:func:`atomic_write`), so a reader, or a job resumed after a crash, never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageDraw

from . import __version__
from .sources.base import SPLIT_ORDER, order_splits
from .workfolder import atomic_write

KINDS = ("original", "positive", "negative", "generated")


def dataset_features(class_names: Sequence[str]):
    """The ``datasets.Features`` of a counterfactual dataset (see DESIGN.md)."""
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "id": Value("string"),
            "image": ImageFeature(),
            "mask": ImageFeature(),
            "label": ClassLabel(names=list(class_names)),
            "bg_label": Value("int32"),
            "kind": Value("string"),
            "source_id": Value("string"),
            "caption": Value("string"),
            "fg_phrases": List(Value("string")),
            "bg_phrases": List(Value("string")),
            "alt_phrases": List(Value("string")),
            "spurious_phrases": List(Value("string")),
            "recipe": Value("string"),
        }
    )


def phrase_mask_features():
    """The ``datasets.Features`` of the ``phrase_masks`` configuration: one row per (original, phrase)."""
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "id": Value("string"),
            "phrase": Value("string"),
            "mask": ImageFeature(),
            "boxes": List(List(Value("float32"))),
            "scores": List(Value("float32")),
        }
    )


def rejected_features():
    """The ``datasets.Features`` of the ``rejected`` configuration."""
    from datasets import Features, Value

    return Features(
        {"id": Value("string"), "split": Value("string"), "stage": Value("string"), "reason": Value("string")}
    )


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG encoding (what the dataset stores, so pixels round-trip exactly)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def phrase_mask_record(
    id: str,
    phrase: str,
    mask: Image.Image,
    boxes: Sequence[Sequence[float]] = (),
    scores: Sequence[float] = (),
) -> dict[str, Any]:
    """One row of the ``phrase_masks`` configuration, encoded."""
    if mask.mode != "L":
        raise ValueError(f"phrase mask of {id} ({phrase!r}) must be mode L, got {mask.mode}")
    return {
        "id": id,
        "phrase": phrase,
        "mask": {"bytes": png_bytes(mask), "path": None},
        "boxes": [[float(v) for v in b] for b in boxes],
        "scores": [float(v) for v in scores],
    }


@dataclass
class Row:
    """One image row of the dataset, before encoding."""

    id: str
    image: Image.Image
    label: int
    kind: str
    source_id: str
    mask: Image.Image | None = None
    bg_label: int = -1
    caption: str = ""
    fg_phrases: list[str] = field(default_factory=list)
    bg_phrases: list[str] = field(default_factory=list)
    alt_phrases: list[str] = field(default_factory=list)
    spurious_phrases: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        if self.kind not in KINDS:
            raise ValueError(f"row {self.id}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.image.mode != "RGB":
            raise ValueError(f"row {self.id}: image must be RGB, got mode {self.image.mode}")
        if self.mask is not None and (self.mask.mode != "L" or self.mask.size != self.image.size):
            raise ValueError(
                f"row {self.id}: mask must be mode L and the image's size {self.image.size}, "
                f"got mode {self.mask.mode} size {self.mask.size}"
            )
        return {
            "id": self.id,
            "image": {"bytes": png_bytes(self.image), "path": None},
            "mask": None if self.mask is None else {"bytes": png_bytes(self.mask), "path": None},
            "label": int(self.label),
            "bg_label": int(self.bg_label),
            "kind": self.kind,
            "source_id": self.source_id,
            "caption": self.caption,
            "fg_phrases": list(self.fg_phrases),
            "bg_phrases": list(self.bg_phrases),
            "alt_phrases": list(self.alt_phrases),
            "spurious_phrases": list(self.spurious_phrases),
            "recipe": json.dumps(self.recipe, sort_keys=True),
        }

    @classmethod
    def decode(cls, record: dict[str, Any]) -> Row:
        """The row back from :meth:`encode`'s output (a parquet record of the dataset)."""

        def image(cell):
            return None if cell is None else Image.open(io.BytesIO(cell["bytes"]))

        return cls(
            id=record["id"],
            image=image(record["image"]),
            mask=image(record["mask"]),
            label=record["label"],
            kind=record["kind"],
            source_id=record["source_id"],
            bg_label=record["bg_label"],
            caption=record["caption"],
            fg_phrases=list(record["fg_phrases"]),
            bg_phrases=list(record["bg_phrases"]),
            alt_phrases=list(record["alt_phrases"]),
            spurious_phrases=list(record["spurious_phrases"]),
            recipe=json.loads(record["recipe"]),
        )


def parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> tuple[bytes, int]:
    """``rows`` as the bytes of one parquet file, and their size in Arrow memory.

    An empty table is written with no row group at all: ``datasets`` cannot read a zero-row group.
    """
    sink = pa.BufferOutputStream()
    if rows:
        table = pa.Table.from_pylist(rows, schema=schema)
        pq.write_table(table, sink)
        nbytes = table.nbytes
    else:
        pq.ParquetWriter(sink, schema).close()
        nbytes = 0
    return sink.getvalue().to_pybytes(), int(nbytes)


def _write_table(rows: list[dict[str, Any]], schema: pa.Schema, path: Path) -> int:
    """Write ``rows`` as one parquet file with :func:`atomic_write`; returns their Arrow bytes."""
    data, nbytes = parquet_bytes(rows, schema)
    atomic_write(path, data)
    return nbytes


class DatasetWriter:
    """Write rows and rejections into a dataset folder (see the module docstring).

    Rows are buffered per split and written ``shard_size`` at a time; ``close`` names the shards
    ``-0000i-of-0000n``, writes the ``rejected`` tables, the card and the preview, and returns the
    counts. Ids must be unique across the dataset. ``keep``: names inside ``output_dir`` that may
    already be there and are left alone (the generation job's work folder).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        shard_size: int = 2000,
        overwrite: bool = False,
        preview_rows: int = 9,
        keep: Sequence[str] = (),
    ):
        self.output_dir = Path(output_dir)
        if self.output_dir.exists() and any(e.name not in keep for e in self.output_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{self.output_dir} exists and is not empty; choose another --output or pass --overwrite"
                )
            shutil.rmtree(self.output_dir)
        (self.output_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.output_dir / "rejected").mkdir(parents=True, exist_ok=True)
        self.class_names = list(class_names)
        self.features = dataset_features(self.class_names)
        self.schema = self.features.arrow_schema
        self.shard_size = shard_size
        self._buffers: dict[str, list[dict]] = defaultdict(list)
        self._shards: dict[str, list[Path]] = defaultdict(list)
        self._nbytes: Counter = Counter()  # config/split -> Arrow bytes
        self._rejected: list[dict[str, str]] = []
        self._phrase_masks: dict[str, list[dict]] = defaultdict(list)
        self._ids: set[str] = set()
        self.counts: dict[str, Counter] = defaultdict(Counter)  # split -> kind -> n
        self.groups: dict[str, Counter] = defaultdict(Counter)  # split -> (label, bg_label) of originals
        self.generators: Counter = Counter()
        self._preview = _PreviewCollector(preview_rows)

    # -- rows ----------------------------------------------------------------------------------
    def add(self, split: str, row: Row) -> None:
        """Queue one row of ``split``; a full buffer is written as a shard."""
        self.add_record(split, row.encode(), row)

    def add_record(self, split: str, record: dict[str, Any], row: Row | None = None) -> None:
        """Queue one encoded row (:meth:`Row.encode`'s output, e.g. read back from a parquet file);
        ``row``: the same row decoded, when at hand (the preview sheet needs its images)."""
        rid, label = record["id"], record["label"]
        if rid in self._ids:
            raise ValueError(f"duplicate id {rid!r}: ids must be unique across the dataset")
        if not -1 <= label < len(self.class_names):
            raise ValueError(
                f"row {rid}: label {label} is not a class index (0..{len(self.class_names) - 1} or -1)"
            )
        self._buffers[split].append(record)
        self._ids.add(rid)
        kind = record["kind"]
        self.counts[split][kind] += 1
        if kind == "original":
            self.groups[split][(int(label), int(record["bg_label"]))] += 1
        else:
            recipe = row.recipe if row is not None else json.loads(record["recipe"])
            if "generator" in recipe:
                self.generators[recipe["generator"]] += 1
        if split == "train" and self._preview.wants(record):
            self._preview.offer(row if row is not None else Row.decode(record))
        if len(self._buffers[split]) >= self.shard_size:
            self._flush(split)

    def reject(self, id: str, split: str, stage: str, reason: str) -> None:
        """Record an input (or a derived row) that a stage refused, with the reason."""
        self._rejected.append({"id": id, "split": split, "stage": stage, "reason": reason})

    def add_phrase_mask_record(self, split: str, record: dict[str, Any]) -> None:
        """Keep an encoded phrase mask (:func:`phrase_mask_record`'s output)."""
        self._phrase_masks[split].append(record)

    def add_phrase_mask(
        self,
        split: str,
        id: str,
        phrase: str,
        mask: Image.Image,
        boxes: Sequence[Sequence[float]] = (),
        scores: Sequence[float] = (),
    ) -> None:
        """Keep the mask of one foreground phrase of original ``id`` (for the discovery stage)."""
        self.add_phrase_mask_record(split, phrase_mask_record(id, phrase, mask, boxes, scores))

    def _flush(self, split: str) -> None:
        rows = self._buffers.pop(split, [])
        if not rows:
            return
        path = self.output_dir / "data" / f"{split}-{len(self._shards[split]):05d}.parquet"
        self._nbytes[("default", split)] += _write_table(rows, self.schema, path)
        self._shards[split].append(path)

    @property
    def rejected(self) -> list[dict[str, str]]:
        return list(self._rejected)

    # -- finishing -----------------------------------------------------------------------------
    def close(self, settings: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
        """Write everything still buffered, the rejected tables, the card and the preview."""
        for split in list(self._buffers):
            self._flush(split)
        splits = order_splits(self._shards)
        if not splits:
            raise RuntimeError(f"no rows were written to {self.output_dir}: every input was rejected")
        for split in splits:
            shards = self._shards[split]
            for i, path in enumerate(shards):
                path.rename(path.with_name(f"{split}-{i:05d}-of-{len(shards):05d}.parquet"))
        rej_schema = rejected_features().arrow_schema
        rejected_by_split: dict[str, list[dict]] = defaultdict(list)
        for r in self._rejected:
            rejected_by_split[r["split"]].append(r)
        rejected_splits = splits + sorted(set(rejected_by_split) - set(splits))
        # datasets cannot load a split with no rows (load_dataset raises "corresponds to no data"), so
        # the card lists the non-empty rejected tables; every table is on disk, empty or not, and
        # load_rejected() reads them all.
        listed = [s for s in rejected_splits if rejected_by_split.get(s)] or rejected_splits
        for split in rejected_splits:
            path = self.output_dir / "rejected" / f"{split}-00000-of-00001.parquet"
            self._nbytes[("rejected", split)] = _write_table(
                rejected_by_split.get(split, []), rej_schema, path
            )
        phrase_splits = [s for s in splits if self._phrase_masks.get(s)]
        if phrase_splits:
            (self.output_dir / "phrase_masks").mkdir(exist_ok=True)
        for split in phrase_splits:
            path = self.output_dir / "phrase_masks" / f"{split}-00000-of-00001.parquet"
            self._nbytes[("phrase_masks", split)] = _write_table(
                self._phrase_masks[split], phrase_mask_features().arrow_schema, path
            )
        summary = {
            "splits": {s: dict(self.counts[s]) for s in splits},
            "rejected": {s: len(rejected_by_split.get(s, [])) for s in rejected_splits},
            "rejected_by_stage": dict(Counter(r["stage"] for r in self._rejected)),
            "generators": dict(self.generators),
        }
        if phrase_splits:
            summary["phrase_masks"] = {s: len(self._phrase_masks[s]) for s in phrase_splits}
        settings = dict(settings or {})
        settings["package_version"] = __version__
        atomic_write(
            self.output_dir / "generation.json",
            json.dumps(settings, indent=2, sort_keys=True, default=str).encode(),
        )
        card = render_card(self, splits, listed, settings, summary, description)
        atomic_write(self.output_dir / "README.md", card.encode("utf-8"))
        sheet = self._preview.render(self.class_names)
        if sheet is not None:
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            atomic_write(self.output_dir / "preview.png", buf.getvalue())
        return summary


# ----------------------------------------------------------------------------------------------
# Dataset card
# ----------------------------------------------------------------------------------------------


def render_card(
    writer: DatasetWriter,
    splits: list[str],
    rejected_splits: list[str],
    settings: dict[str, Any],
    summary: dict[str, Any],
    description: str,
) -> str:
    """The README.md of the dataset folder: YAML metadata that ``load_dataset`` reads, then prose."""
    total = {s: sum(writer.counts[s].values()) for s in splits}
    meta = {
        "configs": [
            {
                "config_name": "default",
                "default": True,
                "data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits],
            },
            {
                "config_name": "rejected",
                "data_files": [{"split": s, "path": f"rejected/{s}-*"} for s in rejected_splits],
            },
        ],
        "dataset_info": [
            {
                "config_name": "default",
                "features": writer.features._to_yaml_list(),
                # the bytes on disk: datasets keys its cache of a folder on this metadata, so a
                # rewrite that changes the files also changes the key (see folder_fingerprint)
                "download_size": sum(
                    f.stat().st_size for f in (writer.output_dir / "data").glob("*.parquet")
                ),
                "splits": [
                    {"name": s, "num_bytes": writer._nbytes[("default", s)], "num_examples": total[s]}
                    for s in splits
                ],
            },
            {
                "config_name": "rejected",
                "features": rejected_features()._to_yaml_list(),
                "splits": [
                    {
                        "name": s,
                        "num_bytes": writer._nbytes[("rejected", s)],
                        "num_examples": summary["rejected"][s],
                    }
                    for s in rejected_splits
                ],
            },
        ],
        "task_categories": ["image-classification"],
    }
    phrase_counts = summary.get("phrase_masks", {})
    if phrase_counts:
        meta["configs"].append(
            {
                "config_name": "phrase_masks",
                "data_files": [{"split": s, "path": f"phrase_masks/{s}-*"} for s in phrase_counts],
            }
        )
        meta["dataset_info"].append(
            {
                "config_name": "phrase_masks",
                "features": phrase_mask_features()._to_yaml_list(),
                "splits": [
                    {"name": s, "num_bytes": writer._nbytes[("phrase_masks", s)], "num_examples": n}
                    for s, n in phrase_counts.items()
                ],
            }
        )
    meta["license"] = settings.get("license") or DEFAULT_LICENSE
    meta["pretty_name"] = settings.get("pretty_name") or _pretty_name(settings)
    # the Hub's keys in its usual order: task, size, then tags
    meta = {k: meta[k] for k in ("configs", "dataset_info", "license", "pretty_name", "task_categories")}
    meta["size_categories"] = [_size_category(sum(total.values()))]
    meta["tags"] = ["counterfactual-augmentation", "background-bias", "clad", "aspire"] + (
        ["synthetic"] if settings.get("source") == "synthetic" else []
    )
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {meta['pretty_name']}", ""]
    if description:
        lines += [description, ""]
    lines += [
        "Each original image sits beside the counterfactuals derived from it: *positives* keep the object",
        "and change the background, *negatives* keep the background and remove or replace the object",
        "(label -1 when no object is left). `bg_label` is the class whose background an image carries and",
        "keys CLAD's negative dictionary; `recipe` (JSON) records how each row was made.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("path/to/this/folder")            # train / validation / test',
        'rejected = load_dataset("path/to/this/folder", "rejected")  # every refused input and why',
    ]
    if phrase_counts:
        lines.append(
            'phrases = load_dataset("path/to/this/folder", "phrase_masks")  # a mask per foreground phrase'
        )
    lines += [
        "```",
        "",
        "## Counts",
        "",
        "| split | " + " | ".join(KINDS) + " | rejected |",
        "| --- | " + " | ".join("---" for _ in KINDS) + " | --- |",
    ]
    for s in splits:
        lines.append(
            f"| {s} | "
            + " | ".join(str(writer.counts[s].get(k, 0)) for k in KINDS)
            + f" | {summary['rejected'][s]} |"
        )
    lines += [""]
    lines += _source_section(settings, writer.class_names, splits)
    lines += _models_section(settings)
    lines += _method_section(settings, writer, splits, summary)
    names = writer.class_names
    for s in splits:
        groups = writer.groups[s]
        if not groups:
            continue
        bg_ids = sorted({b for _, b in groups})
        lines += [f"## Originals per (label, bg_label) group: {s}", ""]
        lines.append(
            "| label \\ bg_label | "
            + " | ".join(names[b] if 0 <= b < len(names) else str(b) for b in bg_ids)
            + " |"
        )
        lines.append("| --- | " + " | ".join("---" for _ in bg_ids) + " |")
        for y in sorted({y for y, _ in groups}):
            lines.append(f"| {names[y]} | " + " | ".join(str(groups.get((y, b), 0)) for b in bg_ids) + " |")
        lines.append("")
    lines += ["## Rejected", ""]
    if writer.rejected:
        lines.append("| stage | count |")
        lines.append("| --- | --- |")
        for stage, n in sorted(summary["rejected_by_stage"].items()):
            lines.append(f"| {stage} | {n} |")
        lines += ["", "First reasons:", ""]
        lines += [f"- `{r['id']}` ({r['stage']}): {r['reason']}" for r in writer.rejected[:10]]
    else:
        lines.append("No input was rejected.")
    lines += ["", "## Columns", ""]
    lines += [
        "| column | meaning |",
        "| --- | --- |",
        "| `id` | `{source}/{split}/{index}` for originals, `{source_id}/{kind}/{k}` for derived rows |",
        "| `image`, `mask` | RGB image; foreground mask (255 = object), empty when no object is left |",
        "| `label` | the object's class (-1: no object) |",
        "| `bg_label` | the class whose background the image carries (-1: unknown) |",
        "| `kind` | original, positive, negative or generated |",
        "| `source_id` | the original the row derives from (itself for originals) |",
        "| `caption` | the image's caption (`recipe.caption` says whether a model, the dataset or the label made it) |",
        "| `fg_phrases`, `bg_phrases`, `alt_phrases` | foreground objects besides the labelled one, the "
        "background, an alternative background (`recipe.extract` says how they were extracted) |",
        "| `spurious_phrases` | phrases the discovery stage found a classifier relies on |",
        "| `recipe` | JSON provenance: generator, operation, sources, seeds, settings |",
        "",
    ]
    lines += _limitations_section(settings, writer, splits)
    lines += [
        "## License",
        "",
        "The license of this folder is the `license` field of the metadata above (`scripts/publish.py "
        "--license` sets it). Images derived from a source dataset remain subject to that dataset's terms.",
        "",
        "## Settings",
        "",
        "Everything that produced this folder (also in `generation.json`):",
        "",
        "<details><summary>generation.json</summary>",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


DEFAULT_LICENSE = "other"
_SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
]


def _n_rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    return next((name for limit, name in _SIZE_CATEGORIES if n < limit), "n>100M")


def _pretty_name(settings: dict[str, Any]) -> str:
    source = settings.get("source") or "unknown"
    hub = settings.get("hub") or {}
    if source == "hub" and hub.get("dataset") and not hub.get("local"):
        return f"Counterfactual augmentation of {hub['dataset']}"
    if source == "synthetic":
        return "Counterfactual augmentation of the synthetic background benchmark"
    return f"Counterfactual augmentation ({source} source)"


def _ref(d: dict[str, Any] | None) -> str:
    """``model`` at ``revision`` (or its resolved commit) as Markdown, for the card's model table."""
    if not isinstance(d, dict):
        return "-"
    model = d.get("model") or d.get("classifier") or d.get("checkpoint")
    if not model:
        return "-"
    rev = d.get("revision") or d.get("commit")
    text = f"`{model}`"
    if rev:
        text += f" @ `{rev}`"
    elif not str(model).startswith(("/", ".", "~")):
        text += " (revision not recorded)"
    return text


def _source_section(settings: dict[str, Any], class_names: Sequence[str], splits: list[str]) -> list[str]:
    source = settings.get("source") or "unknown"
    lines = ["## Source", ""]
    if source == "synthetic":
        lines.append(
            "The built-in synthetic benchmark (`augment/sources/synthetic.py`): procedurally drawn objects on "
            "textured backgrounds whose family equals the class with probability "
            f"rho = {settings.get('rho', 'n/a')} in every split (image size {settings.get('image_size', 'n/a')} px, "
            f"seed {settings.get('seed', 'n/a')}). Its masks are exact."
        )
    elif source == "hub":
        hub = settings.get("hub") or {}
        name = hub.get("dataset") or settings.get("data_dir")
        where = f"`{name}`" if hub.get("local") else f"[`{name}`](https://huggingface.co/datasets/{name})"
        rev = hub.get("revision") or "the default branch"
        commit = f", commit `{hub['commit']}`" if hub.get("commit") else ""
        lines.append(f"The Hugging Face dataset {where} at {rev}{commit}, read with `datasets.load_dataset`.")
        cols = [
            f"{what} `{settings.get(key)}`"
            for what, key in (
                ("image", "image_column"),
                ("label", "label_column"),
                ("mask", "mask_column"),
                ("group (-> `bg_label`)", "group_column"),
                ("caption", "caption_column"),
            )
            if settings.get(key)
        ]
        lines += ["", "Columns read: " + ", ".join(cols) + "."]
        if settings.get("groups"):
            lines += [
                "",
                "Group values -> `bg_label`: "
                + ", ".join(f"`{k}` -> {v}" for k, v in settings["groups"].items())
                + ".",
            ]
    else:
        lines.append(f"The `{source}` source")
        if settings.get("data_dir"):
            lines[-1] += f" reading `{settings['data_dir']}`"
        if settings.get("mask_dir"):
            lines[-1] += f" with masks from `{settings['mask_dir']}`"
        lines[-1] += "."
    lines += [
        "",
        f"Classes ({len(class_names)}): " + ", ".join(f"`{c}`" for c in class_names) + ".",
        f"Splits: {', '.join(splits)}; counterfactuals were made for: "
        + ", ".join(settings.get("counterfactual_splits") or ["train"])
        + ".",
        "",
    ]
    return lines


def _active_filters(filters: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(name, what it rejects, model) of the filters that were on (augment/filters.py)."""
    if not isinstance(filters, dict):
        return []
    out = []
    if filters.get("black"):
        b = filters["black"]
        out.append(
            (
                "black",
                f"near-black or flat images (mean < {b.get('mean_below')} or std < {b.get('std_below')})",
                "-",
            )
        )
    if filters.get("nsfw"):
        out.append(("nsfw", "images the pipeline's safety checker flagged", "-"))
    if filters.get("mask_area"):
        r = filters["mask_area"].get("max_ratio")
        out.append(("mask_area", f"object area over {r}x or under 1/{r} of the anchor's", "-"))
    if filters.get("semantic"):
        out.append(
            (
                "semantic",
                "CLIP: images closer to a negative prompt than to 'a photo of a {label}'",
                _ref(filters["semantic"]),
            )
        )
    if filters.get("confidence"):
        c = filters["confidence"]
        out.append(
            (
                "confidence",
                f"classifier probability of the label below {c.get('low')} (class destroyed) or above "
                f"{c.get('high')} (nothing changed)",
                _ref(c),
            )
        )
    return out


def _models_section(settings: dict[str, Any]) -> list[str]:
    """A table of every stage's method and model (id and revision)."""
    ann = settings.get("annotation") or {}
    gens = settings.get("generators") or {}
    rows: list[tuple[str, str, str]] = []
    if ann:
        cap = ann.get("caption") or {}
        if cap.get("captioner") or cap.get("model"):
            rows.append(("captions", f"image-to-text model, {cap.get('decoding', 'greedy')}", _ref(cap)))
        else:
            rows.append(("captions", cap.get("rule", "the dataset's captions"), "-"))
        ext = ann.get("extract") or {}
        if ext.get("extractor") == "llm":
            rows.append(("phrases", f"chat LLM, prompt `{ext.get('template', '')}`", _ref(ext)))
        else:
            rows.append(("phrases", f"{ext.get('extractor', 'caption-parser')} (no model)", "-"))
        seg = ann.get("segment") or {}
        mode = seg.get("mode") or seg.get("mask_source") or "given"
        if mode == "given":
            rows.append(("masks", "given by the source", "-"))
        else:
            rows.append(("masks", f"{mode}: SAM", _ref(seg.get("sam"))))
            if seg.get("detector"):
                rows.append(
                    (
                        "boxes",
                        f"text-grounded detector, threshold {seg.get('box_threshold')}",
                        _ref(seg["detector"]),
                    )
                )
    for kind in ("positives", "negatives"):
        g = gens.get(kind)
        if isinstance(g, dict) and g.get("generator"):
            if g["generator"] == "composite":
                rows.append((kind, "composite (cut-and-paste, no model)", "-"))
            else:
                detail = ", ".join(
                    f"{k} {g[k]}"
                    for k in ("steps", "guidance", "strength", "resolution")
                    if g.get(k) is not None
                )
                rows.append(
                    (
                        kind,
                        f"{g['generator']} ({g.get('pipeline', 'diffusers')}{', ' + detail if detail else ''})",
                        _ref(g),
                    )
                )
    for name, what, model in _active_filters(gens.get("filters")):
        rows.append((f"filter: {name}", what, model))
    disc = settings.get("discover")
    if isinstance(disc, dict):
        rows.append(
            ("discover", "ASPIRE spurious-feature discovery", _ref(disc) if disc.get("classifier") else "-")
        )
        for part in ("remover", "editor"):
            if isinstance(disc.get(part), dict):
                rows.append(
                    (
                        f"discover: {part}",
                        str(disc[part].get("generator") or disc[part].get("remover") or part),
                        _ref(disc[part]),
                    )
                )
    pers = settings.get("personalize")
    if isinstance(pers, dict):
        g = pers.get("generator") if isinstance(pers.get("generator"), dict) else {}
        rows.append(("generated", f"text-to-image with per-class {g.get('method', 'adapters')}", _ref(g)))
    if not rows:
        return []
    lines = ["## Models and generators", "", "| stage | method | model @ revision |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines + [""]


_HOW = {
    "composite": {
        "positive": "the anchor's object, cut out with its mask pixel for pixel, pasted at the same place onto "
        "the background of an image of another class whose own object was removed by tiling (the "
        "Background Challenge's only_bg_t); `bg_label` is that image's background class (its label when "
        "the source gives none).",
        "negative": "the anchor's own background with its object removed by tiling (`remove`, label -1), or "
        "on that tiled background with another class's object pasted centred on the anchor's object box "
        "(`replace`).",
    },
    "inpaint": {
        "positive": "diffusion inpainting: the object is kept exactly and everything outside its mask is "
        "repainted from a prompt naming a new background (an alternative-background phrase, or the "
        "background of an image of another class).",
        "negative": "diffusion inpainting of the anchor's object (`remove`: the dilated mask repainted as "
        "background, label -1; `replace`: the object's box repainted with another class's object).",
    },
    "instruct-pix2pix": {
        "positive": "an instruction-following edit ('turn the background of {background} into {new background}'), "
        "after which the object's pixels are copied back exactly.",
    },
    "img2img": {
        "positive": "image-to-image diffusion of the anchor at several strengths (DA-Fusion), with the object's "
        "pixels copied back exactly where there is a mask.",
    },
}


def _method_section(
    settings: dict[str, Any], writer: DatasetWriter, splits: list[str], summary: dict[str, Any]
) -> list[str]:
    """How each kind of derived row was made, per generator, with the rows each generator wrote."""
    made = {k: sum(writer.counts[s].get(k, 0) for s in splits) for k in KINDS}
    gens = settings.get("generators") or {}
    lines = ["## How the counterfactuals were made", ""]
    for kind, key in (("positive", "positives"), ("negative", "negatives")):
        if not made[kind]:
            continue
        g = gens.get(key) if isinstance(gens.get(key), dict) else {}
        name = g.get("generator")
        if name is None:  # a folder written before the generators were recorded, or by another tool
            lines.append(
                f"- **{kind}s** ({_n_rows(made[kind])}): see each row's `recipe` (generator not recorded)."
            )
            continue
        how = _HOW.get(name, {}).get(kind, f"made by `{name}`; see each row's `recipe`.")
        model = f" Model: {_ref(g)}." if g.get("model") else ""
        lines.append(f"- **{kind}s** ({_n_rows(made[kind])}), `{name}`: {how}{model}")
    if isinstance(settings.get("discover"), dict):
        lines.append(
            "- **discover**: ASPIRE found the phrases a classifier relies on (`spurious_phrases`); rows with "
            "generator `discover` are edits of images with the spurious feature removed."
        )
    if made["generated"]:
        lines.append(
            f"- **generated** ({_n_rows(made['generated'])}): text-to-image with per-class personalised adapters "
            "(`scripts/personalize.py`); they have no source image (`source_id` is the row itself)."
        )
    filters = _active_filters(gens.get("filters"))
    diffusion = any(
        isinstance(gens.get(k), dict) and gens[k].get("generator") not in (None, "composite")
        for k in ("positives", "negatives")
    )
    if diffusion:
        lines.append(
            "- Every diffusion output passed the filters "
            + (", ".join(f"`{f[0]}`" for f in filters) if filters else "(none were on)")
            + "; refused outputs are in the `rejected` configuration with the reason."
        )
    if summary.get("generators"):
        lines.append(
            "- Rows per generator: "
            + ", ".join(f"`{g}` {n}" for g, n in sorted(summary["generators"].items()))
        )
    if len(lines) == 2:
        lines.append("No counterfactual rows: this folder holds originals only.")
    return lines + [""]


def _limitations_section(settings: dict[str, Any], writer: DatasetWriter, splits: list[str]) -> list[str]:
    """A short, honest list of what can be wrong with these rows."""
    gens = settings.get("generators") or {}
    names = {
        g.get("generator") for g in (gens.get("positives"), gens.get("negatives")) if isinstance(g, dict)
    }
    made = {k: sum(writer.counts[s].get(k, 0) for s in splits) for k in KINDS}
    items = []
    if "composite" in names and (made["positive"] or made["negative"]):
        items.append(
            "Composites are cut-and-paste: hard mask edges, no matching of lighting, shadows, scale or "
            "perspective, and tiled fill where an object was removed (repeated texture a model can learn to "
            "spot)."
        )
    diffusion = sorted(n for n in names if n and n != "composite")
    if diffusion:
        filters = [f[0] for f in _active_filters(gens.get("filters"))]
        items.append(
            f"Diffusion outputs ({', '.join(diffusion)}) were checked only by the filters listed "
            f"({', '.join(filters) if filters else 'none'}); kept images may still show artefacts, an "
            "altered or missing object, a leftover object or an implausible scene."
        )
    seg = (settings.get("annotation") or {}).get("segment") or {}
    mode = seg.get("mode") or seg.get("mask_source") or "given"
    if mode != "given":
        items.append(
            "Masks come from SAM (prompted by boxes) and may be wrong: missed object parts, background "
            "included, the wrong object; a bad mask carries background pixels into positives."
        )
    elif settings.get("source") != "synthetic":
        items.append("Masks are the source's own; their errors propagate into every counterfactual.")
    ext = (settings.get("annotation") or {}).get("extract") or {}
    items.append(
        "Captions and phrases come from "
        + ("an LLM" if ext.get("extractor") == "llm" else "a rule-based caption parser")
        + " and are not checked by a person."
    )
    if any(b < 0 for s in splits for _, b in writer.groups[s]):
        items.append(
            "Originals with `bg_label` -1 have no known background class (CLAD's negative dictionary then "
            "keys them by their label)."
        )
    if settings.get("source") == "synthetic":
        items.append("The synthetic benchmark is a toy: shapes on textures, not natural images.")
    items.append(
        "Counterfactual labels are inherited from the source object; no row was verified by a person."
    )
    return ["## Known limitations", ""] + [f"- {t}" for t in items] + [""]


# ----------------------------------------------------------------------------------------------
# Preview sheet
# ----------------------------------------------------------------------------------------------


class _PreviewCollector:
    """Keeps one original per class (up to ``max_rows``) and the rows derived from it."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.rows: dict[str, dict[str, Any]] = {}
        self._labels: set[int] = set()

    def wants(self, record: dict[str, Any]) -> bool:
        """Whether :meth:`offer` would keep this (encoded) row."""
        if record["kind"] == "original":
            return len(self.rows) < self.max_rows and record["label"] not in self._labels
        return record["source_id"] in self.rows and record["kind"] in ("positive", "negative")

    def offer(self, row: Row) -> None:
        if row.kind == "original":
            if len(self.rows) < self.max_rows and row.label not in self._labels:
                self.rows[row.id] = {"original": row, "positive": [], "negative": []}
                self._labels.add(row.label)
        elif row.source_id in self.rows and row.kind in ("positive", "negative"):
            self.rows[row.source_id][row.kind].append(row)

    def render(self, class_names: Sequence[str], cell: int = 96) -> Image.Image | None:
        entries = [e for e in self.rows.values() if e["positive"] or e["negative"]]
        if not entries:
            return None
        n_pos = max(len(e["positive"]) for e in entries)
        n_neg = max(len(e["negative"]) for e in entries)
        headers = (
            ["original", "mask"]
            + [f"positive {i + 1}" for i in range(n_pos)]
            + [f"negative {i + 1}" for i in range(n_neg)]
        )
        label_h, header_h = 14, 16
        sheet = Image.new("RGB", (cell * len(headers), header_h + len(entries) * (cell + label_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for c, h in enumerate(headers):
            draw.text((c * cell + 4, 2), h, fill="black")

        def name(label: int) -> str:
            return class_names[label] if 0 <= label < len(class_names) else "none"

        for r, e in enumerate(entries):
            y = header_h + r * (cell + label_h)
            orig: Row = e["original"]
            cells: list[tuple[Image.Image, str]] = [
                (orig.image, name(orig.label)),
                (
                    orig.mask.convert("RGB")
                    if orig.mask is not None
                    else Image.new("RGB", orig.image.size, "grey"),
                    "mask",
                ),
            ]
            cells += [(p.image, f"bg: {name(p.bg_label)}") for p in e["positive"]]
            cells += [
                (Image.new("RGB", orig.image.size, "white"), "") for _ in range(n_pos - len(e["positive"]))
            ]
            cells += [(q.image, name(q.label)) for q in e["negative"]]
            for c, (img, text) in enumerate(cells):
                sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, y))
                draw.text((c * cell + 3, y + cell), text, fill="black")
        return sheet


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def _check_folder(path: Path) -> None:
    if not (path / "README.md").is_file() or not (path / "data").is_dir():
        raise FileNotFoundError(
            f"{path} is not a dataset folder written by scripts/generate.py (no README.md and data/ inside)"
        )


def folder_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a dataset folder's card and data files (name, size, modification time).

    ``datasets`` keys its cache of a local folder on the card's metadata, not on the files, so a folder
    regenerated in place with the same row counts and byte sizes would load the old rows from the
    cache. Keying the cache on this fingerprint instead makes every rewrite a new cache entry.
    """
    import hashlib

    path = Path(path)
    h = hashlib.sha256((path / "README.md").read_bytes())
    for f in sorted((path / "data").glob("*.parquet")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def load_counterfactual_dataset(path: str | os.PathLike):
    """``datasets.load_dataset`` on a folder written by :class:`DatasetWriter`, with a clear error,
    cached under the folder's :func:`folder_fingerprint` (never stale after a rewrite)."""
    from datasets import config, load_dataset

    path = Path(path)
    _check_folder(path)
    cache_dir = Path(config.HF_DATASETS_CACHE) / "counterfactual" / folder_fingerprint(path)
    return load_dataset(str(path), cache_dir=str(cache_dir))


def load_rejected(path: str | os.PathLike):
    """The ``rejected`` tables of a dataset folder as a ``DatasetDict``, empty splits included.

    ``load_dataset(path, "rejected")`` gives the same rows whenever at least one input was rejected;
    this function also works when none was (``datasets`` refuses to load a split with no rows).
    """
    from datasets import Dataset, DatasetDict

    path = Path(path)
    _check_folder(path)
    features = rejected_features()
    out = {}
    files = sorted(
        (path / "rejected").glob("*.parquet"), key=lambda f: (_split_rank(f.name.split("-")[0]), f.name)
    )
    for f in files:
        split = f.name.split("-")[0]
        table = pq.read_table(f).to_pydict()
        out[split] = Dataset.from_dict({k: table.get(k, []) for k in features}, features=features)
    return DatasetDict(out)
