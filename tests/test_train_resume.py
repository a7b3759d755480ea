"""Exact training resume: stopping at step k (a checkpoint, or the process killed with SIGKILL right after
it) and resuming gives the same final weights, bit for bit, as an uninterrupted run on CPU."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import python_script, run_script

STEPS = 7  # the tiny dataset has 3 steps per epoch at batch 8: k = 2 is mid-epoch, k = 3 an epoch boundary


def _cmd(dataset, out, method, *extra):
    return python_script(
        "train.py",
        "--dataset", str(dataset),
        "--output-dir", str(out),
        "--method", method,
        "--batch-size", "8",
        "--widths", "8", "8", "16", "16",
        "--max-train-steps", str(STEPS),
        "--checkpointing-steps", "1",
        "--checkpoints-total-limit", "100",
        "--selection-metric", "original",
        "--no-progress",
        *extra,
    )  # fmt: skip


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    runs = {}
    for method in ("clad", "erm"):
        out = tmp_path_factory.mktemp("full") / method
        run_script(_cmd(tiny_dataset, out, method))
        runs[method] = out
    return runs


@pytest.mark.parametrize("method,k", [("clad", 2), ("clad", 3), ("erm", 5)])
def test_resume_from_a_checkpoint_gives_the_same_weights(tiny_dataset, uninterrupted, tmp_path, method, k):
    full = uninterrupted[method]
    steps_per_epoch = json.loads((full / "train_summary.json").read_text())["steps_per_epoch"]
    assert steps_per_epoch == 3
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / f"checkpoint-{k}", out / f"checkpoint-{k}")
    proc = run_script(_cmd(tiny_dataset, out, method, "--resume-from-checkpoint", "latest"))
    assert f"checkpoint-{k}" in proc.stdout + proc.stderr
    _assert_same(_weights(full), _weights(out))
    # the last checkpoint equals the uninterrupted run's: optimiser moments, dictionary and counters too
    last_a, last_b = full / f"checkpoint-{STEPS}", out / f"checkpoint-{STEPS}"
    opt_a = torch.load(last_a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(last_b / "optimizer.bin", weights_only=True)["state"]
    for i in opt_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[i][key], opt_b[i][key]), (i, key)
    for f in sorted(p.name for p in last_a.glob("custom_checkpoint_*")):
        a = torch.load(last_a / f, weights_only=False)
        b = torch.load(last_b / f, weights_only=False)
        if "history" in a:  # the training log, wall-clock times aside
            for entries in (a, b):
                entries["history"] = [
                    {k: v for k, v in h.items() if k != "seconds"} for h in json.loads(entries["history"])
                ]
        assert repr(a) == repr(b), f


def test_killed_run_resumes_to_the_same_weights(tiny_dataset, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = run_script(_cmd(tiny_dataset, out, "clad"), env={"DEBIAS_FAULT_KILL_AT_STEP": "3"}, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "model.safetensors").exists()
    run_script(_cmd(tiny_dataset, out, "clad", "--resume-from-checkpoint", "latest"))
    _assert_same(_weights(uninterrupted["clad"]), _weights(out))
