"""Shared fixtures: tiny datasets built with the real pipeline, tiny models saved and reloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_script(
    args: list[str], env: dict | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the test interpreter's environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def python_script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / name), *args]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, processes: int = 1) -> list[str]:
    """``accelerate launch`` with this interpreter; two processes use --multi_gpu (gloo on CPU)."""
    base = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if processes > 1:
        base += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    else:
        base += ["--num_processes", "1"]
    return base + list(args)


TINY_GENERATE = dict(
    num_classes=3,
    image_size=32,
    train_per_class=8,
    validation_per_class=4,
    test_per_class=6,
    seed=0,
    progress=False,
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 3-class, 32-px synthetic counterfactual dataset written by the real pipeline."""
    from augment.pipeline import GenerateConfig, run

    out = tmp_path_factory.mktemp("data") / "tiny"
    run(GenerateConfig(output=str(out), **TINY_GENERATE))
    return out
