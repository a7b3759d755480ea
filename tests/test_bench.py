"""The benchmark harness's pieces, at toy sizes (the numbers themselves live in docs/BENCHMARKS.md)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench  # noqa: E402


def entry(mr, gap):
    return {
        "mixed_rand": {"mean": sum(mr) / len(mr), "min": min(mr), "max": max(mr)},
        "bg_gap": {"mean": sum(gap) / len(gap), "min": min(gap), "max": max(gap)},
    }


def test_verdict_needs_a_margin_beyond_the_seed_spread():
    base = entry([90, 92, 94], [3, 4, 5])
    close = {"InfoNCE": base, "SupCon": entry([93, 94, 95], [2.5, 3, 3.5])}  # +2 < spread 4
    assert bench.verdict(close).startswith("no loss of the family beats InfoNCE")
    far = {"InfoNCE": base, "SupCon": entry([98, 98.5, 99], [3, 4, 5])}  # +6.5 > spread 4
    assert bench.verdict(far).startswith("SupCon beats InfoNCE (mixed_rand +6.5")


def test_gpu_step_costs_path_runs_on_cpu_with_a_tiny_resnet():
    from transformers import ResNetConfig

    cfg = ResNetConfig(
        num_labels=9, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    r = bench.gpu_step_costs(batch_size=4, resolution=32, repeats=2, device="cpu", config=cfg)
    assert r["step_ms"]["erm"] > 0 and r["step_ms"]["clad"] > 0
    assert r["train_step_ratio_clad_over_erm"] == pytest.approx(
        r["step_ms"]["clad"] / r["step_ms"]["erm"], rel=1e-2
    )
    assert "peak_memory_gib" not in r  # CUDA only


def test_generation_throughput_times_every_generator(tmp_path):
    r = bench.generation_throughput(images=2, steps=2, runs=1, work=tmp_path)
    assert set(r["images_per_second"]) == {
        "composite (cut-and-paste positive)",
        "inpaint positive (tiny pipeline)",
        "inpaint remove (tiny pipeline)",
        "instruct-pix2pix swap (tiny pipeline)",
        "img2img, strength 0.5 (tiny pipeline)",
    }
    assert all(v > 0 for v in r["images_per_second"].values())
    md = bench.markdown(
        {
            "machine": bench.machine(),
            "command": "x",
            "date": "d",
            "generation": {**r, "command": "x", "date": "d"},
        }
    )
    assert "| inpaint remove (tiny pipeline) |" in md
