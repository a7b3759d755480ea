#!/usr/bin/env python
"""Benchmarks behind docs/BENCHMARKS.md: the demo over several seeds and the cost of a CLAD step.

    python scripts/bench.py --output bench.json               # 3 seeds of the default demo + step costs
    python scripts/bench.py --quick --output bench.json       # the small preset, 1 seed (a few minutes)
    python scripts/bench.py --skip-demo --output steps.json   # step costs only

(a) Debiasing: ``scripts/demo.py`` per seed; mean and spread (min..max) of every method's accuracy per
    variant, BG-gap, challenge and worst-group accuracy, and the demo's wall time.
(b) Training cost: one model, one batch, ERM and CLAD steps alternated (so that both see the same
    machine state) and timed with ``time.perf_counter``; the median of ``--repeats`` steps of each gives
    ``train_step_ratio_clad_over_erm``. The negative dictionary's push and lookup are timed the same way;
    ``negative_dictionary_share`` is their median over the median CLAD step.

(c) Generation throughput (``--generation``): images/s of each generator on 64-px images of the
    built-in benchmark: cut-and-paste, and the diffusion generators with tiny random pipelines (their
    cost at real size needs a GPU: ``scripts/bench_diffusion.py --size real``).
(d) On a GPU (``--gpu``, skipped without one): ERM and CLAD steps of a ResNet-50 at 224 px, bf16
    autocast, channels-last, ``torch.compile`` off and on, with peak memory.
(e) With ``--losses``: CLAD with each loss of the family (InfoNCE, SupCon, epsilon-SupInfoNCE,
    InfoNCE + FairKL) trained on each seed's demo dataset; mean and spread of mixed_rand and BG-gap.
(f) With ``--ablation``: CLAD trained with one setting changed at a time (the evidence for the defaults).

``--skip-demo`` / ``--skip-steps`` leave a section out; with ``--reuse FILE`` a section left out is
taken from an earlier result instead. With ``--write-docs`` the tables replace the generated section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# the CLAD step kinds timed against ERM, with the stored negatives per anchor each one uses
CLAD_STEPS = {"clad_core": "0 (the default, the paper's CLAD)", "clad_1neg": "1", "clad_2neg": "2"}


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def step_costs(
    batch_size: int = 64, resolution: int = 64, repeats: int = 30, widths=None, channels_last: bool = True
) -> dict:
    """Median step times (ms) of ERM and of CLAD with 0, 1 and 2 stored negatives per anchor.

    One model and one random batch; the four kinds of step are interleaved, so that every ratio is
    measured under the same machine state within one run.
    """
    import torch

    from debias.data import BatchAugment
    from debias.models import ClassifierWithFeatures, build_model
    from debias.train import Objective

    torch.manual_seed(0)
    classes = [str(i) for i in range(9)]
    model, pre = build_model("small-resnet", classes, resolution, widths=widths)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = ClassifierWithFeatures(model).train()
    aug = BatchAugment(pre.mean, pre.std, scale=(0.7, 1.0))
    b, r = batch_size, resolution
    g = torch.Generator().manual_seed(0)
    base = {
        "anchor": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, generator=g),
        "label": torch.randint(0, 9, (b,), generator=g),
        "positive": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, generator=g),
        "positive_bg": torch.randint(0, 9, (b,), generator=g),
        "has_positive": torch.ones(b, dtype=torch.bool),
    }
    negs = torch.randint(0, 256, (b, 2, 3, r, r), dtype=torch.uint8, generator=g)
    batches = {"erm": base, "clad_core": base}
    for s in (1, 2):
        batches[f"clad_{s}neg"] = {
            **base,
            "negatives": negs[:, :s].contiguous(),
            "negative_valid": torch.ones(b, s, dtype=torch.bool),
        }
    args = Namespace(
        temperature=0.2, lambda_con=5.0, queue_size=32, paired_crops=True, channels_last=channels_last
    )
    objectives = {
        k: Objective("erm" if k == "erm" else "clad", aug, 9, net.feature_dim, args) for k in batches
    }
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    times: dict[str, list[float]] = {k: [] for k in [*batches, "dictionary"]}

    def step(kind: str) -> float:
        obj = objectives[kind]
        t = time.perf_counter()
        loss, parts = obj(net, batches[kind])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        obj.after_step(parts)
        return time.perf_counter() - t

    for _ in range(3):  # warm-up
        for kind in batches:
            step(kind)
    d = objectives["clad_core"].dictionary
    feats = torch.randn(b, net.feature_dim)
    for _ in range(repeats):
        for kind in batches:
            times[kind].append(step(kind))
        t = time.perf_counter()
        d.push(feats, base["positive_bg"])
        d.lookup(base["label"])
        times["dictionary"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "batch_size": b,
        "resolution": r,
        "widths": list(model.config.widths),
        "channels_last": channels_last,
        "repeats": repeats,
        "step_ms": {k: round(v * 1000, 2) for k, v in med.items()},
    }
    for kind in CLAD_STEPS:
        out[kind] = {
            "train_step_ratio_clad_over_erm": round(med[kind] / med["erm"], 3),
            "negative_dictionary_share": round(med["dictionary"] / med[kind], 4),
        }
    return out


def median_of_runs(runs: int, **kwargs) -> dict:
    """:func:`step_costs` ``runs`` times; step times and ratios are the medians over runs, each run kept."""
    results = [step_costs(**kwargs) for _ in range(runs)]
    out = {k: v for k, v in results[0].items() if not isinstance(v, dict)}
    out["runs"] = runs
    out["step_ms"] = {k: statistics.median(r["step_ms"][k] for r in results) for k in results[0]["step_ms"]}
    for kind in CLAD_STEPS:
        ratios = [r[kind]["train_step_ratio_clad_over_erm"] for r in results]
        shares = [r[kind]["negative_dictionary_share"] for r in results]
        out[kind] = {
            "train_step_ratio_clad_over_erm": statistics.median(ratios),
            "negative_dictionary_share": statistics.median(shares),
            "ratio_per_run": ratios,
        }
    return out


# the demo's CLAD flags (12 epochs, lr 3e-3, lambda 5, tau 0.2, paired crops of 70-100%, dictionary negatives)
DEMO_CLAD = ["--epochs", "12", "--lr", "3e-3", "--lambda-con", "5", "--temperature", "0.2", "--lr-decay-epochs"]  # fmt: skip
# the loss family and the ablation are trained on top of the demo's flags with one stored negative per anchor
STORED = ["--max-stored-negatives", "1"]
STUDY_CLAD = [*DEMO_CLAD, *STORED]
# CLAD trained on the seed-0 demo dataset with one setting changed from STUDY_CLAD
ABLATIONS: dict[str, list[str]] = {
    "the demo's settings + one stored negative": [],
    "lambda 1 (the paper's)": ["--lambda-con", "1"],
    "lambda 3": ["--lambda-con", "3"],
    "tau 0.1": ["--temperature", "0.1"],
    "independent crops for the positive": ["--no-paired-crops"],
    "no stored negatives (the paper's; the demo's settings)": ["--max-stored-negatives", "0"],
    "2 stored negatives per anchor": ["--max-stored-negatives", "2"],
    "lr 1e-3 (the paper's)": ["--lr", "1e-3"],
    "the paper's recipe (independent 35-100% crops, lambda 1, no stored negatives, lr 1e-3)": [
        "--no-paired-crops", "--crop-scale", "0.35", "1.0", "--lambda-con", "1", "--max-stored-negatives", "0", "--lr", "1e-3",
    ],
}  # fmt: skip


def train_and_evaluate(
    dataset: Path, out: Path, extra: list[str], base: list[str] = DEMO_CLAD, data=None
) -> dict:
    """``train.py --method clad`` with ``base + extra`` flags on ``dataset``; accuracies on its test split."""
    import shutil

    from debias.evaluate import evaluate_model, load_eval_set
    from debias.models import load_classifier

    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--dataset", str(dataset), "--method", "clad",
        "--output-dir", str(out), *base, "--checkpointing-steps", "0", "--no-progress", *extra,
    ]  # fmt: skip
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    model, pre = load_classifier(str(out))
    r = evaluate_model(model, pre, data or load_eval_set(str(dataset), "test"), challenge_pool_per_class=5)
    return {
        "flags": extra,
        "train_seconds": round(seconds, 1),
        "original": r["accuracy"]["original"],
        "mixed_same": r["accuracy"]["mixed_same"],
        "mixed_rand": r["accuracy"]["mixed_rand"],
        "bg_gap": r["bg_gap"],
    }


def run_ablation(dataset: Path, out_root: Path) -> dict:
    """Train CLAD once per :data:`ABLATIONS` entry on ``dataset`` and evaluate it on the test split."""
    from debias.evaluate import load_eval_set

    data = load_eval_set(str(dataset), "test")
    results = {}
    for i, (name, extra) in enumerate(ABLATIONS.items()):
        results[name] = train_and_evaluate(dataset, out_root / f"ablation-{i}", extra, STUDY_CLAD, data)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    # the caller adds command and date
    return {"dataset": str(dataset), "base_flags": STUDY_CLAD, "runs": results}


# the contrastive loss family, each on top of the demo's CLAD settings
LOSSES: dict[str, list[str]] = {
    "InfoNCE (CLAD) + one stored negative": [],
    "SupCon (positives: counterfactual + same-class originals)": ["--loss", "supcon"],
    "epsilon-SupInfoNCE": ["--loss", "eps-supinfonce"],
    "SupCon, counterfactual positive only": ["--loss", "supcon", "--no-class-positives"],
    "epsilon-SupInfoNCE, counterfactual positive only": ["--loss", "eps-supinfonce", "--no-class-positives"],
    "InfoNCE + FairKL": ["--fairkl-weight", "1.0", "--fairkl-bandwidth", "0.05"],
    "InfoNCE + FairKL, weight 0.1": ["--fairkl-weight", "0.1", "--fairkl-bandwidth", "0.05"],
    "InfoNCE + FairKL, weight 0.1, bandwidth 0.5": ["--fairkl-weight", "0.1", "--fairkl-bandwidth", "0.5"],
    # not a loss: the cost/benefit of the gradient-free pass over one stored negative
    "InfoNCE, no stored negatives (the paper's CLAD, the default)": ["--max-stored-negatives", "0"],
}


def run_losses(
    datasets: dict[int, Path], out_root: Path, base: list[str], only=None, previous: dict | None = None
) -> dict:
    """Each :data:`LOSSES` entry (those whose name contains a word of ``only``) trained on each seed's
    dataset; per loss the runs and their spread. Entries of ``previous`` not rerun are kept."""
    from debias.evaluate import load_eval_set

    chosen = {n: e for n, e in LOSSES.items() if not only or any(w in n for w in only)}
    results: dict[str, dict] = {name: {"flags": extra, "runs": {}} for name, extra in chosen.items()}
    for seed, dataset in datasets.items():
        data = load_eval_set(str(dataset), "test")
        for name, extra in chosen.items():
            i = list(LOSSES).index(name)
            r = train_and_evaluate(
                dataset, out_root / f"loss-{i}-seed{seed}", [*extra, "--seed", str(seed)], base, data
            )
            results[name]["runs"][seed] = r
            print(f"{name}, seed {seed}: {json.dumps(r)}", flush=True)
    for entry in results.values():
        entry["runs"] = {int(k): v for k, v in entry["runs"].items()}
        for key in ("mixed_rand", "bg_gap", "original"):
            v = [r[key] for r in entry["runs"].values()]
            entry[key] = {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
    kept = (previous or {}).get("losses", {})
    merged = {n: results[n] if n in results else kept[n] for n in LOSSES if n in results or n in kept}
    return {"base_flags": base, "losses": merged, "verdict": verdict(merged)}


def verdict(results: dict) -> str:
    """Does the best of the family beat InfoNCE by more than the seed spread (mixed_rand or BG-gap)?"""
    names = list(results)
    base = results[names[0]]
    spread_mr = base["mixed_rand"]["max"] - base["mixed_rand"]["min"]
    spread_gap = base["bg_gap"]["max"] - base["bg_gap"]["min"]
    lines = []
    for name in names[1:]:
        r = results[name]
        d_mr = r["mixed_rand"]["mean"] - base["mixed_rand"]["mean"]
        d_gap = base["bg_gap"]["mean"] - r["bg_gap"]["mean"]
        spread = max(spread_mr, r["mixed_rand"]["max"] - r["mixed_rand"]["min"])
        spread_g = max(spread_gap, r["bg_gap"]["max"] - r["bg_gap"]["min"])
        if d_mr > spread or d_gap > spread_g:
            lines.append(
                f"{name} beats InfoNCE (mixed_rand {d_mr:+.1f}, BG-gap {-d_gap:+.1f}) beyond the seed spread"
            )
    if lines:
        return "; ".join(lines)
    return (
        "no loss of the family beats InfoNCE on mixed_rand or BG-gap by more than the seed spread "
        f"(InfoNCE spread: mixed_rand {spread_mr:.1f}, BG-gap {spread_gap:.1f} points)"
    )


def generation_throughput(images: int = 16, steps: int = 10, runs: int = 3, work: Path | None = None) -> dict:
    """Images/s of each generator on ``images`` 64-px anchors of the built-in benchmark (medians of runs).

    Cut-and-paste positives; inpainting positives and removals, instruct-pix2pix background swaps and
    img2img, with tiny random pipelines (``augment.tiny_diffusion``) at ``steps`` steps, batch 8.
    """
    import tempfile

    from augment.sources import build_source
    from augment.synthesize.composite import CompositeGenerator
    from augment.synthesize.edit import Img2ImgGenerator, InstructEditGenerator
    from augment.synthesize.inpaint import InpaintGenerator
    from augment.tiny_diffusion import build_tiny_diffusion

    src = build_source("synthetic", num_classes=9, image_size=64, train_per_class=max(2, images // 9 + 1))
    samples = [src.load("train", i) for i in range(images)]
    ims = [s.image for s in samples]
    masks = [s.mask for s in samples]
    seeds = list(range(images))
    prompts = ["a photo of a field"] * images
    root = Path(work or tempfile.mkdtemp())
    knobs = {"steps": steps, "batch_size": 8, "device": "cpu"}
    inpaint = InpaintGenerator.from_pretrained(build_tiny_diffusion(root / "inpaint", "inpaint"), **knobs)
    ip2p = InstructEditGenerator.from_pretrained(
        build_tiny_diffusion(root / "ip2p", "instruct-pix2pix"), **knobs
    )
    i2i = Img2ImgGenerator.from_pretrained(
        build_tiny_diffusion(root / "img2img", "img2img"), strengths=(0.5,), **knobs
    )
    composite = CompositeGenerator()
    partners = ims[1:] + ims[:1]
    partner_masks = masks[1:] + masks[:1]
    ways = {
        "composite (cut-and-paste positive)": lambda: composite(
            background_image=partners, background_mask=partner_masks, image=ims, mask_image=masks
        ),
        "inpaint positive (tiny pipeline)": lambda: inpaint.positive(ims, masks, prompts, seeds),
        "inpaint remove (tiny pipeline)": lambda: inpaint.remove(ims, masks, prompts, seeds),
        "instruct-pix2pix swap (tiny pipeline)": lambda: ip2p.swap_background(
            ims, masks, ["a wall"] * images, ["a field"] * images, seeds
        ),
        "img2img, strength 0.5 (tiny pipeline)": lambda: i2i.positive(ims, masks, prompts, seeds),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for way in ways.values():  # warm-up
        way()
    for _ in range(runs):
        for name, way in ways.items():
            t = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - t)
    return {
        "images": images,
        "image_size": 64,
        "steps": steps,
        "batch_size": 8,
        "runs": runs,
        "images_per_second": {k: round(images / statistics.median(v), 1) for k, v in times.items()},
    }


def gpu_step_costs(
    batch_size: int = 64,
    resolution: int = 224,
    repeats: int = 30,
    device: str = "cuda",
    dtype: str = "bfloat16",
    compile_model: bool = False,
    config=None,
) -> dict:
    """ERM and CLAD (the paper's: anchor + positive in one pass) step times of a ResNet-50 (or
    ``config``: a transformers ResNetConfig) under autocast, channels-last, with peak memory on CUDA."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    from debias.data import BatchAugment
    from debias.models import ClassifierWithFeatures, Preprocessing
    from debias.train import Objective

    torch.manual_seed(0)
    cfg = config or ResNetConfig(num_labels=9)  # the defaults are ResNet-50
    model = ResNetForImageClassification(cfg).to(device).to(memory_format=torch.channels_last)
    net = ClassifierWithFeatures(model).train()
    runner = torch.compile(net) if compile_model else net
    pre = Preprocessing(resolution, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    aug = BatchAugment(pre.mean, pre.std, scale=(0.7, 1.0)).to(device)
    b, r = batch_size, resolution
    g = torch.Generator().manual_seed(0)
    batch = {
        "anchor": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, generator=g).to(device),
        "label": torch.randint(0, 9, (b,), generator=g).to(device),
        "positive": torch.randint(0, 256, (b, 3, r, r), dtype=torch.uint8, generator=g).to(device),
        "positive_bg": torch.randint(0, 9, (b,), generator=g).to(device),
        "has_positive": torch.ones(b, dtype=torch.bool, device=device),
    }
    args = Namespace(temperature=0.2, lambda_con=5.0, queue_size=32, paired_crops=True, channels_last=True)
    objectives = {k: Objective(k, aug, 9, net.feature_dim, args) for k in ("erm", "clad")}
    for o in objectives.values():
        o.to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    amp = getattr(torch, dtype)
    cuda = str(device).startswith("cuda")

    def step(kind: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=amp):
            loss, parts = objectives[kind](runner, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objectives[kind].after_step(parts)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    out: dict = {"batch_size": b, "resolution": r, "dtype": dtype, "compile": compile_model, "step_ms": {}}
    for kind in ("erm", "clad"):
        for _ in range(3):
            step(kind)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [step(kind) for _ in range(repeats)]
        out["step_ms"][kind] = round(1000 * statistics.median(times), 2)
        if cuda:
            out.setdefault("peak_memory_gib", {})[kind] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["train_step_ratio_clad_over_erm"] = round(out["step_ms"]["clad"] / out["step_ms"]["erm"], 3)
    return out


def demo_dataset(seed: int, preset: str, out_root: Path) -> Path:
    """The demo's dataset for ``seed`` (generated with the demo's settings when not there yet)."""
    from augment.pipeline import GenerateConfig, run
    from debias.demo import _settings, build_parser

    dataset = out_root / f"demo-seed{seed}" / "dataset"
    if (dataset / "README.md").is_file():
        return dataset
    print(f"generating {dataset} ...", flush=True)
    s = _settings(
        build_parser().parse_args(["--output", str(dataset.parent), "--preset", preset, "--seed", str(seed)])
    )
    keys = ("num_classes", "image_size", "rho", "train_per_class", "validation_per_class", "test_per_class")
    run(
        GenerateConfig(
            output=str(dataset), overwrite=True, seed=seed, progress=False, **{k: s[k] for k in keys}
        )
    )
    return dataset


def run_demo(seed: int, preset: str, out_root: Path) -> dict:
    out = out_root / f"demo-seed{seed}"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "demo.py"),
        "--output",
        str(out),
        "--preset",
        preset,
        "--seed",
        str(seed),
        "--no-progress",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    report = json.loads((out / "report.json").read_text())
    report["wall_seconds"] = round(time.perf_counter() - t, 1)
    return report


def summarise(demos: list[dict]) -> dict:
    """Mean and range per method and metric over seeds."""
    methods = list(demos[0]["methods"])
    out = {}
    for m in methods:
        rows = [d["methods"][m] for d in demos]
        metrics = {f"accuracy.{k}": [r["accuracy"][k] for r in rows] for k in rows[0]["accuracy"]}
        for k in ("bg_gap", "challenge_accuracy", "worst_group_accuracy"):
            metrics[k] = [r[k] for r in rows]
        out[m] = {
            k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "values": v}
            for k, v in metrics.items()
        }
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        BEGIN,
        "",
        f"Machine: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, Python {m['python']}.",
        "",
    ]

    def provenance(section: dict) -> list[str]:
        return [
            f"Command: `{section.get('command', result['command'])}` ({section.get('date', result['date'])}).",
            "",
        ]

    if "demo" in result:
        s = result["demo"]["summary"]
        seeds = result["demo"]["seeds"]
        lines += [
            f"### Debiasing on the built-in benchmark (preset `{result['demo']['preset']}`, seeds {seeds}: mean, and min..max)",
            "",
            *provenance(result["demo"]),
            "| method | original | mixed_same | mixed_rand | only_bg_t | bg_gap | challenge | worst group |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]

        def cell(v: dict) -> str:
            return f"{v['mean']:.1f} ({v['min']:.1f}..{v['max']:.1f})"

        for m, v in s.items():
            lines.append(
                f"| {m} | {cell(v['accuracy.original'])} | {cell(v['accuracy.mixed_same'])} | {cell(v['accuracy.mixed_rand'])} | "
                f"{cell(v['accuracy.only_bg_t'])} | {cell(v['bg_gap'])} | {cell(v['challenge_accuracy'])} | {cell(v['worst_group_accuracy'])} |"
            )
        walls = [d["wall_seconds"] for d in result["demo"]["runs"]]
        lines += [
            "",
            f"Demo wall time per seed: {', '.join(f'{w:.0f} s' for w in walls)} (median {statistics.median(walls):.0f} s).",
            "",
        ]
        targets = result["demo"].get("targets")
        if targets:
            lines += ["| target (CLAD against ERM, per seed) | values | met in |", "| --- | --- | --- |"]
            for t in targets:
                lines.append(
                    f"| {t['target']} | {', '.join(f'{v:.1f}' for v in t['values'])} | {t['met']}/{len(t['values'])} seeds |"
                )
            lines.append("")
    if "steps" in result:
        lines += [
            "### Training step cost (one model, one random batch of 64 at 64 px, step kinds interleaved)",
            "",
            *provenance(result["steps"]),
            "Medians of the step times within a run; the ratio is the median over independent runs (each run's ratio in brackets).",
            "",
            "| memory format | ERM step (ms) | CLAD step (ms) | stored negatives per anchor | train_step_ratio_clad_over_erm | negative_dictionary_share |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for fmt, r in result["steps"]["formats"].items():
            for kind, label in CLAD_STEPS.items():
                per_run = ", ".join(f"{x:.2f}" for x in r[kind].get("ratio_per_run", []))
                lines.append(
                    f"| {fmt} | {r['step_ms']['erm']:.1f} | {r['step_ms'][kind]:.1f} | {label} | "
                    f"{r[kind]['train_step_ratio_clad_over_erm']:.2f} ({per_run}) | {100 * r[kind]['negative_dictionary_share']:.2f}% |"
                )
        lines.append(f"\nThe dictionary's push + lookup of 64 features: {r['step_ms']['dictionary']:.2f} ms.")
        lines.append("")
    if "generation" in result:
        g = result["generation"]
        lines += [
            f"### Generation throughput ({g['images']} anchors of 64 px, diffusion: tiny random pipelines, {g['steps']} steps, batch {g['batch_size']})",
            "",
            *provenance(g),
            "| generator | images/s |",
            "| --- | --- |",
            *[f"| {k} | {v:.1f} |" for k, v in g["images_per_second"].items()],
            "",
        ]
    if "gpu" in result:
        gp = result["gpu"]
        lines += [
            f"### On a GPU: {gp['device']} (ResNet-50, 224 px, batch 64, bf16 autocast, channels-last)",
            "",
            *provenance(gp),
            "| torch.compile | ERM step (ms) | CLAD step (ms) | train_step_ratio_clad_over_erm | peak memory ERM / CLAD (GiB) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in gp["runs"]:
            mem = r.get("peak_memory_gib", {})
            lines.append(
                f"| {'on' if r['compile'] else 'off'} | {r['step_ms']['erm']:.1f} | {r['step_ms']['clad']:.1f} | "
                f"{r['train_step_ratio_clad_over_erm']:.2f} | {mem.get('erm', '-')} / {mem.get('clad', '-')} |"
            )
        lines.append("")
    if "losses" in result:
        lo = result["losses"]
        lines += [
            f"### The contrastive loss family (seeds {lo['seeds']}: mean, and min..max)",
            "",
            *provenance(lo),
            f"Base: `train.py --method clad {' '.join(lo.get('base_flags', STUDY_CLAD))}` (the demo's settings plus "
            "one stored negative per anchor); each row changes what its flags say.",
            "",
            "| loss | flags | original | mixed_rand | bg_gap |",
            "| --- | --- | --- | --- | --- |",
        ]

        def span(v: dict) -> str:
            return f"{v['mean']:.1f} ({v['min']:.1f}..{v['max']:.1f})"

        for name, r in lo["losses"].items():
            lines.append(
                f"| {name} | `{' '.join(r['flags']) or '-'}` | {span(r['original'])} | {span(r['mixed_rand'])} | {span(r['bg_gap'])} |"
            )
        lines += ["", f"Verdict: {lo['verdict']}.", ""]
    if "ablation" in result:
        lines += [
            "### CLAD with one setting changed (seed 0 demo dataset, test split, one run each)",
            "",
            *provenance(result["ablation"]),
            f"Base: `train.py --method clad {' '.join(result['ablation'].get('base_flags', STUDY_CLAD))}`: the demo's "
            "settings (paired crops of 70-100%, 32 dictionary negatives) plus one stored negative per anchor.",
            "",
            "| setting | original | mixed_same | mixed_rand | bg_gap | training time (s) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in result["ablation"]["runs"].items():
            lines.append(
                f"| {name} | {r['original']:.1f} | {r['mixed_same']:.1f} | {r['mixed_rand']:.1f} | {r['bg_gap']:.1f} | {r['train_seconds']:.0f} |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_docs(result: dict, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = markdown(result)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSON file for the results")
    p.add_argument("--quick", action="store_true", help="the small demo preset, one seed, fewer step repeats")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="default", help="demo preset (default: default; --quick: small)")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--repeats", type=int, default=40, help="timed steps of each kind per run")
    p.add_argument(
        "--step-runs",
        type=int,
        default=3,
        help="independent runs of the step timing; ratios are their median",
    )
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--reuse", help="an earlier result JSON: sections this run leaves out are taken from it")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also train CLAD with one setting changed at a time on the seed-0 demo dataset (about 12 minutes)",
    )
    p.add_argument(
        "--generation",
        action="store_true",
        help="also time each generator (images/s; on by default with --quick)",
    )
    p.add_argument("--skip-generation", action="store_true", help="with --quick: leave the generators out")
    p.add_argument(
        "--gpu",
        action="store_true",
        help="also time ResNet-50 steps at 224 px on the GPU (bf16, channels-last, compile off/on); skipped without one",
    )
    p.add_argument(
        "--losses",
        action="store_true",
        help="also train CLAD with each loss of the family on every seed's demo dataset (about 4 minutes per seed)",
    )
    p.add_argument(
        "--only-losses",
        nargs="+",
        metavar="NAME",
        help="with --losses: only the entries whose name contains one of these words (merged into --reuse's)",
    )
    p.add_argument("--work-dir", default="outputs/bench", help="where the demo runs write")
    p.add_argument(
        "--write-docs", action="store_true", help="replace the generated section of docs/BENCHMARKS.md"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.preset, args.repeats = args.seeds[:1], "small", min(args.repeats, 15)
        args.step_runs = min(args.step_runs, 1)
        args.generation = not args.skip_generation
    result: dict = {
        "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
    }
    previous = json.loads(Path(args.reuse).read_text()) if args.reuse else {}
    if not args.skip_steps:
        result["steps"] = {
            "command": result["command"],
            "date": result["date"],
            "formats": {
                "channels-last (default)": median_of_runs(args.step_runs, repeats=args.repeats),
                "contiguous": median_of_runs(args.step_runs, repeats=args.repeats, channels_last=False),
            },
        }
        for name, r in result["steps"]["formats"].items():
            print(f"{name}: {json.dumps(r)}", flush=True)
    if not args.skip_demo:
        out_root = ROOT / args.work_dir
        runs = []
        for seed in args.seeds:
            print(f"demo seed {seed} ...", flush=True)
            runs.append(run_demo(seed, args.preset, out_root))
            print(f"  {runs[-1]['wall_seconds']} s", flush=True)
        targets = []
        for i, t in enumerate(runs[0].get("targets", [])):
            values = [r["targets"][i]["value"] for r in runs]
            targets.append(
                {"target": t["target"], "values": values, "met": sum(r["targets"][i]["ok"] for r in runs)}
            )
        result["demo"] = {
            "command": result["command"],
            "date": result["date"],
            "preset": args.preset,
            "seeds": args.seeds,
            "runs": [{"wall_seconds": r["wall_seconds"], "timings": r["timings_seconds"]} for r in runs],
            "summary": summarise(runs),
            "targets": targets,
        }
    if args.generation:
        gen = generation_throughput(images=8 if args.quick else 16, runs=1 if args.quick else 3)
        result["generation"] = {"command": result["command"], "date": result["date"], **gen}
        print(f"generation: {json.dumps(gen)}", flush=True)
    if args.gpu:
        import torch

        if torch.cuda.is_available():
            result["gpu"] = {
                "command": result["command"],
                "date": result["date"],
                "device": torch.cuda.get_device_name(0),
                "runs": [gpu_step_costs(compile_model=c) for c in (False, True)],
            }
            print(f"gpu: {json.dumps(result['gpu'])}", flush=True)
        else:
            print("--gpu: no CUDA device here; the GPU section is left out", flush=True)
    if args.losses:
        datasets = {seed: demo_dataset(seed, args.preset, ROOT / args.work_dir) for seed in args.seeds}
        base = STUDY_CLAD if not args.quick else [*STUDY_CLAD[:1], "3", *STUDY_CLAD[2:]]
        result["losses"] = {
            "command": result["command"],
            "date": result["date"],
            "seeds": args.seeds,
            **run_losses(datasets, ROOT / args.work_dir, base, args.only_losses, previous.get("losses")),
        }
        print(f"losses: {result['losses']['verdict']}", flush=True)
    if args.ablation:
        dataset = ROOT / args.work_dir / f"demo-seed{args.seeds[0]}" / "dataset"
        if not (dataset / "README.md").is_file():
            print(f"generating {dataset} ...", flush=True)
            run_demo(args.seeds[0], args.preset, ROOT / args.work_dir)
        result["ablation"] = {
            "command": result["command"],
            "date": result["date"],
            **run_ablation(dataset, ROOT / args.work_dir),
        }
    for section in ("steps", "demo", "generation", "gpu", "losses", "ablation"):
        if section not in result and section in previous:
            result[section] = previous[section]
    Path(args.output).write_text(json.dumps(result, indent=2))
    if args.write_docs:
        write_docs(result, ROOT / "docs" / "BENCHMARKS.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
