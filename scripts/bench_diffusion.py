#!/usr/bin/env python
"""Throughput of batched diffusion counterfactuals: InpaintGenerator against the bare pipeline.

    python scripts/bench_diffusion.py                                # tiny model, CPU: 8 images, batch 8, 10 steps
    python scripts/bench_diffusion.py --size real --device cuda      # SD-2-inpainting-shaped, 512 px (GPU)
    python scripts/bench_diffusion.py --size real --arch sd15 --images 16 --batch-size 8

Models (random weights, built from a config, nothing downloaded):

* ``tiny``: ``augment.tiny_diffusion.build_tiny_diffusion(kind="inpaint")`` saved and loaded with
  ``from_pretrained`` (64 px, UNet blocks (32, 64), 4-block VAE, 2-layer CLIP text model, DDIM);
* ``real``: a Stable Diffusion inpainting architecture at 512 px: the UNet (9 input channels,
  blocks (320, 640, 1280, 1280), 2 layers per block), VAE (128, 256, 512, 512) and CLIP text encoder of
  ``--arch sd2`` (stabilityai/stable-diffusion-2-inpainting: OpenCLIP-H text tower, 1024 wide, 23
  layers, linear attention projections) or ``sd15`` (runwayml inpainting: CLIP-L text, 768 wide,
  12 layers); a small byte-level tokenizer stands in for CLIP's (77 tokens; the text tower's size
  and cost are the real ones, its vocabulary is smaller); DDIM. On CUDA the default dtype is bfloat16.

Three ways over the same ``--images`` random images with a centred object mask, interleaved within
each of ``--runs`` runs after ``--warmup`` untimed rounds:

* ``ours``: :meth:`InpaintGenerator.remove` (or ``--operation positive``) with ``--batch-size``: mask
  dilation, resizing, per-item generators, one pipeline call per batch, outputs resized back and the
  kept pixels copied from the input;
* ``bare``: the diffusers pipeline called directly on the same batches (images and masks already at
  the working size, the same prompts, negative prompt, steps, guidance and per-item generators,
  PIL output): what our code adds is the difference;
* ``one at a time``: :meth:`InpaintGenerator.remove` with batch size 1.

Reported: median images/s of each way, and the medians of the per-run ratios ours/bare (target
>= 0.9) and batched/one-at-a-time (target >= 2); on CUDA also the peak GPU memory of each way
(``torch.cuda.max_memory_allocated``). Prints a markdown table (and JSON with ``--output``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {
    # text tower (hidden, layers, heads, intermediate, act), UNet cross-attention width, head dims,
    # linear projections
    "sd2": dict(text=(1024, 23, 16, 4096, "gelu"), cross=1024, heads=(5, 10, 20, 20), linear=True),
    "sd15": dict(text=(768, 12, 12, 3072, "quick_gelu"), cross=768, heads=8, linear=False),
}


def build_real_pipeline(arch: str, device: str, dtype, tmp: Path):
    """An SD inpainting pipeline of the ``arch`` architecture at 512 px with random weights."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from augment.tiny_diffusion import build_tiny_clip_text

    spec = ARCHS[arch]
    tokenizer, _ = build_tiny_clip_text(tmp / "tokenizer77", seed=0, max_length=77)
    hidden, layers, heads, inter, act = spec["text"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise the weights where they will run (fast on a GPU)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=inter,
                hidden_act=act,
                projection_dim=hidden,
                max_position_embeddings=77,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=9,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=spec["cross"],
            attention_head_dim=spec["heads"],
            use_linear_projection=spec["linear"],
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=512,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(device)
    if dtype != torch.float32:  # diffusers warns on every cast, even with nothing to keep in float32
        pipe.to(dtype=dtype)
    return pipe


class TimedPipe:
    """Forwards to the pipeline and adds up the seconds spent inside its calls."""

    def __init__(self, pipe, sync):
        self._pipe, self._sync, self.seconds = pipe, sync, 0.0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        self._sync()
        t = time.perf_counter()
        out = self._pipe(**kwargs)
        self._sync()
        self.seconds += time.perf_counter() - t
        return out


def load(args, tmp: Path):
    from augment.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    if args.size == "tiny":
        from diffusers import AutoPipelineForInpainting

        from augment.tiny_diffusion import build_tiny_diffusion

        path = build_tiny_diffusion(tmp / "tiny-inpaint", kind="inpaint", seed=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = AutoPipelineForInpainting.from_pretrained(path, torch_dtype=dtype).to(device)
        label = "tiny random SD inpainting (64 px, UNet (32, 64), 4-block VAE, 2-layer CLIP text)"
    else:
        pipe = build_real_pipeline(args.arch, device, dtype, tmp)
        label = f"{args.arch} inpainting architecture (512 px), random weights"
    pipe.set_progress_bar_config(disable=True)
    return pipe, label, device, str(dtype).replace("torch.", "")


def bench(args, tmp: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from augment.imageops import mask_image
    from augment.synthesize.diffusion_common import cover_mask, generators, native_resolution, resize_image
    from augment.synthesize.inpaint import InpaintGenerator

    pipe, label, device, dtype = load(args, tmp)
    res = native_resolution(pipe)
    h, w = args.image_size or (res, res)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.images)]
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = True
    masks = [mask] * args.images
    prompts = [f"grass {i}" for i in range(args.images)]  # short: the tiny tokenizer keeps 16 tokens
    seeds = list(range(args.images))
    cuda = str(device).startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    settings = dict(steps=args.steps, guidance=args.guidance)
    timed = TimedPipe(pipe, sync)  # time inside the pipeline calls of "ours": the rest is our code
    ours = InpaintGenerator(timed, batch_size=args.batch_size, **settings)
    single = InpaintGenerator(pipe, batch_size=1, **settings)
    op = args.operation

    # the bare pipeline's inputs, prepared once, untimed: what our generator computes per call
    repaint = [ours.regions(op, m)[0] for m in masks]
    bare_images = [Image.fromarray(resize_image(im, res)) for im in images]
    bare_masks = [mask_image(cover_mask(r, res)) for r in repaint]
    outside: list[float] = []  # seconds of each timed "ours" run spent outside the pipeline calls

    def run_ours(gen) -> float:
        sync()
        timed.seconds = 0.0
        t = time.perf_counter()
        out = getattr(gen, op)(images, masks, prompts, seeds)
        sync()
        assert len(out.images) == len(images)
        elapsed = time.perf_counter() - t
        if gen is ours:
            outside.append(elapsed - timed.seconds)
        return elapsed

    def run_bare() -> float:
        sync()
        t = time.perf_counter()
        for s in range(0, len(images), args.batch_size):
            e = min(s + args.batch_size, len(images))
            out = pipe(
                prompt=prompts[s:e],
                image=bare_images[s:e],
                mask_image=bare_masks[s:e],
                height=res,
                width=res,
                strength=ours.strength,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                negative_prompt=[ours.negative_prompt] * (e - s),
                generator=generators(seeds[s:e]),
            )
            assert len(out.images) == e - s
        sync()
        return time.perf_counter() - t

    ways = {"ours": lambda: run_ours(ours), "bare": run_bare, "single": lambda: run_ours(single)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    peak: dict[str, int] = {k: 0 for k in ways}
    for _ in range(args.warmup):
        for fn in ways.values():
            fn()
    outside.clear()
    for r in range(args.runs):
        done = []
        for name, fn in ways.items():
            if name == "single" and r >= args.single_runs:
                continue
            done.append(name)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[name].append(fn())
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
        print(
            f"run {r + 1}/{args.runs}: "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if k in done),
            file=sys.stderr,
        )
    n = len(images)
    over_bare = [b / o for o, b in zip(times["ours"], times["bare"])]
    over_single = [s / o for o, s in zip(times["ours"], times["single"])]
    result = {
        "model": label,
        "device": str(device),
        "dtype": dtype,
        "operation": op,
        "images": n,
        "image_size": f"{h}x{w}",
        "resolution": res,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "runs": args.runs,
        "single_runs": len(times["single"]),
        "images_per_s_ours": round(n / statistics.median(times["ours"]), 3),
        "images_per_s_bare": round(n / statistics.median(times["bare"]), 3),
        "images_per_s_single": round(n / statistics.median(times["single"]), 3),
        "ratio_ours_over_bare": round(statistics.median(over_bare), 3),
        "ratio_ours_over_bare_per_run": [round(x, 3) for x in over_bare],
        "ratio_batched_over_single": round(statistics.median(over_single), 3),
        "ratio_batched_over_single_per_run": [round(x, 3) for x in over_single],
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ms_outside_pipeline_per_image": round(1000 * statistics.median(outside) / n, 3),
        "share_outside_pipeline": round(statistics.median(o / t for o, t in zip(outside, times["ours"])), 4),
    }
    result["target_ours_over_bare_0.9"] = result["ratio_ours_over_bare"] >= 0.9
    result["target_batched_over_single_2"] = result["ratio_batched_over_single"] >= 2.0
    if cuda:
        result["peak_gpu_mib"] = {k: round(v / 2**20) for k, v in peak.items()}
    return result


def table(r: dict) -> str:
    def per_run(xs):
        return ", ".join(f"{x:.2f}" for x in xs)

    lines = [
        "| model | device, dtype | images (batch) | steps | ours (img/s) | bare pipeline (img/s) | "
        "one at a time (img/s) | ours / bare (per run) | batched / one at a time (per run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['model']} | {r['device']}, {r['dtype']} | {r['images']} x {r['image_size']} ({r['batch_size']}) | "
        f"{r['steps']} | {r['images_per_s_ours']:.3g} | {r['images_per_s_bare']:.3g} | "
        f"{r['images_per_s_single']:.3g} | {r['ratio_ours_over_bare']:.2f} ({per_run(r['ratio_ours_over_bare_per_run'])}) | "
        f"{r['ratio_batched_over_single']:.2f} ({per_run(r['ratio_batched_over_single_per_run'])}) |",
    ]
    lines.append(
        f"\nOur code outside the pipeline calls (resizing, masks, generators, restoring pixels, PIL output): "
        f"{r['ms_outside_pipeline_per_image']:.2f} ms per image, {100 * r['share_outside_pipeline']:.1f}% of the "
        "batched run (median)."
    )
    if "peak_gpu_mib" in r:
        p = r["peak_gpu_mib"]
        lines.append(
            f"\nPeak GPU memory (MiB): ours {p['ours']}, bare {p['bare']}, one at a time {p['single']}."
        )
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines.append(
        f"\nTargets: ours / bare >= 0.9: {met(r['target_ours_over_bare_0.9'])}; "
        f"batched / one at a time >= 2: {met(r['target_batched_over_single_2'])}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "real"), default="tiny", help="model size (default tiny)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd2", help="architecture of --size real")
    p.add_argument("--operation", choices=("remove", "positive"), default="remove")
    p.add_argument("--images", type=int, default=8, help="images per way and run")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (ours and bare)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input image size (default: the working resolution, so nothing is resized)",
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs (medians reported)")
    p.add_argument("--single-runs", type=int, help="runs of the one-at-a-time way (default --runs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every way first")
    p.add_argument("--device", help="torch device (default: Accelerate's, i.e. cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="default: bfloat16 on CUDA")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--output", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.single_runs is None:
        args.single_runs = args.runs
    if min(args.images, args.batch_size, args.steps, args.runs, args.single_runs) < 1:
        p.error("--images, --batch-size, --steps, --runs and --single-runs must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(args, Path(tmp))
    result["wall_seconds"] = round(time.perf_counter() - t, 1)
    command = "python scripts/bench_diffusion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    )
    print(f"Command: `{command.strip()}`\n\nMachine: {machine}. Wall time {result['wall_seconds']} s.\n")
    print(table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            json.dumps({"command": command, "machine": machine, "result": result}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
