"""Where the language and vision models of the generation job run: device, dtype, revision."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_model_ref", "process_state", "resolve_device", "resolve_dtype", "model_info"]


def process_state(device: str | None = None):
    """Accelerate's ``PartialState`` of this process (which one of how many, and its device).

    Without a GPU, with ``device`` ``cpu`` or with ``ACCELERATE_USE_CPU=1`` it is the CPU state, so
    that ``accelerate launch --multi_gpu --num_processes N`` still starts N processes that see each
    other (over gloo). The state is made once per process; later calls return the same one.
    """
    import torch
    from accelerate import PartialState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # not launched as several processes
        return PartialState()

    has_accelerator = torch.cuda.is_available() or (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )
    cpu = (
        not has_accelerator
        or (device or "").startswith("cpu")
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    )
    return PartialState(cpu=cpu)


def resolve_device(device: str | None = None) -> str:
    """``device`` as given, else Accelerate's device for this process (a GPU when there is one).

    Accelerate's choice honours ``ACCELERATE_USE_CPU=1`` and, under ``accelerate launch``, gives each
    process its own GPU; so does a bare ``cuda`` when several processes run.
    """
    from accelerate import PartialState

    state = PartialState()
    if device == "cuda" and state.num_processes > 1 and state.device.type == "cuda":
        return str(state.device)
    return device or str(state.device)


def resolve_dtype(device: str, dtype: str | None = None):
    """The torch dtype for ``dtype`` (``float32``, ``float16``, ``bfloat16``); default bfloat16 on a
    GPU and float32 elsewhere (half precision is slower than float32 on most CPUs)."""
    import torch

    if not dtype:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return getattr(torch, dtype)


def model_info(model_id: str, model, revision: str | None, dtype) -> dict[str, Any]:
    """What the dataset card and the rows' ``recipe`` record about a loaded model."""
    return {
        "model": model_id,
        "revision": revision or getattr(model.config, "_commit_hash", None),
        "dtype": str(dtype).replace("torch.", ""),
    }


def check_model_ref(ref: str, what: str = "model") -> str:
    """``ref`` if it can name a model: an existing folder, or a Hub id ``name`` / ``owner/name``.

    A path that does not exist gets a plain error here instead of the Hub client's complaint about
    the form of a repository id.
    """
    looks_local = ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref
    if looks_local and not os.path.isdir(os.path.expanduser(ref)):
        raise ValueError(f"{what} {ref}: no such folder (a Hub model id has the form owner/name)")
    return os.path.expanduser(ref) if looks_local else ref
