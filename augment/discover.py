"""Spurious-feature discovery (ASPIRE steps 3 and 4): which phrases does a trained classifier rely on?

``python scripts/discover.py --dataset DIR --classifier DIR --output DIR`` reads a dataset folder
written by ``scripts/generate.py --mask-source grounded`` (it needs the ``phrase_masks``
configuration: one mask per foreground phrase of each original) and an ERM classifier trained on it
(``scripts/train.py --method erm``), then:

1. **measure** (step 3): the classifier labels every original of the split (``train``); for each
   image it gets right,

   * every foreground phrase with a mask is removed from the image (``remover.remove``: the
     composite tile fill offline, a diffusion inpainting model with ``--inpaint-model``; the prompt
     is the image's background phrase), and the image is classified again: a changed prediction is
     a *flip* against that phrase;
   * with ``--edit-model``, the background is swapped (``editor.swap_background``: background
     phrases -> an alternative background phrase, object pixels kept), and a flip counts against
     each background phrase of the image. Without an editor background swaps are skipped (the
     report says so).

2. **group and score** (step 4), per class: phrases are normalised (lower case, articles dropped,
   plurals made singular by rule) and grouped greedily, most frequent first, with every phrase
   joining the group whose first phrase is most similar to it when that similarity is at least
   ``--similarity-threshold`` (0.7): word-overlap (Jaccard) similarity, or with
   ``--similarity-model`` the cosine of mean-pooled sentence-encoder embeddings. A group's score is
   flips / occurrences; it is *spurious* for the class when the score is at least
   ``--flip-threshold`` over at least ``--min-count`` edits.

3. **write** a new dataset folder: every input row (ids kept) with ``spurious_phrases`` set to the
   phrases of its class's spurious groups; the phrase masks and the ``rejected`` table carried over;
   and up to ``--keep-per-class`` *spurious-free* edits per class as ``kind=positive`` rows: originals
   with all their spurious objects removed (and a spurious background swapped, with an editor) that
   the classifier still gets right. Next to the data: ``discovery.json``, ``discovery.md`` and
   ``discovery.png`` (the top groups' scores per class).

Every edit is seeded from ``(--seed, row id, operation)``, so the output does not depend on batching.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import __version__, trust
from .imageops import mask_image, to_array, to_mask
from .seeding import item_rng, item_seed

__all__ = [
    "CompositeRemover",
    "DiscoverConfig",
    "PhraseEncoder",
    "PhraseGroup",
    "group_phrases",
    "jaccard",
    "names_class",
    "normalize_phrase",
    "run",
    "score_groups",
    "singularize",
]

OPERATIONS = ("remove_object", "swap_background")

# ----------------------------------------------------------------------------------------------
# Phrase normalisation and grouping
# ----------------------------------------------------------------------------------------------

ARTICLES = frozenset({"a", "an", "the"})
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "leaves": "leaf",
    "knives": "knife",
    "wives": "wife",
    "lives": "life",
    "wolves": "wolf",
    "shelves": "shelf",
    "loaves": "loaf",
    "halves": "half",
    "calves": "calf",
    "scarves": "scarf",
    "potatoes": "potato",
    "tomatoes": "tomato",
    "heroes": "hero",
    "echoes": "echo",
    "volcanoes": "volcano",
    "mangoes": "mango",
    "cacti": "cactus",
    "fungi": "fungus",
}
_NO_STRIP = ("ss", "us", "is", "ous")


def singularize(word: str) -> str:
    """A rule-based singular (no dictionary download): ``patches`` -> ``patch``, ``trees`` -> ``tree``,
    ``puppies`` -> ``puppy``, ``leaves`` -> ``leaf``; ``grass``, ``bus``, ``glass`` stay.

    It is a matching key, not linguistics: ``cookie`` and ``cookies`` both give ``cooky``.
    """
    w = word.lower()
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) > 3 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 2 and w.endswith("ie"):
        return w[:-2] + "y"
    if len(w) > 4 and w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(_NO_STRIP):
        return w[:-1]
    return w


def normalize_phrase(phrase: str) -> tuple[str, ...]:
    """The phrase's words: lower case, punctuation and articles dropped, each word singular."""
    words = re.findall(r"[a-z0-9]+", phrase.lower())
    return tuple(singularize(w) for w in words if w not in ARTICLES and w != "s")


def names_class(phrase: str, class_name: str) -> bool:
    """Whether ``phrase`` is just the class's name (``"the dogs"`` for ``00_dog``): the labelled object
    itself is never tested as a spurious feature."""
    key = tuple(w for w in normalize_phrase(class_name.replace("_", " ")) if not w.isdigit())
    return bool(key) and normalize_phrase(phrase) == key


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """Word-overlap similarity |A & B| / |A | B| of two word lists (1.0 for two empty ones)."""
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


class PhraseEncoder:
    """A transformers sentence encoder: mean of the last hidden states over the tokens (attention
    mask), L2-normalised. Any ``AutoModel`` with a tokenizer works (e.g.
    ``sentence-transformers/all-MiniLM-L6-v2``)."""

    def __init__(self, model, tokenizer, device: str = "cpu", ref: dict | None = None, batch_size: int = 64):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.ref = ref or {}
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, model_id: str, device: str | None = None, revision: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        from .runtime import check_model_ref, resolve_device

        model_id = check_model_ref(model_id, "similarity model")
        device = resolve_device(device)
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, **trust.code_kwargs())
        model = AutoModel.from_pretrained(model_id, revision=revision, **trust.model_kwargs())
        ref = {"model": model_id, "revision": revision or getattr(model.config, "_commit_hash", None)}
        return cls(model, tokenizer, device, ref)

    def describe(self) -> dict[str, Any]:
        return {**self.ref, "pooling": "mean over tokens", "similarity": "cosine"}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit-norm embeddings."""
        import torch

        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[s : s + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state.float()
            weights = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def group_phrases(
    phrases: Sequence[str], threshold: float = 0.7, encoder: PhraseEncoder | None = None
) -> list[list[str]]:
    """Greedy grouping in the given order (pass the most frequent first): each phrase joins the group
    whose first phrase is most similar to it if that similarity is >= ``threshold``, else starts a new
    group. Similarity: Jaccard of :func:`normalize_phrase` words, or the encoder's cosine of the
    normalised phrases. Phrases with the same normalised words always share a group."""
    phrases = list(dict.fromkeys(phrases))
    keys = [normalize_phrase(p) for p in phrases]
    emb = None
    if encoder is not None and phrases:
        emb = encoder.encode([" ".join(k) or p.lower() for k, p in zip(keys, phrases)])
    groups: list[list[int]] = []
    for i in range(len(phrases)):
        best, best_sim = -1, -np.inf
        for g, members in enumerate(groups):
            head = members[0]
            if keys[head] == keys[i]:
                sim = 1.0
            elif emb is not None:
                sim = float(emb[head] @ emb[i])
            else:
                sim = jaccard(keys[head], keys[i])
            if sim > best_sim:
                best, best_sim = g, sim
        if best >= 0 and best_sim >= threshold:
            groups[best].append(i)
        else:
            groups.append([i])
    return [[phrases[i] for i in members] for members in groups]


@dataclass
class PhraseGroup:
    """One group of similar phrases of one class and what editing them did to the classifier."""

    name: str
    phrases: dict[str, int]  # phrase -> occurrences
    occurrences: int
    flips: int
    score: float
    spurious: bool
    operations: dict[str, int] = field(default_factory=dict)  # operation -> edits
    flipped_examples: list[str] = field(default_factory=list)


def score_groups(
    occurrences: Counter,
    flips: Counter,
    flip_threshold: float = 0.5,
    min_count: int = 2,
    similarity_threshold: float = 0.7,
    encoder: PhraseEncoder | None = None,
    operations: dict[str, Counter] | None = None,
    flipped_examples: dict[str, list[str]] | None = None,
) -> list[PhraseGroup]:
    """Group one class's phrases (:func:`group_phrases`, most frequent first) and score each group:
    flips / occurrences, spurious when >= ``flip_threshold`` with at least ``min_count`` occurrences.
    Spurious groups first, then by score and occurrences (highest first)."""
    order = sorted(occurrences, key=lambda p: (-occurrences[p], p))
    out = []
    for members in group_phrases(order, similarity_threshold, encoder):
        occ = sum(occurrences[p] for p in members)
        fl = sum(flips.get(p, 0) for p in members)
        ops: Counter = Counter()
        examples: list[str] = []
        for p in members:
            ops.update((operations or {}).get(p, {}))
            examples += (flipped_examples or {}).get(p, [])
        score = fl / occ if occ else 0.0
        out.append(
            PhraseGroup(
                name=members[0],
                phrases={p: int(occurrences[p]) for p in members},
                occurrences=int(occ),
                flips=int(fl),
                score=float(score),
                spurious=bool(occ >= min_count and score >= flip_threshold),
                operations=dict(ops),
                flipped_examples=examples[:5],
            )
        )
    out.sort(key=lambda g: (not g.spurious, -g.score, -g.occurrences, g.name))
    return out


# ----------------------------------------------------------------------------------------------
# Editors
# ----------------------------------------------------------------------------------------------


class CompositeRemover:
    """The offline remover: the object's bounding box (grown by ``fill_pad``) is filled with tiles of
    the image's largest box-free strip (:class:`~augment.synthesize.composite.CompositeGenerator`,
    the Background Challenge's ``only_bg_t``). Same interface as ``InpaintGenerator.remove``; prompts
    and seeds are ignored (the fill is deterministic)."""

    name = "composite"

    def __init__(self, fill_pad: int = 1):
        from .synthesize.composite import CompositeGenerator

        self.generator = CompositeGenerator(fill_pad=fill_pad)

    def describe(self) -> dict[str, Any]:
        return {"remover": self.name, "fill": "tile", "fill_pad": self.generator.fill_pad}

    def remove(self, images, masks, prompts=None, seeds=None):
        if len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        return self.generator(background_image=list(images), background_mask=list(masks))


def build_remover(config: DiscoverConfig):
    """The composite remover, or ``InpaintGenerator.from_pretrained(--inpaint-model)``."""
    if not config.inpaint_model:
        return CompositeRemover()
    try:
        from .synthesize.inpaint import InpaintGenerator
    except ImportError as e:
        raise ImportError(f"--inpaint-model needs augment.synthesize.inpaint ({e})") from e
    return InpaintGenerator.from_pretrained(config.inpaint_model, device=config.device, dtype=config.dtype)


def build_editor(config: DiscoverConfig):
    """None (no background swaps), or ``InstructEditGenerator.from_pretrained(--edit-model)``."""
    if not config.edit_model:
        return None
    try:
        from .synthesize.edit import InstructEditGenerator
    except ImportError as e:
        raise ImportError(f"--edit-model needs augment.synthesize.edit ({e})") from e
    return InstructEditGenerator.from_pretrained(config.edit_model, device=config.device, dtype=config.dtype)


def _describe(obj) -> dict[str, Any] | None:
    if obj is None:
        return None
    return obj.describe() if hasattr(obj, "describe") else {"class": type(obj).__name__}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class DiscoverConfig:
    """Settings of one discovery run (the flags of ``scripts/discover.py``)."""

    dataset: str
    classifier: str
    output: str
    inpaint_model: str | None = None
    edit_model: str | None = None
    flip_threshold: float = 0.5
    min_count: int = 2
    similarity_model: str | None = None
    similarity_threshold: float = 0.7
    keep_per_class: int = 35
    seed: int = 0
    batch_size: int = 16
    split: str = "train"
    limit: int | None = None
    top_groups: int = 10
    device: str | None = None
    dtype: str | None = None
    overwrite: bool = False
    progress: bool = True
    # loading policy (augment/trust.py): both off unless the flags say otherwise
    trust_remote_code: bool = False
    allow_bin_weights: bool = False

    def validate(self) -> None:
        if not 0 <= self.flip_threshold <= 1:
            raise ValueError(f"--flip-threshold must be in [0, 1], got {self.flip_threshold}")
        if self.min_count < 1:
            raise ValueError(f"--min-count must be >= 1, got {self.min_count}")
        if self.keep_per_class < 0:
            raise ValueError(f"--keep-per-class must be >= 0, got {self.keep_per_class}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.top_groups < 1:
            raise ValueError(f"--top-groups must be >= 1, got {self.top_groups}")
        src, out = Path(self.dataset).resolve(), Path(self.output).resolve()
        if src == out:
            raise ValueError("--output must be a new folder, not the --dataset folder")
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; choose another --output or pass --overwrite"
            )


# ----------------------------------------------------------------------------------------------
# Reading the dataset
# ----------------------------------------------------------------------------------------------


def load_phrase_masks(path: str | os.PathLike):
    """The ``phrase_masks`` configuration of a dataset folder (a ``DatasetDict``), with a clear error
    when the folder has none."""
    from datasets import config, load_dataset

    from .dataset import _check_folder, folder_fingerprint

    path = Path(path)
    _check_folder(path)
    if not any((path / "phrase_masks").glob("*.parquet")):
        raise ValueError(
            f"{path} has no phrase_masks configuration (a mask per foreground phrase): discovery needs "
            "one; make the dataset with scripts/generate.py --mask-source grounded --detector ID --sam ID "
            "and an --llm that extracts the foreground phrases"
        )
    cache_dir = (
        Path(config.HF_DATASETS_CACHE) / "counterfactual" / (folder_fingerprint(path) + "-phrase-masks")
    )
    return load_dataset(str(path), "phrase_masks", cache_dir=str(cache_dir))


def _undecoded(ds, columns: Sequence[str]):
    from datasets import Image as ImageFeature

    for c in columns:
        ds = ds.cast_column(c, ImageFeature(decode=False))
    return ds


def _decode(entry, mode: str = "RGB") -> Image.Image | None:
    from debias.data import decode

    return decode(entry, mode)


@dataclass
class _Candidate:
    """A correctly classified original: where it is and what can be edited in it."""

    index: int
    id: str
    label: int
    bg_label: int
    prob: float
    phrases: dict[str, list[int]]  # phrase -> rows of the phrase_masks split
    bg: list[str]
    alt: list[str]


@dataclass
class _ClassStats:
    originals: int = 0
    correct: int = 0
    edits: Counter = field(default_factory=Counter)  # operation -> edits
    occurrences: Counter = field(default_factory=Counter)
    flips: Counter = field(default_factory=Counter)
    operations: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    flipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def record(self, phrase: str, operation: str, flipped: bool, row_id: str) -> None:
        self.edits[operation] += 1
        self.occurrences[phrase] += 1
        self.operations[phrase][operation] += 1
        if flipped:
            self.flips[phrase] += 1
            if len(self.flipped[phrase]) < 5:
                self.flipped[phrase].append(row_id)


def _fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.BICUBIC)


def _load_mask(pm_raw, rows: list[int], size: tuple[int, int]) -> np.ndarray:
    """The union of the phrase masks at ``rows``, at the image's ``size`` (W, H)."""
    out = np.zeros((size[1], size[0]), dtype=bool)
    for r in rows:
        m = _decode(pm_raw[r]["mask"], "L")
        if m is None:
            continue
        if m.size != size:
            m = m.resize(size, Image.NEAREST)
        out |= to_mask(m)
    return out


def _batches(items: Sequence, size: int):
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _swap_inputs(cand: _Candidate, seed: int) -> tuple[str, str]:
    """The background description and the alternative background of one original."""
    alt = cand.alt[int(item_rng(seed, f"{cand.id}/alt").integers(len(cand.alt)))]
    return " and ".join(cand.bg), alt


def _check_output(out, n: int, what: str) -> None:
    if len(out.images) != n:
        raise RuntimeError(f"the {what} returned {len(out.images)} images for {n} inputs")


# ----------------------------------------------------------------------------------------------
# Step 3: measure
# ----------------------------------------------------------------------------------------------


def measure(
    config: DiscoverConfig, data, phrase_masks, probe, remover, editor, class_names: Sequence[str]
) -> tuple[dict[int, _ClassStats], list[_Candidate], Counter]:
    """Classify the originals; edit the correctly classified ones; count flips per phrase and class."""
    raw = _undecoded(data, ["image", "mask"])
    originals = [i for i, k in enumerate(data["kind"]) if k == "original"]
    if config.limit:
        originals = originals[: config.limit]
    if not originals:
        raise ValueError(f"split {config.split!r} of {config.dataset} has no original rows")
    by_id: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    pm_raw = None
    if phrase_masks is not None:
        pm_raw = _undecoded(phrase_masks, ["mask"])
        for r, (pid, phrase) in enumerate(zip(phrase_masks["id"], phrase_masks["phrase"])):
            by_id[pid][phrase].append(r)
    stats: dict[int, _ClassStats] = defaultdict(_ClassStats)
    candidates: list[_Candidate] = []
    skipped: Counter = Counter()
    bar = tqdm(
        total=len(originals), desc="discover: edit and classify", unit="img", disable=not config.progress
    )
    for chunk in _batches(originals, config.batch_size):
        batch = raw[list(chunk)]
        images = [_decode(e) for e in batch["image"]]
        probs = probe.probabilities(images)
        preds = probs.argmax(1)
        removals: list[tuple[int, str, np.ndarray]] = []  # (position in chunk, phrase, mask)
        swaps: list[int] = []
        chunk_cands: dict[int, _Candidate] = {}
        for k, idx in enumerate(chunk):
            y = int(batch["label"][k])
            if y < 0:
                continue
            st = stats[y]
            st.originals += 1
            if int(preds[k]) != y:
                continue
            st.correct += 1
            rid = batch["id"][k]
            phrases = {p: rows for p, rows in by_id.get(rid, {}).items()}
            cand = _Candidate(
                index=idx,
                id=rid,
                label=y,
                bg_label=int(batch["bg_label"][k]),
                prob=float(probs[k, y]),
                phrases={},
                bg=[p for p in dict.fromkeys(batch["bg_phrases"][k] or []) if p.strip()],
                alt=[p for p in dict.fromkeys(batch["alt_phrases"][k] or []) if p.strip()],
            )
            for phrase, rows in phrases.items():
                if names_class(phrase, class_names[y]):
                    skipped["phrase names the labelled object"] += 1
                    continue
                mask = _load_mask(pm_raw, rows, images[k].size)
                if not mask.any():
                    skipped["phrase mask empty"] += 1
                    continue
                cand.phrases[phrase] = rows
                removals.append((k, phrase, mask))
            if cand.bg and cand.alt:
                if editor is not None:
                    swaps.append(k)
                else:
                    skipped["background swap: no --edit-model"] += 1
            elif editor is not None:
                skipped["background swap: no background or alternative phrase"] += 1
            candidates.append(cand)
            chunk_cands[k] = cand
        for group in _batches(removals, config.batch_size):
            prompts = [chunk_cands[k].bg[0] if chunk_cands[k].bg else "background" for k, _, _ in group]
            seeds = [item_seed(config.seed, f"{chunk_cands[k].id}/remove/{p}") for k, p, _ in group]
            out = remover.remove(
                [images[k] for k, _, _ in group], [mask_image(m) for _, _, m in group], prompts, seeds
            )
            _check_output(out, len(group), "remover")
            edited = [_fit(im, images[k].size) for im, (k, _, _) in zip(out.images, group)]
            after = probe.probabilities(edited).argmax(1)
            for (k, phrase, _), p in zip(group, after):
                cand = chunk_cands[k]
                stats[cand.label].record(phrase, "remove_object", int(p) != cand.label, cand.id)
        for group in _batches(swaps, config.batch_size):
            cands = [chunk_cands[k] for k in group]
            bgs, alts = zip(*(_swap_inputs(c, config.seed) for c in cands))
            seeds = [item_seed(config.seed, f"{c.id}/swap") for c in cands]
            masks = [_decode(batch["mask"][k], "L") for k in group]
            out = editor.swap_background([images[k] for k in group], masks, list(bgs), list(alts), seeds)
            _check_output(out, len(group), "editor")
            edited = [_fit(im, images[k].size) for im, k in zip(out.images, group)]
            after = probe.probabilities(edited).argmax(1)
            for cand, p in zip(cands, after):
                for phrase in cand.bg:
                    stats[cand.label].record(phrase, "swap_background", int(p) != cand.label, cand.id)
        bar.update(len(chunk))
    bar.close()
    return dict(stats), candidates, skipped


# ----------------------------------------------------------------------------------------------
# Spurious-free positives
# ----------------------------------------------------------------------------------------------


def _changed(before: np.ndarray, after: np.ndarray, tol: int = 2) -> np.ndarray:
    return (np.abs(before.astype(np.int16) - after.astype(np.int16)) > tol).any(-1)


def spurious_free_positives(
    config: DiscoverConfig,
    data,
    phrase_masks,
    probe,
    remover,
    editor,
    candidates: list[_Candidate],
    spurious: dict[int, set[str]],
    class_names: list[str],
    spurious_lists: dict[int, list[str]],
):
    """Yield ``Row`` s: per class, correctly classified originals with every spurious object removed
    (one removal of the union of their masks) and, with an editor, a spurious background swapped,
    that the classifier still gets right; up to ``keep_per_class`` per class, originals taken in an
    order fixed by the seed."""
    from .dataset import Row

    if config.keep_per_class == 0:
        return
    raw = _undecoded(data, ["image", "mask"])
    pm_raw = _undecoded(phrase_masks, ["mask"]) if phrase_masks is not None else None
    existing = set(data["id"])
    remover_ref, editor_ref = _describe(remover), _describe(editor)
    by_class: dict[int, list[_Candidate]] = defaultdict(list)
    for c in candidates:
        spur = spurious.get(c.label, set())
        if not spur:
            continue
        objs = [p for p in c.phrases if p in spur]
        bgs = [p for p in c.bg if p in spur] if editor is not None and c.alt else []
        if objs or bgs:
            by_class[c.label].append(c)
    total = sum(len(v) for v in by_class.values())
    bar = tqdm(total=total, desc="discover: spurious-free positives", unit="img", disable=not config.progress)
    for y in sorted(by_class):
        cands = sorted(by_class[y], key=lambda c: item_seed(config.seed, c.id))
        kept = done = 0
        for group in _batches(cands, config.batch_size):
            if kept >= config.keep_per_class:
                break
            done += len(group)
            batch = raw[[c.index for c in group]]
            originals = [_decode(e) for e in batch["image"]]
            obj_masks = [_decode(e, "L") for e in batch["mask"]]
            images = list(originals)
            steps: list[list[dict[str, Any]]] = [[] for _ in group]
            removed: list[list[str]] = [[] for _ in group]
            todo = [k for k, c in enumerate(group) if any(p in spurious[y] for p in c.phrases)]
            if todo:
                masks, prompts, seeds = [], [], []
                for k in todo:
                    c = group[k]
                    removed[k] = [p for p in c.phrases if p in spurious[y]]
                    rows = [r for p in removed[k] for r in c.phrases[p]]
                    masks.append(mask_image(_load_mask(pm_raw, rows, images[k].size)))
                    prompts.append(c.bg[0] if c.bg else "background")
                    key = (
                        f"{c.id}/remove/{removed[k][0]}"
                        if len(removed[k]) == 1
                        else f"{c.id}/remove-spurious"
                    )
                    seeds.append(item_seed(config.seed, key))
                out = remover.remove([images[k] for k in todo], masks, prompts, seeds)
                _check_output(out, len(todo), "remover")
                for j, k in enumerate(todo):
                    images[k] = _fit(out.images[j], originals[k].size)
                    recipe = out.recipes[j] if j < len(out.recipes) else {}
                    steps[k].append(
                        {
                            "operation": "remove_object",
                            "phrases": removed[k],
                            "prompt": prompts[j],
                            "seed": seeds[j],
                            "remover": remover_ref,
                            "output": recipe,
                        }
                    )
            swap = [
                k
                for k, c in enumerate(group)
                if editor is not None and c.alt and any(p in spurious[y] for p in c.bg)
            ]
            if swap:
                bgs, alts = zip(*(_swap_inputs(group[k], config.seed) for k in swap))
                seeds = [item_seed(config.seed, f"{group[k].id}/swap") for k in swap]
                out = editor.swap_background(
                    [images[k] for k in swap], [obj_masks[k] for k in swap], list(bgs), list(alts), seeds
                )
                _check_output(out, len(swap), "editor")
                for j, k in enumerate(swap):
                    images[k] = _fit(out.images[j], originals[k].size)
                    steps[k].append(
                        {
                            "operation": "swap_background",
                            "background": bgs[j],
                            "alt": alts[j],
                            "phrases": [p for p in group[k].bg if p in spurious[y]],
                            "seed": seeds[j],
                            "editor": editor_ref,
                            "output": out.recipes[j] if j < len(out.recipes) else {},
                        }
                    )
            probs = probe.probabilities(images)
            for k, c in enumerate(group):
                if kept >= config.keep_per_class:
                    break
                pred = int(probs[k].argmax())
                if pred != y or not steps[k]:
                    continue
                changed = _changed(to_array(originals[k]), to_array(images[k]))
                mask = None
                if obj_masks[k] is not None:
                    mask = mask_image(to_mask(obj_masks[k], changed.shape) & ~changed)
                n = 0
                while f"{c.id}/positive/{n}" in existing:
                    n += 1
                row_id = f"{c.id}/positive/{n}"
                existing.add(row_id)
                ops = [s["operation"] for s in steps[k]]
                swapped = "swap_background" in ops
                phrases = [p for s in steps[k] for p in s["phrases"]]
                name = class_names[y]
                alt = steps[k][-1]["alt"] if swapped else None
                recipe = {
                    "generator": "discover",
                    "operation": "+".join(ops),
                    "phrase": "; ".join(phrases),
                    "phrases": phrases,
                    "steps": steps[k],
                    "remover": remover_ref if "remove_object" in ops else None,
                    "editor": editor_ref if swapped else None,
                    "classifier": config.classifier,
                    "seed": config.seed,
                    "label": name,
                    "prediction_before": name,
                    "prediction_after": class_names[pred],
                    "prob_before": round(c.prob, 4),
                    "prob_after": round(float(probs[k, y]), 4),
                    "package_version": __version__,
                }
                src_fg = list(batch["fg_phrases"][k] or [])
                yield Row(
                    id=row_id,
                    image=images[k],
                    mask=mask,
                    label=y,
                    bg_label=-1 if swapped else c.bg_label,
                    kind="positive",
                    source_id=c.id,
                    caption=f"a photo of a {name}" + (f", {alt}" if alt else ""),
                    fg_phrases=[p for p in src_fg if p not in phrases],
                    bg_phrases=[alt] if alt else list(c.bg),
                    alt_phrases=[p for p in c.alt if p != alt],
                    spurious_phrases=list(spurious_lists.get(y, [])),
                    recipe=recipe,
                )
                kept += 1
            bar.update(len(group))
            bar.set_postfix(kept=kept, refresh=False)
        bar.update(len(cands) - done)  # the rest of the class is not needed
    bar.close()


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


_OP_NAMES = {"remove_object": "removed", "swap_background": "background swapped"}


def discovery_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Spurious-feature discovery",
        "",
        f"Classifier `{s['classifier']}` on the `{s['split']}` originals of `{s['dataset']}`. A phrase group is "
        f"spurious when removing it (or swapping it, for backgrounds) flips at least "
        f"{s['flip_threshold']:.0%} of the correctly classified images over at least {s['min_count']} edits.",
        "",
        f"- remover: `{json.dumps(report['remover'], sort_keys=True)}`",
        f"- background swaps: {report['background_swaps']}",
        f"- grouping: {report['grouping']['method']} similarity >= {report['grouping']['threshold']}",
        f"- spurious-free positives written: {report['positives']}",
        "",
    ]
    if report["skipped"]:
        lines += [
            "Skipped edits: " + ", ".join(f"{k} ({v})" for k, v in sorted(report["skipped"].items())),
            "",
        ]
    for name, c in report["classes"].items():
        lines += [
            f"## {name}",
            "",
            f"{c['correct']} of {c['originals']} originals classified correctly; "
            f"edits: {', '.join(f'{k} {v}' for k, v in sorted(c['edits'].items())) or 'none'}; "
            f"positives kept: {c['positives']}.",
            "",
        ]
        if not c["groups"]:
            lines += ["No phrase could be edited.", ""]
            continue
        lines += [
            "| group | phrases | edits | occurrences | flips | score | spurious |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for g in c["groups"]:
            phrases = ", ".join(f"{p} ({n})" for p, n in g["phrases"].items())
            ops = ", ".join(f"{_OP_NAMES.get(k, k)} {v}" for k, v in sorted(g["operations"].items()))
            lines.append(
                f"| {g['name']} | {phrases} | {ops} | {g['occurrences']} | {g['flips']} | {g['score']:.2f} | "
                f"{'**yes**' if g['spurious'] else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_discovery(report: dict[str, Any], path: str | os.PathLike, top: int = 10) -> None:
    """Horizontal bars of the top groups' scores per class (red: spurious), threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [(n, c) for n, c in report["classes"].items() if c["groups"]] or list(
        report["classes"].items()
    )[:1]
    heights = [max(1, min(top, len(c["groups"]))) for _, c in classes]
    fig, axes = plt.subplots(
        len(classes),
        1,
        figsize=(7, 0.9 + sum(0.32 * h + 0.6 for h in heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    threshold = report["settings"]["flip_threshold"]
    for ax, (name, c) in zip(axes[:, 0], classes):
        groups = c["groups"][:top]
        if not groups:
            ax.text(0.5, 0.5, "no phrase edited", ha="center", va="center")
            ax.set_axis_off()
            ax.set_title(name, fontsize=9, loc="left")
            continue
        labels = [f"{g['name']} ({g['flips']}/{g['occurrences']})" for g in groups][::-1]
        scores = [g["score"] for g in groups][::-1]
        colours = ["#c0392b" if g["spurious"] else "#9e9e9e" for g in groups][::-1]
        ax.barh(range(len(groups)), scores, color=colours)
        ax.set_yticks(range(len(groups)), labels, fontsize=8)
        ax.axvline(threshold, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1.02)
        ax.set_title(f"{name}: flip rate per phrase group (red: spurious)", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("flips / occurrences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def run(config: DiscoverConfig, remover=None, editor=None, encoder=None, probe=None) -> dict[str, Any]:
    """Discover spurious phrases and write the new dataset folder and reports; returns the report.

    ``remover``, ``editor``, ``encoder`` and ``probe`` (a :class:`~augment.filters.ClassifierProbe`)
    replace the ones the config names when given.
    """
    trust.configure(config.trust_remote_code, config.allow_bin_weights)
    from .dataset import DatasetWriter, Row, load_counterfactual_dataset, load_rejected
    from .filters import ClassifierProbe

    config.validate()
    start = time.time()
    ds = load_counterfactual_dataset(config.dataset)
    if config.split not in ds:
        raise ValueError(f"{config.dataset} has no {config.split!r} split (it has {list(ds)})")
    phrase_masks = load_phrase_masks(config.dataset)
    class_names = list(ds[config.split].features["label"].names)
    if probe is None:
        probe = ClassifierProbe.load(
            config.classifier, device=config.device, batch_size=max(config.batch_size, 64)
        )
    n_out = int(getattr(probe.model.config, "num_labels", len(class_names)))
    if n_out != len(class_names):
        raise ValueError(
            f"classifier {config.classifier} has {n_out} classes, the dataset {len(class_names)}: "
            "use the ERM classifier trained on this dataset"
        )
    remover = remover if remover is not None else build_remover(config)
    editor = editor if editor is not None else build_editor(config)
    if encoder is None and config.similarity_model:
        encoder = PhraseEncoder.from_pretrained(config.similarity_model, device=config.device)
    data = ds[config.split]
    pm_split = phrase_masks[config.split] if config.split in phrase_masks else None
    if pm_split is None:
        print(
            f"discover: warning: no phrase masks for split {config.split!r}; only backgrounds can be edited",
            file=sys.stderr,
        )

    stats, candidates, skipped = measure(config, data, pm_split, probe, remover, editor, class_names)

    classes: dict[str, Any] = {}
    spurious: dict[int, set[str]] = {}
    spurious_lists: dict[int, list[str]] = {}
    for y, name in enumerate(class_names):
        st = stats.get(y, _ClassStats())
        groups = score_groups(
            st.occurrences,
            st.flips,
            config.flip_threshold,
            config.min_count,
            config.similarity_threshold,
            encoder,
            st.operations,
            st.flipped,
        )
        phrases = [p for g in groups if g.spurious for p in g.phrases]
        spurious[y] = set(phrases)
        spurious_lists[y] = phrases
        classes[name] = {
            "label": y,
            "originals": st.originals,
            "correct": st.correct,
            "edits": dict(st.edits),
            "flips": int(sum(st.flips.values())),
            "groups": [asdict(g) for g in groups],
            "spurious_phrases": phrases,
            "positives": 0,
        }

    writer = DatasetWriter(config.output, class_names, overwrite=config.overwrite)
    counts = Counter()
    for split in ds:
        d = ds[split]
        raw = _undecoded(d, ["image", "mask"])
        for chunk in tqdm(
            list(_batches(range(len(d)), 256)), desc=f"discover: copy {split}", disable=not config.progress
        ):
            batch = raw[list(chunk)]
            for k in range(len(chunk)):
                y = int(batch["label"][k])
                recipe = batch["recipe"][k]
                writer.add(
                    split,
                    Row(
                        id=batch["id"][k],
                        image=_decode(batch["image"][k]),
                        mask=_decode(batch["mask"][k], "L"),
                        label=y,
                        bg_label=int(batch["bg_label"][k]),
                        kind=batch["kind"][k],
                        source_id=batch["source_id"][k],
                        caption=batch["caption"][k] or "",
                        fg_phrases=list(batch["fg_phrases"][k] or []),
                        bg_phrases=list(batch["bg_phrases"][k] or []),
                        alt_phrases=list(batch["alt_phrases"][k] or []),
                        spurious_phrases=(
                            list(spurious_lists.get(y, []))
                            if y >= 0
                            else list(batch["spurious_phrases"][k] or [])
                        ),
                        recipe=json.loads(recipe) if recipe else {},
                    ),
                )
                counts[split] += 1
    positives = 0
    for row in spurious_free_positives(
        config, data, pm_split, probe, remover, editor, candidates, spurious, class_names, spurious_lists
    ):
        writer.add(config.split, row)
        classes[class_names[row.label]]["positives"] += 1
        positives += 1
    for split in phrase_masks:
        pm = _undecoded(phrase_masks[split], ["mask"])
        for r in range(len(pm)):
            e = pm[r]
            writer.add_phrase_mask(
                split, e["id"], e["phrase"], _decode(e["mask"], "L"), e["boxes"], e["scores"]
            )
    rejected = load_rejected(config.dataset)
    for split in rejected:
        for e in rejected[split]:
            writer.reject(e["id"], e["split"], e["stage"], e["reason"])

    report: dict[str, Any] = {
        "settings": {k: v for k, v in asdict(config).items() if k not in ("overwrite", "progress")},
        "classifier": probe.describe(),
        "remover": _describe(remover),
        "editor": _describe(editor),
        "background_swaps": "done" if editor is not None else "skipped (no --edit-model)",
        "grouping": {
            "method": "sentence-encoder cosine" if encoder is not None else "word-overlap (Jaccard)",
            "threshold": config.similarity_threshold,
            "normalisation": "lower case, articles dropped, rule-based singular",
            **({"encoder": _describe(encoder)} if encoder is not None else {}),
        },
        "skipped": dict(skipped),
        "positives": positives,
        "classes": classes,
        "package_version": __version__,
    }
    settings: dict[str, Any] = {}
    gen = Path(config.dataset) / "generation.json"
    if gen.is_file():
        settings = json.loads(gen.read_text())
    settings["discover"] = {
        **report["settings"],
        "remover": report["remover"],
        "editor": report["editor"],
        "grouping": report["grouping"],
    }
    summary = writer.close(
        settings,
        description=(
            f"Spurious-feature discovery (ASPIRE) over `{config.dataset}` with classifier "
            f"`{config.classifier}`: `spurious_phrases` holds each class's spurious phrase groups, and "
            f"{positives} spurious-free edits were added as positives (recipe generator `discover`). "
            "See discovery.md."
        ),
    )
    report["rows"] = summary
    report["seconds"] = round(time.time() - start, 1)
    out = Path(config.output)
    (out / "discovery.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "discovery.md").write_text(discovery_markdown(report), encoding="utf-8")
    plot_discovery(report, out / "discovery.png", config.top_groups)
    return report


def build_parser() -> argparse.ArgumentParser:
    d = DiscoverConfig("", "", "")
    p = argparse.ArgumentParser(
        prog="discover.py",
        description="Find the phrases an ERM classifier relies on (ASPIRE) and write a dataset folder with "
        "spurious_phrases filled, spurious-free positives added and a report (discovery.json/.md/.png).",
    )
    p.add_argument(
        "--dataset",
        required=True,
        metavar="DIR",
        help="dataset folder with phrase_masks (generate.py --mask-source grounded)",
    )
    p.add_argument(
        "--classifier",
        required=True,
        metavar="DIR",
        help="ERM classifier folder (scripts/train.py --method erm)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the new dataset folder")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--split", default=d.split, help="the split whose originals are edited")
    p.add_argument("--limit", type=int, help="edit at most this many originals (quick runs)")
    g = p.add_argument_group("editors")
    g.add_argument(
        "--inpaint-model",
        metavar="ID_OR_PATH",
        help="diffusers inpainting model that removes objects (default: the offline composite tile fill)",
    )
    g.add_argument(
        "--edit-model",
        metavar="ID_OR_PATH",
        help="instruction-editing model that swaps backgrounds (e.g. timbrooks/instruct-pix2pix); "
        "without it backgrounds are not tested",
    )
    g = p.add_argument_group("scoring")
    g.add_argument(
        "--flip-threshold", type=float, default=d.flip_threshold, help="flips / occurrences for spurious"
    )
    g.add_argument("--min-count", type=int, default=d.min_count, help="fewest edits of a group to judge it")
    g.add_argument(
        "--similarity-model",
        metavar="ID_OR_PATH",
        help="transformers sentence encoder for grouping (mean-pooled, cosine); default word overlap",
    )
    g.add_argument(
        "--similarity-threshold", type=float, default=d.similarity_threshold, help="phrases group at >= this"
    )
    g.add_argument(
        "--keep-per-class", type=int, default=d.keep_per_class, help="spurious-free positives per class"
    )
    g.add_argument("--top-groups", type=int, default=d.top_groups, help="groups per class in discovery.png")
    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=d.seed, help="run seed (each edit's seed derives from it)")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="images per editing / classifier batch"
    )
    g.add_argument("--device", help="torch device (default: Accelerate's, a GPU when there is one)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="diffusion model precision")
    trust.add_arguments(p.add_argument_group("loading models"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> DiscoverConfig:
    return DiscoverConfig(**vars(build_parser().parse_args(argv)))


def cli(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        report = run(config)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        print(f"discover.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    for name, c in report["classes"].items():
        print(f"{name}: spurious {c['spurious_phrases'] or 'none'}; positives {c['positives']}")
    print(f"wrote {config.output} (report: {Path(config.output) / 'discovery.md'})")
    return 0
