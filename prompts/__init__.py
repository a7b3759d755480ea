"""Prompt and caption templates, versioned as package data (``prompts/*.txt``).

``load_template(name)`` returns the text of ``prompts/<name>.txt``; templates use ``str.format``
fields. The file name carries the version (``caption_v1``), so a dataset card can record exactly
which template produced its captions.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = [
    "load_template",
    "load_json",
    "render",
    "CAPTION_SCENE",
    "CAPTION_LABEL",
    "CAPTION_BACKGROUND",
    "EXTRACT",
    "EDIT_BACKGROUND",
    "EDIT_TEXTURE",
]

CAPTION_SCENE = "caption_scene_v1"  # a photo of a {object} on {background}
CAPTION_LABEL = "caption_label_v1"  # a photo of a {label}
CAPTION_BACKGROUND = "caption_background_v1"  # a photo of {background}
EXTRACT = "extract_v1"  # the LLM's phrase extraction: system, user, repair messages and few-shot examples
EDIT_BACKGROUND = "edit_background_v1"  # ASPIRE: turn the background of {background} into {alt}
EDIT_TEXTURE = "edit_texture_v1"  # texture positives: give the {object} a {texture} texture


def _file(name: str, ext: str):
    path = resources.files(__name__) / f"{name}{ext}"
    if not path.is_file():
        available = sorted(
            p.name[: -len(ext)] for p in resources.files(__name__).iterdir() if p.name.endswith(ext)
        )
        raise FileNotFoundError(f"no prompt template {name!r}{ext} in prompts/; available: {available}")
    return path


@cache
def load_template(name: str) -> str:
    """Text of the template ``name`` (without extension), stripped of its trailing newline."""
    return _file(name, ".txt").read_text(encoding="utf-8").rstrip("\n")


def load_json(name: str) -> dict:
    """The structured template ``prompts/<name>.json`` (a fresh copy: callers may change it)."""
    import json

    path = _file(name, ".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"prompts/{name}.json is not valid JSON: {e}") from e


def render(name: str, **fields: str) -> str:
    """Fill the template ``name`` with ``fields``; a missing field raises ``KeyError`` naming it."""
    return load_template(name).format(**fields)
