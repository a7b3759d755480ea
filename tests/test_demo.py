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


@pytest.mark.parametrize("script", ["generate.py", "train.py", "evaluate.py", "demo.py"])
def test_help_explains(script):
    proc = run_script(python_script(script, "--help"))
    assert "usage:" in proc.stdout and len(proc.stdout) > 800
    assert "(default:" in proc.stdout
