"""What the project lets a model or dataset repository do, and what it never writes out.

Every ``from_pretrained`` and ``load_dataset`` of the project takes its keyword arguments from here:

* **no remote code**: ``trust_remote_code=False`` unless the run says ``--trust-remote-code``. A
  repository whose config asks for its own Python classes then fails to load with the library's
  message instead of running code from the repository. (``datasets`` >= 4 runs no dataset
  scripts at all; the keyword is passed only to versions that take it.)
* **safetensors weights**: model and pipeline loaders get ``use_safetensors=True``, so a repository
  with only pickled ``*.bin`` weights fails to load. ``--allow-bin-weights`` lifts this for such
  older repositories (``use_safetensors=None``: safetensors when present, else ``.bin``); the
  installed transformers and diffusers then read ``.bin`` files with ``torch.load(weights_only=True)``.
  Tokenizers, processors and configs are JSON / text and take no weights argument.
* **checkpoints read with torch.load** (the original SAM ``.pth`` files) go through
  :func:`load_weights`: ``weights_only=True``, so a pickle that would build arbitrary objects is
  refused with an error naming the file.
* **the Hub token** is read by huggingface_hub itself (``HF_TOKEN`` or the login cache) and is never
  a field of any settings object; :func:`redact` removes it from any text that is shown or written
  (error messages included).

The policy is process-wide (:func:`configure`), set once from the command line by each script, so that
loaders deep inside the stages need no extra arguments.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class LoadPolicy:
    """``trust_remote_code``: let repositories run their own code; ``allow_bin_weights``: accept
    pickled ``.bin`` weights when a repository has no safetensors."""

    trust_remote_code: bool = False
    allow_bin_weights: bool = False


_POLICY = LoadPolicy()


def configure(trust_remote_code: bool = False, allow_bin_weights: bool = False) -> LoadPolicy:
    """Set the process-wide policy (both off is the safe default); returns it."""
    global _POLICY
    _POLICY = LoadPolicy(bool(trust_remote_code), bool(allow_bin_weights))
    return _POLICY


def policy() -> LoadPolicy:
    """The policy in force."""
    return _POLICY


def weights_kwargs() -> dict[str, Any]:
    """``use_safetensors`` for a loader of weights alone (a diffusers model class)."""
    return {"use_safetensors": None if _POLICY.allow_bin_weights else True}


def model_kwargs() -> dict[str, Any]:
    """Keyword arguments for a model or pipeline ``from_pretrained`` (code and weights)."""
    return {"trust_remote_code": _POLICY.trust_remote_code, **weights_kwargs()}


def code_kwargs() -> dict[str, Any]:
    """Keyword arguments for a tokenizer, processor or config ``from_pretrained`` (no weights)."""
    return {"trust_remote_code": _POLICY.trust_remote_code}


def dataset_kwargs(load_dataset=None) -> dict[str, Any]:
    """Keyword arguments for ``datasets.load_dataset``: ``trust_remote_code`` where it is a parameter."""
    if load_dataset is None:
        from datasets import load_dataset
    params = inspect.signature(load_dataset).parameters
    return {"trust_remote_code": _POLICY.trust_remote_code} if "trust_remote_code" in params else {}


def describe() -> dict[str, Any]:
    """The policy as the dataset card records it."""
    return {
        "trust_remote_code": _POLICY.trust_remote_code,
        "weights": "safetensors or .bin (weights_only)" if _POLICY.allow_bin_weights else "safetensors only",
    }


def load_weights(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a ValueError naming the file when the pickle
    holds anything but tensors and plain containers (it is never executed)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{what} {os.fspath(path)!r} is not a plain weights file: it asks to unpickle Python objects "
            f"beyond tensors, which is refused ({first}). Convert it to safetensors or a plain state dict."
        ) from e


# what a Hugging Face access token looks like (user and organisation tokens)
_TOKEN_PATTERN = re.compile(r"\b(hf|api_org)_[A-Za-z0-9]{20,}\b")


def _known_tokens() -> list[str]:
    tokens = [os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        tokens.append(get_token())
    except Exception:  # no huggingface_hub or an unreadable login cache: nothing more to hide
        pass
    return sorted({t for t in tokens if t and len(t) >= 8}, key=len, reverse=True)


def redact(text: str, extra: list[str] | None = None) -> str:
    """``text`` with the Hub token (and anything shaped like one, and ``extra`` secrets) replaced."""
    for secret in [*(extra or []), *_known_tokens()]:
        if secret:
            text = text.replace(secret, "<redacted>")
    return _TOKEN_PATTERN.sub("<redacted>", text)


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--trust-remote-code`` and ``--allow-bin-weights`` (both off by default)."""
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let model repositories run their own Python code (transformers/diffusers "
        "trust_remote_code); off by default: such a repository then fails to load",
    )
    parser.add_argument(
        "--allow-bin-weights",
        action="store_true",
        help="accept pickled .bin weights from repositories that ship no safetensors (read with "
        "torch.load(weights_only=True)); off by default: only safetensors weights are loaded",
    )
