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

(c) With ``--ablation``: CLAD trained with one setting changed at a time (the evidence for the defaults).

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
CLAD_STEPS = {"clad_core": "0 (the paper's CLAD)", "clad_1neg": "1 (the default)", "clad_2neg": "2"}


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


# CLAD trained on the seed-0 demo dataset with one setting changed from the demo's (12 epochs, lr 3e-3,
# lambda 5, tau 0.2, paired crops of 70-100%, one stored negative per anchor)
DEMO_CLAD = ["--epochs", "12", "--lr", "3e-3", "--lambda-con", "5", "--temperature", "0.2", "--lr-decay-epochs"]  # fmt: skip
ABLATIONS: dict[str, list[str]] = {
    "the demo's settings": [],
    "lambda 1 (the paper's)": ["--lambda-con", "1"],
    "lambda 3": ["--lambda-con", "3"],
    "tau 0.1": ["--temperature", "0.1"],
    "independent crops for the positive": ["--no-paired-crops"],
    "no stored negatives (the paper's)": ["--max-stored-negatives", "0"],
    "2 stored negatives per anchor": ["--max-stored-negatives", "2"],
    "lr 1e-3 (the paper's)": ["--lr", "1e-3"],
    "the paper's recipe (independent 35-100% crops, lambda 1, no stored negatives, lr 1e-3)": [
        "--no-paired-crops", "--crop-scale", "0.35", "1.0", "--lambda-con", "1", "--max-stored-negatives", "0", "--lr", "1e-3",
    ],
}  # fmt: skip


def run_ablation(dataset: Path, out_root: Path) -> dict:
    """Train CLAD once per :data:`ABLATIONS` entry on ``dataset`` and evaluate it on the test split."""
    from debias.evaluate import evaluate_model, load_eval_set
    from debias.models import load_classifier

    data = load_eval_set(str(dataset), "test")
    results = {}
    for i, (name, extra) in enumerate(ABLATIONS.items()):
        out = out_root / f"ablation-{i}"
        cmd = [
            sys.executable, str(ROOT / "scripts" / "train.py"), "--dataset", str(dataset), "--method", "clad",
            "--output-dir", str(out), *DEMO_CLAD, "--checkpointing-steps", "0",
            "--no-progress", *extra,
        ]  # fmt: skip
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
        model, pre = load_classifier(str(out))
        r = evaluate_model(model, pre, data, challenge_pool_per_class=5)
        results[name] = {
            "flags": extra,
            "train_seconds": round(seconds, 1),
            "original": r["accuracy"]["original"],
            "mixed_same": r["accuracy"]["mixed_same"],
            "mixed_rand": r["accuracy"]["mixed_rand"],
            "bg_gap": r["bg_gap"],
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    # the caller adds command and date
    return {"dataset": str(dataset), "base_flags": DEMO_CLAD, "runs": results}


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
    if "ablation" in result:
        lines += [
            "### CLAD with one setting changed (seed 0 demo dataset, test split, one run each)",
            "",
            *provenance(result["ablation"]),
            f"The demo's CLAD: `train.py --method clad {' '.join(result['ablation'].get('base_flags', DEMO_CLAD))}`, "
            "with paired crops of 70-100%, 32 dictionary negatives and one stored negative per anchor.",
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
    p.add_argument("--work-dir", default="outputs/bench", help="where the demo runs write")
    p.add_argument(
        "--write-docs", action="store_true", help="replace the generated section of docs/BENCHMARKS.md"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.preset, args.repeats = args.seeds[:1], "small", min(args.repeats, 15)
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
    for section in ("steps", "demo", "ablation"):
        if section not in result and section in previous:
            result[section] = previous[section]
    Path(args.output).write_text(json.dumps(result, indent=2))
    if args.write_docs:
        write_docs(result, ROOT / "docs" / "BENCHMARKS.md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
