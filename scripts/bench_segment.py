#!/usr/bin/env python
"""Throughput of the segmentation stage: SAM image-embedding reuse against re-encoding per prompt.

    python scripts/bench_segment.py                          # tiny SAM + random ViT-B SAM, built offline
    python scripts/bench_segment.py --model tiny --images 16
    python scripts/bench_segment.py --model facebook/sam-vit-base --device cuda   # real weights (GPU)

Models: ``tiny`` (``augment.tiny.build_tiny_sam``: 128 px, hidden 64, 2 layers), ``vit-base`` (the
``facebook/sam-vit-base`` architecture, ``SamConfig()`` defaults: ViT-B, hidden 768, 12 layers,
1024 px, random weights, built from the config without any download), or any SAM id / folder.

Three ways, each over the same ``--images`` random RGB images (``--size`` HxW), timed end to end
(preprocessing, SAM, masks back at the original size, union and post-processing):

* ``reuse, 1 prompt``: :class:`augment.segment.Segmenter` (grounded mode, a stub detector that returns
  fixed boxes at no cost) with 1 box per image;
* ``reuse, P prompts``: the same with ``--prompts`` boxes per image: each image is encoded once and
  all its boxes are decoded on that embedding;
* ``naive, P prompts``: the plain ``SamModel`` forward with ``pixel_values`` once per prompt (the
  image is re-encoded for every box), then the same union and post-processing.

The ways are interleaved within each run; ``--runs`` runs (``--naive-runs`` for the naive way, which
costs about P encodings per image). Reported: median images/s of each way and the ratio
time(P prompts) / time(1 prompt) of the reuse path (median of the per-run ratios; target <= 1.3).
Prints a markdown table (and JSON with ``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StubDetector:
    """``k`` fixed boxes for every label, spread over the image, at no cost."""

    def __init__(self, k: int):
        self.k = k
        self.top_k = k

    def detect(self, images, queries):
        out = []
        for image, qs in zip(images, queries):
            w, h = image.size
            boxes = []
            for j in range(self.k):
                f = j / max(self.k, 1)
                boxes.append(([w * (0.1 + 0.1 * f), h * (0.1 + 0.2 * f), w * (0.6 + 0.3 * f), h * 0.9], 0.9))
            out.append({q: list(boxes) for q in qs})
        return out

    def describe(self):
        return {"model": "stub"}


def load_backend(name: str, device: str | None, tmp: Path):
    import torch

    from augment.segment import TransformersSam

    if name == "tiny":
        from augment.tiny import build_tiny_sam

        return TransformersSam.from_pretrained(build_tiny_sam(tmp / "tiny-sam"), device=device), (
            "tiny random SAM (128 px, hidden 64, 2 layers)"
        )
    if name == "vit-base":
        from transformers import SamConfig, SamImageProcessorPil, SamModel, SamProcessor

        from augment.runtime import resolve_device

        torch.manual_seed(0)
        model = SamModel(SamConfig()).eval().to(resolve_device(device))
        processor = SamProcessor(image_processor=SamImageProcessorPil())
        ref = {
            "model": "facebook/sam-vit-base architecture, random weights",
            "revision": None,
            "commit": None,
        }
        return TransformersSam(
            model, processor, ref=ref
        ), "ViT-B SAM (SamConfig defaults, 1024 px), random weights"
    return TransformersSam.from_pretrained(name, device=device), name


def bench_model(name: str, args, tmp: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from augment.segment import PostProcess, Segmenter, postprocess, union_masks

    sam, label = load_backend(name, args.device, tmp)
    h, w = args.size
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.images)]
    labels = ["object"] * len(images)
    phrases = [[] for _ in images]
    post = PostProcess(min_area=0.0, max_area=1.0)
    one = Segmenter("grounded", sam, StubDetector(1), post=post, batch_size=args.batch_size, max_boxes=1)
    many = Segmenter(
        "grounded",
        sam,
        StubDetector(args.prompts),
        post=post,
        batch_size=args.batch_size,
        max_boxes=args.prompts,
    )
    stub = StubDetector(args.prompts)
    model, processor = sam.model, sam.processor

    def sync():
        if sam.device.type == "cuda":
            torch.cuda.synchronize()

    def run_reuse(seg) -> float:
        sync()
        t = time.perf_counter()
        results = seg(images, labels, phrases=phrases)
        sync()
        assert all(r.mask is not None for r in results)
        return time.perf_counter() - t

    def run_naive() -> float:
        sync()
        t = time.perf_counter()
        for s in range(0, len(images), args.batch_size):
            chunk = images[s : s + args.batch_size]
            found = stub.detect(chunk, [["object"]] * len(chunk))
            per_image: list[list] = [[] for _ in chunk]
            for p in range(args.prompts):
                boxes = [[found[i]["object"][p][0]] for i in range(len(chunk))]
                enc = processor(images=chunk, input_boxes=boxes, return_tensors="pt")
                with torch.inference_mode():
                    out = model(
                        pixel_values=enc["pixel_values"].to(sam.device, sam.dtype),
                        input_boxes=enc["input_boxes"].to(sam.device, sam.dtype),
                        multimask_output=False,
                    )
                masks = processor.post_process_masks(
                    out.pred_masks.float().cpu(), enc["original_sizes"], enc["reshaped_input_sizes"]
                )
                for i, m in enumerate(masks):
                    per_image[i].append(m[0, 0].numpy())
            for i, image in enumerate(chunk):
                postprocess(union_masks(per_image[i], (image.size[1], image.size[0])), post)
        sync()
        return time.perf_counter() - t

    run_reuse(one)  # warm-up (allocations, lazy initialisation)
    t_one, t_many, t_naive = [], [], []
    for r in range(args.runs):
        t_one.append(run_reuse(one))
        t_many.append(run_reuse(many))
        if r < args.naive_runs:
            t_naive.append(run_naive())
    n = len(images)
    ratios = [m / o for m, o in zip(t_many, t_one)]
    result = {
        "model": label,
        "images": n,
        "image_size": f"{h}x{w}",
        "batch_size": args.batch_size,
        "prompts": args.prompts,
        "runs": args.runs,
        "images_per_s_reuse_1": round(n / statistics.median(t_one), 3),
        "images_per_s_reuse_p": round(n / statistics.median(t_many), 3),
        "time_ratio_p_over_1": round(statistics.median(ratios), 3),
        "ratio_per_run": [round(x, 3) for x in ratios],
        "seconds_reuse_1": [round(x, 3) for x in t_one],
        "seconds_reuse_p": [round(x, 3) for x in t_many],
    }
    if t_naive:
        result.update(
            naive_runs=len(t_naive),
            images_per_s_naive_p=round(n / statistics.median(t_naive), 3),
            seconds_naive_p=[round(x, 3) for x in t_naive],
            time_ratio_naive_p_over_reuse_1=round(statistics.median(t_naive) / statistics.median(t_one), 3),
        )
    return result


def table(results: list[dict], prompts: int) -> str:
    lines = [
        f"| model | images | reuse, 1 prompt (img/s) | reuse, {prompts} prompts (img/s) | "
        f"naive, {prompts} prompts (img/s) | time {prompts} / time 1, reuse (per run) | "
        f"time naive {prompts} / time reuse 1 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        naive = (
            f"{r['images_per_s_naive_p']:.3g} ({r['naive_runs']} run{'s' if r['naive_runs'] > 1 else ''})"
            if "images_per_s_naive_p" in r
            else "not run"
        )
        per_run = ", ".join(f"{x:.2f}" for x in r["ratio_per_run"])
        lines.append(
            f"| {r['model']} | {r['images']} x {r['image_size']} | {r['images_per_s_reuse_1']:.3g} | "
            f"{r['images_per_s_reuse_p']:.3g} | {naive} | {r['time_ratio_p_over_1']:.2f} ({per_run}) | "
            f"{r.get('time_ratio_naive_p_over_reuse_1', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        action="append",
        help="tiny, vit-base, or a SAM id/folder; repeat for several (default: tiny and vit-base)",
    )
    p.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=None,
        help="images per model (one value, or one per --model; default 16 for tiny, 1 otherwise)",
    )
    p.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"), help="image size")
    p.add_argument("--prompts", type=int, default=5, help="boxes per image in the P-prompt ways")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder batch")
    p.add_argument("--runs", type=int, default=3, help="runs of the reuse ways (medians are reported)")
    p.add_argument(
        "--naive-runs",
        type=int,
        nargs="+",
        default=None,
        help="runs of the naive way (one value, or one per --model; default: --runs; 0 skips it)",
    )
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    models = args.model or ["tiny", "vit-base"]

    def per_model(values, default):
        if values is None:
            return [default(m) for m in models]
        if len(values) == 1:
            return values * len(models)
        if len(values) != len(models):
            p.error(f"give one value or one per --model ({len(models)})")
        return values

    images = per_model(args.images, lambda m: 16 if m == "tiny" else 1)
    naive_runs = per_model(args.naive_runs, lambda m: args.runs)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, nr in zip(models, images, naive_runs):
            run_args = argparse.Namespace(**{**vars(args), "images": n, "naive_runs": nr})
            t = time.perf_counter()
            results.append(bench_model(name, run_args, Path(tmp)))
            results[-1]["wall_seconds"] = round(time.perf_counter() - t, 1)
            print(f"{name}: done in {results[-1]['wall_seconds']} s", file=sys.stderr)
    command = "python scripts/bench_segment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    )
    print(f"Command: `{command.strip()}`\n\nMachine: {machine}.\n")
    print(table(results, args.prompts))
    if args.output:
        Path(args.output).write_text(
            json.dumps({"command": command, "machine": machine, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
