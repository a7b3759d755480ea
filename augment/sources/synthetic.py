"""The built-in benchmark: procedurally drawn objects on class-correlated textured backgrounds.

Each class is an object shape family (circle, square, triangle, ...) drawn with a random pose, scale,
colour and position; each background family is a texture with its own palette (striped wallpaper,
green grass, a brick wall, ...). In every split the background family equals the class with
probability ``rho`` and is drawn uniformly from the other families otherwise, so the background is a
shortcut that predicts the label almost as well as the object does, exactly as in natural data (the
test split keeps the correlation, as natural test sets do). Every image comes with its exact
foreground mask and a caption ``"a photo of a {object} on {background}"``.

Everything is a pure function of ``(seed, split, index)``: item ``i`` is the same image whatever else
is generated, so random access, sharding and resuming are free.

:class:`SyntheticTextures` (``--bias texture``) is the same recipe with the shortcut moved onto the
object: the shapes are filled with a texture whose family equals the class with probability ``rho``,
on a plain background drawn independently of the class. Its ``bg_label`` column holds the texture
family (the group accounting then counts (shape, texture) groups). Besides train / validation / test
it has three test splits that separate the two cues: ``cue_conflict`` (one class's shape with another
class's texture, labelled by the shape), ``silhouette`` (the shape filled with one flat dark colour,
``bg_label`` -1) and ``texture_only`` (a large square filled with a texture, labelled by the class the
texture belongs to).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from prompts import CAPTION_SCENE, render

from ..seeding import item_rng
from .base import Sample, Source

# ----------------------------------------------------------------------------------------------
# Objects: polygons in unit coordinates (radius about 1), optionally with a hole drawn in black.
# ----------------------------------------------------------------------------------------------


def _circle(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, phase=-np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(w: float = 0.34) -> np.ndarray:
    return np.array(
        [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ],
        dtype=float,
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


def _arrow() -> np.ndarray:
    return np.array([(-1, -0.28), (0.15, -0.28), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.28), (-1, 0.28)])


def _lshape() -> np.ndarray:
    return np.array([(-0.8, -1), (-0.15, -1), (-0.15, 0.35), (0.8, 0.35), (0.8, 1), (-0.8, 1)], dtype=float)


def _bowtie() -> np.ndarray:
    return np.array([(-1, -0.85), (0, -0.12), (1, -0.85), (1, 0.85), (0, 0.12), (-1, 0.85)], dtype=float)


def _semicircle() -> np.ndarray:
    t = np.linspace(0, np.pi, 32)
    return np.stack([np.cos(t), 0.5 - np.sin(t)], axis=1)


# name -> (outline, holes)
OBJECTS: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {
    "circle": (_circle(), []),
    "square": (_regular(4, 1.0, phase=np.pi / 4), []),
    "triangle": (_regular(3, 1.05), []),
    "star": (_star(), []),
    "cross": (_cross(), []),
    "ring": (_circle(), [_circle(r=0.55)]),
    "heart": (_heart(), []),
    "crescent": (_circle(), [_circle(r=0.86, cx=0.5, cy=-0.1)]),
    "arrow": (_arrow(), []),
    "L-block": (_lshape(), []),
    "bowtie": (_bowtie(), []),
    "half-disc": (_semicircle(), []),
}
OBJECT_NAMES = list(OBJECTS)

# ----------------------------------------------------------------------------------------------
# Backgrounds: textures with their own palettes, as float RGB arrays of shape (H, W, 3).
# ----------------------------------------------------------------------------------------------


def _palette(
    rng: np.random.Generator, colours: list[tuple[int, int, int]], jitter: float = 12.0
) -> np.ndarray:
    base = np.asarray(colours, dtype=np.float32)
    return np.clip(base + rng.normal(0, jitter, size=(1, 3)) + rng.normal(0, jitter / 2, base.shape), 0, 255)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[..., None].astype(np.float32)
    return a * (1 - t) + b * t


def _rotated(rng, yy, xx, angle_center: float, angle_jitter: float):
    a = angle_center + rng.uniform(-angle_jitter, angle_jitter)
    return xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)


def _bg_stripes(rng, yy, xx):
    p = _palette(rng, [(200, 40, 45), (240, 228, 196)])
    _, v = _rotated(rng, yy, xx, 0.0, 0.25)
    t = ((v + rng.uniform(0, 100)) / rng.uniform(6, 10)) % 1.0 < 0.5
    return _mix(p[0], p[1], t)


def _bg_checker(rng, yy, xx):
    p = _palette(rng, [(30, 50, 140), (150, 190, 240)])
    u, v = _rotated(rng, yy, xx, 0.0, 0.2)
    s = rng.uniform(8, 12)
    t = (np.floor((u + rng.uniform(0, s)) / s) + np.floor((v + rng.uniform(0, s)) / s)) % 2
    return _mix(p[0], p[1], t)


def _bg_dots(rng, yy, xx):
    p = _palette(rng, [(245, 215, 70), (120, 70, 20)])
    s, r = rng.uniform(9, 13), rng.uniform(2.0, 3.5)
    u, v = (xx + rng.uniform(0, s)) % s - s / 2, (yy + rng.uniform(0, s)) % s - s / 2
    return _mix(p[0], p[1], np.hypot(u, v) < r)


def _bg_waves(rng, yy, xx):
    p = _palette(rng, [(20, 40, 110), (40, 160, 170), (235, 245, 250)])
    q, per = rng.uniform(14, 24), rng.uniform(7, 11)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (yy / per + 0.35 * np.sin(2 * np.pi * xx / q + rng.uniform(0, 6.3))))
    img = _mix(p[0], p[1], t)
    return np.where((t > 0.93)[..., None], p[2], img)


def _smooth_noise(rng, yy, xx, n: int = 6, fmin: float = 0.05, fmax: float = 0.25):
    acc = np.zeros_like(xx, dtype=np.float32)
    for _ in range(n):
        f = rng.uniform(fmin, fmax)
        a = rng.uniform(0, np.pi)
        acc += np.sin(f * (xx * np.cos(a) + yy * np.sin(a)) + rng.uniform(0, 6.3))
    return (acc - acc.min()) / (np.ptp(acc) + 1e-6)


def _bg_grass(rng, yy, xx):
    p = _palette(rng, [(25, 90, 25), (110, 190, 60)])
    blades = 0.5 + 0.5 * np.sin(xx * rng.uniform(1.2, 1.8) + 3 * _smooth_noise(rng, yy, xx, 3, 0.1, 0.3))
    return _mix(p[0], p[1], 0.55 * blades + 0.45 * _smooth_noise(rng, yy, xx))


def _bg_bricks(rng, yy, xx):
    p = _palette(rng, [(170, 60, 40), (195, 190, 180)])
    h = rng.uniform(6, 9)
    w = 2 * h
    y0, x0 = yy + rng.uniform(0, h), xx + rng.uniform(0, w)
    row = np.floor(y0 / h)
    xs = x0 + (row % 2) * w / 2
    mortar = ((y0 % h) < 1.2) | ((xs % w) < 1.2)
    brick_id = row * 1000 + np.floor(xs / w)
    shade = 0.85 + 0.3 * ((np.sin(brick_id * 12.9898) * 43758.5453) % 1.0)
    img = p[0] * shade[..., None]
    return np.where(mortar[..., None], p[1], img)


def _bg_diagonal(rng, yy, xx):
    p = _palette(rng, [(110, 40, 140), (240, 140, 200)])
    _, v = _rotated(rng, yy, xx, np.pi / 4, 0.2)
    t = ((v + rng.uniform(0, 100)) / rng.uniform(7, 11)) % 1.0 < 0.5
    return _mix(p[0], p[1], t)


def _bg_sky(rng, yy, xx):
    p = _palette(rng, [(80, 140, 225), (170, 210, 250), (250, 250, 252)])
    h = yy.shape[0]
    img = _mix(p[0], p[1], yy / max(h - 1, 1))
    clouds = np.zeros_like(xx, dtype=np.float32)
    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(0, xx.shape[1]), rng.uniform(0, h)
        s = rng.uniform(3, 8) * h / 64
        clouds += np.exp(-(((xx - cx) / (2 * s)) ** 2 + ((yy - cy) / s) ** 2))
    return _mix(img, p[2], np.clip(clouds, 0, 1))


def _bg_dunes(rng, yy, xx):
    p = _palette(rng, [(225, 195, 135), (200, 120, 50)])
    t = 0.5 + 0.5 * np.sin(
        2 * np.pi * (yy / rng.uniform(14, 22)) + 2.5 * _smooth_noise(rng, yy, xx, 4, 0.04, 0.12)
    )
    return _mix(p[0], p[1], t**2)


def _bg_planks(rng, yy, xx):
    p = _palette(rng, [(115, 70, 30), (185, 125, 65)])
    w = rng.uniform(10, 16)
    x0 = xx + rng.uniform(0, w)
    grain = 0.5 + 0.5 * np.sin(x0 * rng.uniform(1.5, 2.5) + 2 * _smooth_noise(rng, yy, xx, 3, 0.05, 0.2))
    img = _mix(p[0], p[1], grain)
    return np.where(((x0 % w) < 1.0)[..., None], p[0] * 0.45, img)


def _bg_tiles(rng, yy, xx):
    p = _palette(rng, [(232, 232, 228), (110, 115, 130)])
    s, lw = rng.uniform(10, 14), rng.uniform(1.0, 2.0)
    lines = (((xx + rng.uniform(0, s)) % s) < lw) | (((yy + rng.uniform(0, s)) % s) < lw)
    return _mix(p[0], p[1], lines)


def _bg_night(rng, yy, xx):
    p = _palette(rng, [(12, 12, 40), (250, 238, 120)], jitter=6)
    stars = rng.random(xx.shape) < 0.03
    return _mix(p[0], p[1], stars)


# name -> renderer
BACKGROUNDS: dict[str, Callable] = {
    "striped wallpaper": _bg_stripes,
    "checkered tiles": _bg_checker,
    "polka-dot fabric": _bg_dots,
    "ocean waves": _bg_waves,
    "green grass": _bg_grass,
    "a brick wall": _bg_bricks,
    "diagonal stripes": _bg_diagonal,
    "a cloudy sky": _bg_sky,
    "sand dunes": _bg_dunes,
    "wooden planks": _bg_planks,
    "a tiled floor": _bg_tiles,
    "a starry night": _bg_night,
}
BACKGROUND_NAMES = list(BACKGROUNDS)
MAX_CLASSES = min(len(OBJECTS), len(BACKGROUNDS))


def render_background(family: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 texture of background ``family``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # textures are designed at 64 px; keep their scale relative to the image
    scale = 64.0 / size
    return BACKGROUNDS[BACKGROUND_NAMES[family]](rng, yy * scale, xx * scale).astype(np.float32)


def render_object_mask(
    shape: int, size: int, rng: np.random.Generator, max_rotation: float = 180.0
) -> np.ndarray:
    """A boolean (size, size) mask of object family ``shape`` at a random pose, scale and position.

    The object is rotated by an angle drawn uniformly from +-``max_rotation`` degrees.
    """
    outline, holes = OBJECTS[OBJECT_NAMES[shape]]
    radius = rng.uniform(0.25, 0.36) * size
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    margin = radius * 0.95
    cx, cy = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def place(pts: np.ndarray) -> list[tuple[float, float]]:
        q = pts @ rot.T * radius + np.array([cx, cy])
        return [tuple(p) for p in q]

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(place(outline), fill=255)
    for hole in holes:
        draw.polygon(place(hole), fill=0)
    return np.asarray(canvas) > 127


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    """Binary erosion by a plus-shaped element, ``width`` times (pixels outside the image count as background)."""
    out = mask.copy()
    for _ in range(width):
        padded = np.pad(out, 1)
        out = out & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return out


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.uniform(0, 1), rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32) * 255


class SyntheticBackgrounds(Source):
    """Built-in benchmark with a background shortcut (see the module docstring).

    Args:
        num_classes: K classes and K background families (at most ``MAX_CLASSES``).
        image_size: side of the square images in pixels.
        rho: probability that the background family equals the class, in every split.
        train_per_class, validation_per_class, test_per_class: items per class in each split.
        seed: the benchmark seed; the same seed gives the same images.
        background_contrast: textures are blended towards their mean colour by this factor (1: full
            contrast); softer textures keep the palette, the shortcut, while letting shapes stand out.
        outline: draw a dark rim (inside the mask) around objects.
        max_rotation: objects are rotated by up to this many degrees either way.
        noise: standard deviation of the per-pixel Gaussian noise added to the whole image.
    """

    name = "synthetic"

    def __init__(
        self,
        num_classes: int = 9,
        image_size: int = 64,
        rho: float = 0.95,
        train_per_class: int = 300,
        validation_per_class: int = 50,
        test_per_class: int = 100,
        seed: int = 0,
        background_contrast: float = 0.6,
        outline: bool = True,
        max_rotation: float = 180.0,
        noise: float = 6.0,
    ):
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be between 2 and {MAX_CLASSES}, got {num_classes}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be a probability, got {rho}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.rho = rho
        self.seed = seed
        self.noise = noise
        self.background_contrast = background_contrast
        self.outline = outline
        self.max_rotation = max_rotation
        self.per_class = {
            "train": train_per_class,
            "validation": validation_per_class,
            "test": test_per_class,
        }
        for split, n in self.per_class.items():
            if n < 0:
                raise ValueError(f"{split}_per_class must be >= 0, got {n}")
        self.class_names = OBJECT_NAMES[:num_classes]
        self.background_names = BACKGROUND_NAMES[:num_classes]

    def splits(self) -> list[str]:
        return [s for s, n in self.per_class.items() if n > 0]

    def size(self, split: str) -> int:
        return self.per_class[split] * self.num_classes

    def labels(self, split: str) -> np.ndarray:
        return np.arange(self.size(split)) % self.num_classes

    def background_family(self, split: str, index: int) -> int:
        """The background family of an item (equal to its class with probability rho)."""
        label = index % self.num_classes
        rng = item_rng(self.seed, f"{self.name}/{split}/{index}/background")
        if rng.random() < self.rho:
            return label
        other = int(rng.integers(self.num_classes - 1))
        return other + (other >= label)

    def load(self, split: str, index: int) -> Sample:
        if not 0 <= index < self.size(split):
            raise IndexError(f"{split} has {self.size(split)} items, asked for {index}")
        item_id = self.item_id(split, index)
        label = index % self.num_classes
        bg = self.background_family(split, index)
        rng = item_rng(self.seed, item_id)
        size = self.image_size
        background = render_background(bg, size, rng)
        if self.background_contrast != 1.0:
            mean = background.mean(axis=(0, 1), keepdims=True)
            background = mean + (background - mean) * self.background_contrast
        mask = render_object_mask(label, size, rng, self.max_rotation)
        colour = _object_colour(rng)
        # a soft directional shading so objects read as objects, not flat cut-outs
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        a = rng.uniform(0, 2 * np.pi)
        light = 0.8 + 0.35 * ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a))
        obj = np.clip(colour[None, None, :] * light[..., None], 0, 255)
        image = self._compose(mask, obj, background, rng)
        obj_name, bg_name = self.class_names[label], BACKGROUND_NAMES[bg]
        return Sample(
            id=item_id,
            split=split,
            index=index,
            image=image,
            label=label,
            mask=Image.fromarray(mask.astype(np.uint8) * 255, "L"),
            bg_label=bg,
            caption=render(CAPTION_SCENE, object=obj_name, background=bg_name),
            meta={"object": obj_name, "background": bg_name},
        )

    def _compose(
        self, mask: np.ndarray, fill: np.ndarray, background: np.ndarray, rng: np.random.Generator
    ) -> Image.Image:
        """The object's ``fill`` inside ``mask`` (its rim darkened with ``outline``) over ``background``,
        plus the item's pixel noise (drawn from ``rng``, after everything else the item draws)."""
        if self.outline:
            rim = mask & ~_erode(mask, max(1, self.image_size // 64))
            fill = np.where(rim[..., None], fill * 0.25, fill)
        img = np.where(mask[..., None], fill, background)
        img = img + rng.normal(0, self.noise, img.shape)
        return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")

    def describe(self) -> dict:
        return {
            "source": self.name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "rho": self.rho,
            "seed": self.seed,
            "background_contrast": self.background_contrast,
            "outline": self.outline,
            "max_rotation": self.max_rotation,
            "per_class": dict(self.per_class),
            "backgrounds": list(self.background_names),
        }


# ----------------------------------------------------------------------------------------------
# The texture benchmark (``--bias texture``)
# ----------------------------------------------------------------------------------------------

# adjectives of the texture families, in the order of BACKGROUNDS (family k is drawn by its k-th renderer)
TEXTURE_WORDS = [
    "striped",
    "checkered",
    "polka-dot",
    "wavy",
    "grassy",
    "brick",
    "diagonal-striped",
    "cloudy",
    "dune-patterned",
    "wood-grain",
    "tiled",
    "starry",
]
TEXTURE_SPLITS = ("cue_conflict", "silhouette", "texture_only")  # the test splits that separate the cues
PLAIN_BACKGROUND = "a plain background"


def render_texture(family: int, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float32 (H, W, 3) field of texture ``family`` (the k-th background renderer at full contrast);
    ``size`` is a side or ``(H, W)``, the pattern's scale relative to a 64-px image side."""
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = 64.0 / max(h, w)
    return BACKGROUNDS[BACKGROUND_NAMES[family]](rng, yy * scale, xx * scale).astype(np.float32)


def render_plain_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 plain background: a light, slightly tinted grey with soft shading."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (64.0 / size)
    tone = rng.uniform(140, 215) + rng.normal(0, 6, size=3)
    shade = _smooth_noise(rng, yy, xx, 3, 0.02, 0.08) - 0.5
    return (tone[None, None, :] + 24 * shade[..., None]).astype(np.float32)


class SyntheticTextures(SyntheticBackgrounds):
    """Built-in benchmark with a texture shortcut (``--bias texture``; see the module docstring).

    Args: as :class:`SyntheticBackgrounds`, with ``rho`` the probability that the texture family equals
    the class; the test splits ``cue_conflict``, ``silhouette`` and ``texture_only`` have
    ``test_per_class`` items per class each. Objects have no outline (the texture meets the plain
    background directly) and ``background_contrast`` is not used (textures are at full contrast).
    """

    name = "synthetic-texture"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("outline", False)
        super().__init__(*args, **kwargs)
        for split in TEXTURE_SPLITS:
            self.per_class[split] = self.per_class["test"]
        self.texture_names = TEXTURE_WORDS[: self.num_classes]

    def texture_family(self, split: str, index: int) -> int:
        """The texture family of an item: equal to its class with probability rho in train / validation /
        test, another class's in cue_conflict, the class's own in texture_only, -1 (none) in silhouette."""
        label = index % self.num_classes
        if split == "silhouette":
            return -1
        if split == "texture_only":
            return label
        if split == "cue_conflict":
            rng = item_rng(self.seed, f"{self.name}/{split}/{index}/texture")
            other = int(rng.integers(self.num_classes - 1))
            return other + (other >= label)
        return self.background_family(split, index)

    def load(self, split: str, index: int) -> Sample:
        if not 0 <= index < self.size(split):
            raise IndexError(f"{split} has {self.size(split)} items, asked for {index}")
        item_id = self.item_id(split, index)
        label = index % self.num_classes
        family = self.texture_family(split, index)
        rng = item_rng(self.seed, item_id)
        size = self.image_size
        background = render_plain_background(size, rng)
        if split == "texture_only":
            side = rng.uniform(0.7, 0.85) * size
            y0, x0 = (rng.uniform(0, size - side) for _ in range(2))
            yy, xx = np.mgrid[0:size, 0:size]
            mask = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
            obj_name = "patch"
        else:
            mask = render_object_mask(label, size, rng, self.max_rotation)
            obj_name = self.class_names[label]
        if family < 0:
            fill = np.full((size, size, 3), rng.uniform(20, 70), dtype=np.float32)
            words = f"{obj_name} silhouette"
        else:
            fill = render_texture(family, size, rng)
            words = f"{TEXTURE_WORDS[family]} {obj_name}"
        image = self._compose(mask, fill, background, rng)
        return Sample(
            id=item_id,
            split=split,
            index=index,
            image=image,
            label=label,
            mask=Image.fromarray(mask.astype(np.uint8) * 255, "L"),
            bg_label=family,
            caption=render(CAPTION_SCENE, object=words, background=PLAIN_BACKGROUND),
            meta={
                "object": obj_name,
                "texture": TEXTURE_WORDS[family] if family >= 0 else None,
                "background": PLAIN_BACKGROUND,
            },
        )

    def describe(self) -> dict:
        out = super().describe()
        out.pop("background_contrast")
        out.pop("backgrounds")
        return {**out, "bias": "texture", "textures": list(self.texture_names)}


def build_synthetic(bias: str = "background", **kwargs) -> SyntheticBackgrounds:
    """The built-in benchmark with a ``background`` (default) or ``texture`` shortcut."""
    if bias == "background":
        return SyntheticBackgrounds(**kwargs)
    if bias == "texture":
        return SyntheticTextures(**kwargs)
    raise ValueError(f"--bias must be background or texture, got {bias!r}")
