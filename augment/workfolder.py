"""The work folder that makes a generation job crash-safe and resumable.

While ``scripts/generate.py`` runs, ``<output>/.work/`` holds everything finished so far::

    .work/
      settings.json                      the run's settings, compared on every rerun
      units/annotate-<split>-<k>.json    the language and segmentation stage's results for unit k
      units/generate-<split>-<k>.parquet the rows of unit k (the dataset's schema)
      units/generate-<split>-<k>.json    its manifest: row ids, rejections, inputs, the parquet's sha256

A *unit* is ``--chunk-size`` consecutive originals of one split; units do not depend on the number
of processes, so neither does anything made from them. Every file is written by :func:`atomic_write`
(temporary name, fsync, rename), and a unit counts as finished only once its last file is in place
(the annotation file; the manifest, written after the rows), so a job killed at any moment leaves finished
units and at most stray ``.tmp`` files. A rerun of the same command skips the finished units, makes
the rest, and merges all units into the dataset folder in the order of a single-process run; the
work folder is removed once the merged folder has been checked against the manifests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "FAULT_ENV",
    "WORK",
    "WorkFolder",
    "atomic_write",
    "fault_point",
    "inspect_output",
    "settings_diff",
]

WORK = ".work"
TRASH = ".work.trash"  # the work folder of a finished job, renamed before it is deleted
FAULT_ENV = "AUGMENT_FAULT"
_fault_hits: Counter = Counter()


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL at its k-th pass through point ``name`` when the environment
    variable ``AUGMENT_FAULT`` is ``name:k`` (how the crash tests stop a job at a chosen place)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, k = spec.rpartition(":")
    if point != name:
        return
    _fault_hits[name] += 1
    if _fault_hits[name] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to ``<path>.tmp``, are flushed to disk (fsync), the file is renamed over ``path``
    and the folder's entry is flushed too. A crash leaves at most a stray ``.tmp`` file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if os.environ.get(FAULT_ENV):  # the crash tests stop a write half-way through
            f.write(data[: len(data) // 2])
            f.flush()
            fault_point("partial-write")
            f.write(data[len(data) // 2 :])
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settings_diff(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: recorded -> current"`` for every key of ``current`` whose recorded value differs."""
    missing = object()
    return [
        f"{key}: {recorded.get(key, '(not recorded)')!r} -> {value!r}"
        for key, value in current.items()
        if recorded.get(key, missing) != value
    ]


def inspect_output(output: str | os.PathLike, settings: dict[str, Any], overwrite: bool) -> str:
    """What a run with ``settings`` does with the folder ``output``; reads and changes nothing.

    ``"fresh"``: start a new job (no folder, an empty one, or ``overwrite``); ``"resume"``: an
    unfinished job with the same settings is there; ``"complete"``: a finished dataset made with the
    same settings is there. Anything else raises with what differs.
    """
    out = Path(output)
    entries = [e.name for e in out.iterdir()] if out.is_dir() else []
    if overwrite or not [e for e in entries if e not in (WORK, TRASH)] and not WorkFolder(out).started():
        return "fresh"
    recorded = WorkFolder(out).read_settings()
    if recorded is not None:
        diff = settings_diff(recorded, settings)
        if diff:
            raise ValueError(
                f"{out} holds an unfinished generation made with other settings ({'; '.join(diff)}); "
                "rerun with the same flags to finish it, or pass --overwrite to start afresh"
            )
        return "resume"
    card = out / "generation.json"
    if card.is_file() and (out / "README.md").is_file():
        diff = settings_diff(json.loads(card.read_text()), settings)
        if diff:
            raise ValueError(
                f"{out} holds a finished dataset made with other settings ({'; '.join(diff)}); "
                "choose another --output or pass --overwrite to replace it"
            )
        return "complete"
    raise FileExistsError(
        f"{out} exists, is not empty and holds no generation of these settings; choose another --output "
        "or pass --overwrite"
    )


class WorkFolder:
    """``<output>/.work``: the settings and the finished units of a generation job (module docstring)."""

    def __init__(self, output: str | os.PathLike):
        self.output = Path(output)
        self.root = self.output / WORK
        self.units = self.root / "units"

    # -- the job -------------------------------------------------------------------------------
    def started(self) -> bool:
        """Whether a job has recorded its settings here (a folder without them holds nothing finished)."""
        return (self.root / "settings.json").is_file()

    def read_settings(self) -> dict[str, Any] | None:
        path = self.root / "settings.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def start(self, settings: dict[str, Any], fresh: bool) -> None:
        """Prepare the folder: a fresh job empties ``output`` first; every job drops stray temporary
        files and the trash of an earlier finished job."""
        if fresh and self.output.exists():
            shutil.rmtree(self.output)
        self.units.mkdir(parents=True, exist_ok=True)
        self.drop_trash()
        for tmp in self.units.glob("*.tmp"):
            tmp.unlink()
        if fresh:
            atomic_write(self.root / "settings.json", json.dumps(settings, indent=2, sort_keys=True).encode())

    def drop_trash(self) -> None:
        """Delete what is left of the work folder of a finished job (a crash during its deletion)."""
        shutil.rmtree(self.output / TRASH, ignore_errors=True)

    def finish(self) -> None:
        """Remove the work folder of a merged job (renamed first, so a crash half-way through the
        deletion cannot leave a work folder that looks unfinished)."""
        os.replace(self.root, self.output / TRASH)
        shutil.rmtree(self.output / TRASH)

    # -- units ---------------------------------------------------------------------------------
    def _path(self, stage: str, name: str, ext: str) -> Path:
        return self.units / f"{stage}-{name}.{ext}"

    def annotated(self, name: str) -> bool:
        return self._path("annotate", name, "json").is_file()

    def save_annotation(self, name: str, payload: dict[str, Any]) -> None:
        """Unit ``name``'s annotations as JSON (never a pickle: a rerun reads files from the output
        folder, and loading a pickle would run whatever code a planted file holds)."""
        atomic_write(self._path("annotate", name, "json"), json.dumps(_encode_annotations(payload)).encode())
        fault_point("annotate")

    def load_annotation(self, name: str) -> dict[str, Any]:
        return _decode_annotations(json.loads(self._path("annotate", name, "json").read_text()))

    def generated(self, name: str) -> bool:
        """Whether unit ``name``'s manifest is in place and its rows file has the recorded size."""
        manifest, rows = self._path("generate", name, "json"), self._path("generate", name, "parquet")
        if not manifest.is_file() or not rows.is_file():
            return False
        return json.loads(manifest.read_text())["bytes"] == rows.stat().st_size

    def commit_unit(self, name: str, data: bytes, manifest: dict[str, Any]) -> None:
        """Write unit ``name``'s rows (parquet bytes), then its manifest: the unit is finished."""
        atomic_write(self._path("generate", name, "parquet"), data)
        fault_point("shard")  # rows written, manifest not yet: the unit is redone on resume
        manifest = {**manifest, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(self._path("generate", name, "json"), json.dumps(manifest).encode())
        fault_point("unit")

    def load_unit(self, name: str) -> tuple[bytes, dict[str, Any]]:
        """Unit ``name``'s parquet bytes and manifest, checked against the manifest's checksum."""
        manifest_path = self._path("generate", name, "json")
        manifest = json.loads(manifest_path.read_text())
        data = self._path("generate", name, "parquet").read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            manifest_path.unlink()  # the next run makes the unit again
            raise RuntimeError(
                f"{self._path('generate', name, 'parquet')} does not match its manifest (the file was "
                "changed after it was written); rerun the same command to make this unit again"
            )
        return data, manifest


# -- the annotation stage's results as JSON ---------------------------------------------------------
def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def _encode_annotations(payload: dict[str, Any]) -> dict[str, Any]:
    """``{"annotations": {index: Annotation}, "rejections": [(id, stage, reason)], "phrase_masks":
    [record]}`` as plain JSON (bytes as base64)."""
    annotations = {}
    for index, a in payload["annotations"].items():
        annotations[str(index)] = {
            "caption": a.caption,
            "fg": list(a.fg),
            "bg": list(a.bg),
            "alt": list(a.alt),
            "recipe": a.recipe,
            "replaces_mask": a.replaces_mask,
            "mask_bits": _b64(None if a.mask_bits is None else a.mask_bits.tobytes()),
            "mask_shape": None if a.mask_shape is None else list(a.mask_shape),
            "mask_error": a.mask_error,
        }
    phrase_masks = [
        {**r, "mask": {"bytes": _b64(r["mask"]["bytes"]), "path": r["mask"].get("path")}}
        for r in payload["phrase_masks"]
    ]
    return {
        "annotations": annotations,
        "rejections": [list(r) for r in payload["rejections"]],
        "phrase_masks": phrase_masks,
    }


def _decode_annotations(data: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from .annotate import Annotation

    annotations = {}
    for index, a in data["annotations"].items():
        bits = _unb64(a.pop("mask_bits"))
        shape = a.pop("mask_shape")
        annotations[int(index)] = Annotation(
            **a,
            mask_bits=None if bits is None else np.frombuffer(bits, dtype=np.uint8).copy(),
            mask_shape=None if shape is None else (int(shape[0]), int(shape[1])),
        )
    phrase_masks = [
        {**r, "mask": {"bytes": _unb64(r["mask"]["bytes"]), "path": r["mask"].get("path")}}
        for r in data["phrase_masks"]
    ]
    return {
        "annotations": annotations,
        "rejections": [tuple(r) for r in data["rejections"]],
        "phrase_masks": phrase_masks,
    }
