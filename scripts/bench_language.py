#!/usr/bin/env python
"""Throughput of the language stage: batched LLM phrase extraction against one item at a time.

    python scripts/bench_language.py                                  # a tiny random Qwen2 built here (offline)
    python scripts/bench_language.py --llm Qwen/Qwen2.5-1.5B-Instruct # a real model (GPU machine)

Both ways generate exactly ``--max-new-tokens`` tokens per item (end-of-text is suppressed by
``min_new_tokens``), so the comparison is of equal work. Each way runs ``--runs`` times, interleaved;
the reported throughput is the median, and the ratio is the median of the per-run ratios.
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

CAPTIONS = [
    ("a photo of a dog on the grass in a park", "dog"),
    ("a red car parked on a street next to a tree", "car"),
    ("a bird sitting on a branch under a blue sky", "bird"),
    ("a cat sleeping in a cardboard box", "cat"),
    ("a fish in an aquarium with plants", "fish"),
    ("a man riding a horse on a beach", "horse"),
    ("a guitar leaning against a brick wall", "guitar"),
    ("a boat on a lake at sunset", "boat"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", help="model id or folder (default: a tiny random Qwen2 built offline)")
    p.add_argument("--items", type=int, default=32, help="captions to extract from (cycled)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--output", help="also write the result as JSON here")
    args = p.parse_args(argv)

    import torch

    from augment.extract import LLMExtractor
    from augment.tiny import build_tiny_chat_llm

    tmp = None
    model = args.llm
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = build_tiny_chat_llm(Path(tmp.name) / "tiny-llm")
    ex = LLMExtractor.from_pretrained(model, device=args.device, max_new_tokens=args.max_new_tokens)
    gen = ex.generate
    gen.generate_kwargs = {"min_new_tokens": args.max_new_tokens}
    items = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.items)]
    convs = [ex.messages(c, lab) for c, lab in items]

    def timed(batch_size: int) -> float:
        if gen.model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(0, len(convs), batch_size):
            gen(convs[s : s + batch_size])
        if gen.model.device.type == "cuda":
            torch.cuda.synchronize()
        return len(convs) / (time.perf_counter() - t)

    gen(convs[:2])  # warm-up
    batched, single = [], []
    for _ in range(args.runs):
        batched.append(timed(args.batch_size))
        single.append(timed(1))
    ratios = [b / s for b, s in zip(batched, single)]
    result = {
        "command": "python scripts/bench_language.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.llm or "tiny random Qwen2 (hidden 64, 2 layers)",
        "device": str(gen.model.device),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "items": args.items,
        "batch_size": args.batch_size,
        "new_tokens_per_item": args.max_new_tokens,
        "items_per_s_batched": round(statistics.median(batched), 2),
        "items_per_s_one_at_a_time": round(statistics.median(single), 2),
        "batched_over_one_at_a_time": round(statistics.median(ratios), 2),
        "ratio_per_run": [round(r, 2) for r in ratios],
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
