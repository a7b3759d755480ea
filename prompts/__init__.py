"""Prompt and caption templates, versioned as package data (``prompts/*.txt``).

``load_template(name)`` returns the text of ``prompts/<name>.txt``; templates use ``str.format``
fields. The file name carries the version (``caption_v1``), so a dataset card can record exactly
which template produced its captions.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["load_template", "render", "CAPTION_SCENE", "CAPTION_LABEL", "CAPTION_BACKGROUND"]

CAPTION_SCENE = "caption_scene_v1"  # a photo of a {object} on {background}
CAPTION_LABEL = "caption_label_v1"  # a photo of a {label}
CAPTION_BACKGROUND = "caption_background_v1"  # a photo of {background}


@cache
def load_template(name: str) -> str:
    """Text of the template ``name`` (without extension), stripped of its trailing newline."""
    path = resources.files(__name__) / f"{name}.txt"
    if not path.is_file():
        available = sorted(
            p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".txt")
        )
        raise FileNotFoundError(f"no prompt template {name!r} in prompts/; available: {available}")
    return path.read_text(encoding="utf-8").rstrip("\n")


def render(name: str, **fields: str) -> str:
    """Fill the template ``name`` with ``fields``; a missing field raises ``KeyError`` naming it."""
    return load_template(name).format(**fields)
