"""The main job end to end at a tiny size, as a subprocess, and the command-line help of every script."""

import json

import pytest

from tests.conftest import python_script, run_script


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_script(python_script("demo.py", "--output", str(out), "--preset", "tiny", "--no-progress"))
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["erm", "augment", "clad", "clad+"]
    for method, r in report["methods"].items():
        assert set(r["accuracy"]) >= {"original", "mixed_same", "mixed_rand", "only_bg_t"}, method
        assert r["bg_gap"] == pytest.approx(r["accuracy"]["mixed_same"] - r["accuracy"]["mixed_rand"])
        assert 0 <= r["challenge_accuracy"] <= 100
        assert (out / "models" / method / "model.safetensors").is_file()
        assert (out / "eval" / method / "report.png").is_file()
    assert [c["target"] for c in report["targets"]][0].startswith("clad mixed_rand")
    assert (out / "report.png").stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "| clad+ |" in md and "Targets:" in md
    assert "done in" in proc.stdout
    assert (out / "dataset" / "preview.png").is_file()
    # where the models look: alignment of Grad-CAM and input gradients with the masks, and the figure
    from PIL import Image

    from debias.report import saliency_figure_size

    for method, r in report["methods"].items():
        sal = r["saliency"]
        for kind in ("grad_cam", "input_gradients"):
            assert set(sal[kind]) >= {"iou", "dice", "mass_on_object", "num_with_mask"}, (method, kind)
            assert sal[kind]["num_with_mask"] == 18  # every test original (3 classes x 6)
            assert 0 <= sal[kind]["iou"] <= 100 and 0 <= sal[kind]["dice"] <= 100
        assert sal["layer"] == "stages.1" and sal["layer_map_size"] == "4x4"
        assert f"saliency_{method}" in report["timings_seconds"]
    with Image.open(out / "saliency.png") as im:
        assert im.size == saliency_figure_size(3, 1 + 2 * 4)  # one row per class; image + 2 maps x 4 methods
    assert "## Where the models look" in md and "(saliency.png)" in md


@pytest.mark.parametrize("script", ["generate.py", "train.py", "evaluate.py", "demo.py"])
def test_help_explains(script):
    proc = run_script(python_script(script, "--help"))
    assert "usage:" in proc.stdout and len(proc.stdout) > 800
    assert "(default:" in proc.stdout


def test_target_checks():
    from debias.demo import check_targets

    def rep(original, same, rand):
        return {
            "accuracy": {"original": original, "mixed_same": same, "mixed_rand": rand},
            "bg_gap": same - rand,
        }

    checks = check_targets(
        {"erm": rep(95.0, 95.0, 10.0), "clad": rep(99.0, 96.0, 93.0), "clad+": rep(97.0, 97.0, 90.0)}
    )
    assert [c["ok"] for c in checks] == [True, True, True, False]  # clad+ gap 7 > 5
    assert checks[0]["value"] == 83.0 and checks[2]["value"] == 4.0  # better than ERM on originals is fine
    checks = check_targets({"erm": rep(95.0, 95.0, 10.0), "clad": rep(91.0, 90.0, 20.0)})
    assert [c["ok"] for c in checks] == [False, False, False]
    assert check_targets({"clad": rep(1, 1, 1)}) == []
