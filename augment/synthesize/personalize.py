"""Personalised text-to-image generation: ASPIRE step 5 and DA-Fusion's per-class concepts.

Two commands (``python scripts/personalize.py {train,generate} --help``):

``train``
    For every class, fit a small adapter of a Stable-Diffusion-shaped text-to-image model on that
    class's images in a dataset folder (by default the ``positive`` rows of ``train``: the edited,
    spurious-free images), under Hugging Face Accelerate (``accelerate launch`` or plain ``python``,
    one CPU to many GPUs):

    * ``textual-inversion`` (ASPIRE, DA-Fusion): one new token per class, ``<class-name>``, whose
      embedding starts from a word of the class name (or ``object``); only that embedding row is
      trained, every other row of the embedding matrix is put back after each optimizer step.
      ASPIRE's settings are the defaults: 1000 steps, learning rate 5e-4, batch 4, 512 px. Saved as
      ``ADAPTERS/<class>/learned_embeds.safetensors`` (``{token: (1, dim) tensor}``), the format
      ``pipe.load_textual_inversion(path, token=...)`` reads.
    * ``lora`` (DreamBooth-LoRA): a peft LoRA of rank ``--rank`` on the UNet's attention projections
      (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), trained on the prompt ``"a photo of a {id} {class}"``
      (``{id}`` a rare identifier, ``sks`` by default); saved with the pipeline's ``save_lora_weights``
      as ``ADAPTERS/<class>/pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights(dir)``
      loads into the text-to-image and the inpainting pipeline alike.

    ``ADAPTERS/personalize.json`` records the method, the base model (id, requested and resolved
    revision), every class's token, image count, steps and loss summary, and the settings. Classes are
    trained one after the other, each from its own seed, so an adapter does not depend on which other
    classes were trained; a finished class is skipped by ``--resume-from-checkpoint latest``, an
    unfinished one resumes from its last ``checkpoint-{step}`` folder.

``generate``
    Load the base model with the adapters and write ``--per-class`` images per class, prompted with
    ``"a photo of a {token} in {alt}"`` where ``alt`` is one of the alternative backgrounds the
    dataset's originals of that class carry (``alt_phrases``), or ``"a photo of a {token}"`` when there
    is none (ASPIRE's prompt); image k of a class takes the class's k-th phrase, cyclically. Every image
    has its own seed, derived from ``--seed`` and its row id, and its own CPU ``torch.Generator``: its
    initial noise does not depend on the batch it falls in (the pixels are identical for the same batch
    size; across batch sizes float rounding in batched kernels can move a pixel by a level or two). The
    output is a NEW dataset folder: every row, rejection and phrase mask of the input, unchanged (ids
    kept, pixels identical), plus ``kind=generated`` rows in ``--split`` with id
    ``personalize/{folder}/generated/{k}`` (``{folder}``: :func:`class_folder`, e.g. ``dog_sled``; k
    continues after any such id already in the input), ``source_id`` ``personalize/{folder}``,
    ``bg_label`` -1, and a ``recipe`` naming the generator, method, base model and revision, adapter,
    token, prompt, negative prompt, seed, steps, guidance and the alt phrase. With ``--mask-source
    sam|grounded`` the segmentation stage (:mod:`augment.segment`) masks each image and an image it
    cannot mask is recorded in ``rejected`` (stage ``segment``) with the reason; with ``none`` the mask
    is empty and the recipe says ``{"source": "none"}``. An image the pipeline's safety checker flags is
    rejected (stage ``generate``). Generation runs in one process.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import __version__, trust
from ..dataset import KINDS
from ..seeding import item_seed
from ..segment import MODES, add_mask_arguments
from .output import CounterfactualOutput

__all__ = [
    "METHODS",
    "PersonalizeTrainConfig",
    "PersonalizeGenerateConfig",
    "PersonalizedGenerator",
    "build_parser",
    "class_folder",
    "cli",
    "generate",
    "get_dataloader",
    "initializer_word",
    "lora_phrase",
    "placeholder_token",
    "prompt_for",
    "read_manifest",
    "train",
]

METHODS = ("textual-inversion", "lora")
MANIFEST = "personalize.json"
TI_WEIGHTS = "learned_embeds.safetensors"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# ASPIRE's textual-inversion settings; DreamBooth-LoRA's usual learning rate
DEFAULT_LR = {"textual-inversion": 5e-4, "lora": 1e-4}
# prompts textual inversion trains the token in; "{}" is the token
TI_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a bright photo of a {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a rendition of a {}",
)

MASK_SOURCES = ("none", *MODES)


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def class_folder(class_name: str) -> str:
    """The adapter sub-folder of a class: its name with anything but letters, digits, ``.-_`` as ``_``."""
    name = re.sub(r"[^\w.-]+", "_", class_name.strip()).strip("._")
    return name or "class"


def placeholder_token(class_name: str) -> str:
    """The textual-inversion token of a class: ``"dog sled"`` -> ``"<dog-sled>"`` (lower case)."""
    words = re.findall(r"[0-9a-z]+", class_name.lower())
    return "<" + ("-".join(words) or "class") + ">"


def lora_phrase(class_name: str, identifier: str = "sks") -> str:
    """What stands for a class in DreamBooth-LoRA prompts: ``"sks dog"``."""
    return f"{identifier} {class_name}".strip()


def initializer_word(class_name: str, tokenizer) -> str:
    """The word a class's new embedding starts from: the last word of the class name that the
    tokenizer keeps as one token (the head noun of ``"dog sled"`` is ``"sled"``), else ``"object"``
    when that is one token, else the class name's last word (whose token embeddings are averaged)."""
    words = [w for w in re.findall(r"[A-Za-z]+", class_name.lower())]
    for word in reversed(words):
        if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
            return word
    if len(tokenizer("object", add_special_tokens=False).input_ids) == 1 or not words:
        return "object"
    return words[-1]


def prompt_for(token: str, alt: str | None) -> str:
    """``"a photo of a {token} in {alt}"``, or ASPIRE's ``"a photo of a {token}"`` without an ``alt``."""
    return f"a photo of a {token} in {alt}" if alt else f"a photo of a {token}"


def read_manifest(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``personalize.json`` of an adapter folder written by ``train``, with a clear error."""
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} has no {MANIFEST}: it is not an adapter folder written by "
            "`scripts/personalize.py train`"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("method") not in METHODS:
        raise ValueError(f"{path}: method must be one of {METHODS}, got {manifest.get('method')!r}")
    return manifest


# ----------------------------------------------------------------------------------------------
# Training: configuration and data
# ----------------------------------------------------------------------------------------------


@dataclass
class PersonalizeTrainConfig:
    """Settings of ``personalize.py train`` (see :func:`build_parser` for each one's meaning)."""

    dataset: str
    model: str
    method: str
    output: str
    kinds: list[str] = field(default_factory=lambda: ["positive"])
    classes: list[str] | None = None
    split: str = "train"
    revision: str | None = None
    max_train_steps: int = 1000
    lr: float | None = None  # None: DEFAULT_LR[method]
    scale_lr: bool = False
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True
    seed: int = 0
    mixed_precision: str | None = None
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = None  # None: 1.0 for lora, no clipping for textual inversion
    rank: int = 4
    lora_alpha: float | None = None  # None: the rank (scale 1)
    identifier: str = "sks"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None
    overwrite: bool = False
    cpu: bool = False
    progress: bool = True
    # loading policy (augment/trust.py): both off unless the flags say otherwise
    trust_remote_code: bool = False
    allow_bin_weights: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be some of {KINDS}, got {self.kinds}")
        for name in ("max_train_steps", "batch_size", "gradient_accumulation_steps", "resolution", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE's factor), got {self.resolution}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.resume_from_checkpoint not in (None, "latest"):
            raise ValueError(
                f"resume_from_checkpoint must be 'latest' (each class resumes from its own last "
                f"checkpoint), got {self.resume_from_checkpoint!r}"
            )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


class ClassImages:
    """A map-style torch dataset of one class's images for personalisation.

    Each item is ``{"pixel_values": (3, R, R) float in [-1, 1], "input_ids": (L,) long}``: the image
    resized so its short side is ``resolution``, cropped to a square (centre or random), flipped with
    probability 0.5 when ``random_flip``; the prompt one of ``templates`` (drawn at random) with the
    class's phrase. The images are repeated so that one pass holds at least ``min_length`` items.
    Randomness comes from torch's global generator (seeded by the trainer).
    """

    def __init__(
        self,
        images: Sequence[Image.Image],
        phrase: str,
        tokenizer,
        templates: Sequence[str],
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = True,
        min_length: int = 1,
    ):
        if not images:
            raise ValueError("no images to train on")
        self.images = [im.convert("RGB") for im in images]
        self.phrase = phrase
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = max(1, math.ceil(min_length / len(self.images)))

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def _pixels(self, image: Image.Image):
        import torch

        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        if self.center_crop:
            left, top = (nw - r) // 2, (nh - r) // 2
        else:
            left = int(torch.randint(0, nw - r + 1, ()).item())
            top = int(torch.randint(0, nh - r + 1, ()).item())
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        image = self.images[index % len(self.images)]
        template = self.templates[int(torch.randint(0, len(self.templates), ()).item())]
        ids = self.tokenizer(
            template.format(self.phrase),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": self._pixels(image), "input_ids": ids}


def class_images(
    dataset_dir: str, split: str, kinds: Sequence[str], classes: Sequence[str] | None
) -> tuple[list[str], dict[str, list[Image.Image]]]:
    """``(all class names, {class: its images of ``kinds`` in ``split``})`` for the selected classes.

    Raises ValueError naming an unknown class, a missing split, or a class with no image of those kinds
    (with the kinds it does have), before anything is trained.
    """
    from ..dataset import load_counterfactual_dataset

    ds = load_counterfactual_dataset(dataset_dir)
    if split not in ds:
        raise ValueError(f"{dataset_dir} has no {split!r} split (it has {sorted(ds)})")
    table = ds[split]
    names = list(table.features["label"].names)
    selected = list(classes) if classes else names
    unknown = [c for c in selected if c not in names]
    if unknown:
        raise ValueError(f"unknown class(es) {unknown} in --classes; {dataset_dir} has {names}")
    meta = table.select_columns(["label", "kind"])
    labels, row_kinds = np.asarray(meta["label"]), np.asarray(meta["kind"])
    wanted = np.isin(row_kinds, list(kinds))
    out: dict[str, list[Image.Image]] = {}
    for name in selected:
        y = names.index(name)
        idx = np.flatnonzero((labels == y) & wanted)
        if idx.size == 0:
            have = Counter(row_kinds[labels == y].tolist())
            have_s = ", ".join(f"{n} {k}" for k, n in sorted(have.items())) or "no rows at all"
            raise ValueError(
                f"class {name!r} has no {split} images of kind {'/'.join(kinds)} in {dataset_dir} "
                f"(it has {have_s}); pick other --kinds or leave it out of --classes"
            )
        out[name] = [table[int(i)]["image"] for i in idx]
    return names, out


def get_dataloader(
    images: Sequence[Image.Image],
    phrase: str,
    tokenizer,
    templates: Sequence[str],
    config: PersonalizeTrainConfig,
    num_processes: int = 1,
):
    """A shuffling DataLoader over one class's images (see :class:`ClassImages`); kept apart from the
    trainer so that tests can hand in their own images."""
    import torch

    data = ClassImages(
        images,
        phrase,
        tokenizer,
        templates,
        config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        min_length=config.batch_size * num_processes,
    )

    def collate(items):
        return {
            "pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "input_ids": torch.stack([it["input_ids"] for it in items]),
        }

    return torch.utils.data.DataLoader(
        data, batch_size=config.batch_size, shuffle=True, collate_fn=collate, drop_last=False
    )


# ----------------------------------------------------------------------------------------------
# Training: models and the two methods
# ----------------------------------------------------------------------------------------------


def load_components(model: str, revision: str | None, dtypes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler of a Stable-Diffusion folder or id.

    ``dtypes``: component name (``text_encoder``, ``vae``, ``unet``) -> the torch dtype to load it in
    (the frozen parts under mixed precision); float32 otherwise.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtypes = dtypes or {}

    def load(cls, subfolder: str):
        kw: dict[str, Any] = {"subfolder": subfolder, "revision": revision, **trust.weights_kwargs()}
        if subfolder in dtypes:
            kw["torch_dtype"] = dtypes[subfolder]
        with warnings.catch_warnings():  # newer releases call it ``dtype``; ``torch_dtype`` works in all
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return cls.from_pretrained(model, **kw)

    unet = load(UNet2DConditionModel, "unet")
    vae = load(AutoencoderKL, "vae")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ValueError(
            f"{model}: its UNet takes {unet.config.in_channels} input channels, not the VAE's "
            f"{vae.config.latent_channels}; personalise a text-to-image model (not an inpainting or "
            "instruction-editing one) and load the adapters into the other pipelines afterwards"
        )
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(
            model, subfolder="tokenizer", revision=revision, **trust.code_kwargs()
        ),
        "text_encoder": load(CLIPTextModel, "text_encoder"),
        "vae": vae,
        "unet": unet,
        "noise_scheduler": DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision),
    }


class TextualInversion:
    """One new token in the tokenizer and text encoder whose embedding row alone is trained.

    ``restore()`` (after every optimizer step) writes the original values back into every other row,
    so that weight decay and Adam's moments for tokens that occurred in the prompt change nothing but
    the new row.
    """

    name = "textual-inversion"

    def __init__(self, components: dict[str, Any], class_name: str):
        import torch

        self.tokenizer = tokenizer = components["tokenizer"]
        self.text_encoder = text_encoder = components["text_encoder"]
        self.token = placeholder_token(class_name)
        if tokenizer.add_tokens(self.token) != 1:
            raise ValueError(f"token {self.token!r} is already in the tokenizer's vocabulary")
        self.token_id = tokenizer.convert_tokens_to_ids(self.token)
        self.init_word = initializer_word(class_name, tokenizer)
        init_ids = tokenizer(self.init_word, add_special_tokens=False).input_ids
        try:  # the new row is overwritten below: skip transformers' random mean/covariance init
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        except TypeError:  # transformers < 4.46
            text_encoder.resize_token_embeddings(len(tokenizer))
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_id] = weight[init_ids].mean(dim=0)
        self.init_tokens = len(init_ids)
        self.original = weight.detach().clone()
        self.keep = torch.ones(weight.shape[0], dtype=torch.bool)
        self.keep[self.token_id] = False
        self._on_device: tuple | None = None  # (original, keep) on the embedding's device
        components["vae"].requires_grad_(False)
        components["unet"].requires_grad_(False)
        text_encoder.requires_grad_(False)
        text_encoder.get_input_embeddings().requires_grad_(True)
        self.phrase = self.token
        self.templates = TI_TEMPLATES

    @property
    def trainable(self):
        return self.text_encoder

    def parameters(self):
        return list(self.text_encoder.get_input_embeddings().parameters())

    def restore(self, text_encoder) -> None:
        import torch

        weight = text_encoder.get_input_embeddings().weight
        if self._on_device is None or self._on_device[0].device != weight.device:
            self._on_device = (self.original.to(weight.device, weight.dtype), self.keep.to(weight.device))
        original, keep = self._on_device
        with torch.no_grad():
            weight[keep] = original[keep]

    def embedding(self, text_encoder):
        """The learned row, ``(1, dim)`` float32 on the CPU."""
        row = text_encoder.get_input_embeddings().weight[self.token_id : self.token_id + 1]
        return row.detach().float().cpu().clone()

    def save(self, text_encoder, folder: Path) -> Path:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / TI_WEIGHTS
        save_file({self.token: self.embedding(text_encoder)}, str(path))
        return path

    def load(self, text_encoder, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        row = load_file(str(folder / TI_WEIGHTS))[self.token]
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.token_id] = row.reshape(-1).to(weight.device, weight.dtype)

    def describe(self) -> dict[str, Any]:
        return {"token": self.token, "init_word": self.init_word, "init_tokens": self.init_tokens}


class LoraAdapter:
    """A peft LoRA on the UNet's attention projections; VAE, text encoder and UNet weights frozen."""

    name = "lora"

    def __init__(self, components: dict[str, Any], class_name: str, config: PersonalizeTrainConfig):
        from peft import LoraConfig

        self.unet = unet = components["unet"]
        components["vae"].requires_grad_(False)
        components["text_encoder"].requires_grad_(False)
        unet.requires_grad_(False)
        self.alpha = config.lora_alpha if config.lora_alpha is not None else config.rank
        self.rank = config.rank
        unet.add_adapter(
            LoraConfig(
                r=config.rank,
                lora_alpha=self.alpha,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )
        self.token = self.phrase = lora_phrase(class_name, config.identifier)
        self.templates = ("a photo of a {}",)

    @property
    def trainable(self):
        return self.unet

    def parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def restore(self, _model) -> None:
        pass

    def state_dict(self, unet) -> dict[str, Any]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))

    def save(self, unet, folder: Path) -> Path:
        from diffusers import StableDiffusionPipeline

        folder.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if (
            "unet_lora_adapter_metadata"
            in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters
        ):
            # rank and alpha travel with the weights (diffusers >= 0.34), so an alpha != rank loads right
            kwargs["unet_lora_adapter_metadata"] = unet.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(folder),
            unet_lora_layers=self.state_dict(unet),
            safe_serialization=True,
            **kwargs,
        )
        return folder / LORA_WEIGHTS

    def load(self, unet, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        state, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), "default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder}: unexpected LoRA keys {result.unexpected_keys[:5]}")

    def describe(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(LORA_TARGETS),
        }


# ----------------------------------------------------------------------------------------------
# Training: the loop
# ----------------------------------------------------------------------------------------------


def _checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def loss_summary(losses: Sequence[float], points: int = 50) -> dict[str, Any]:
    """First, last, min, max, the means of the first and last tenth, and the curve averaged over at
    most ``points`` equal windows (one value per optimizer step when there are fewer steps)."""
    if not losses:
        return {"steps": 0}
    arr = np.asarray(losses, dtype=np.float64)
    tenth = max(1, len(arr) // 10)
    windows = np.array_split(arr, min(points, len(arr)))
    return {
        "steps": len(arr),
        "first": float(arr[0]),
        "last": float(arr[-1]),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean_first_tenth": float(arr[:tenth].mean()),
        "mean_last_tenth": float(arr[-tenth:].mean()),
        "finite": bool(np.isfinite(arr).all()),
        "curve": [round(float(w.mean()), 6) for w in windows],
    }


def _weight_dtype(accelerator):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _train_class(
    accelerator, config: PersonalizeTrainConfig, class_name: str, images, folder: Path
) -> dict[str, Any]:
    """Fit one class's adapter, save it under ``folder``; returns its manifest entry."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    class_seed = item_seed(config.seed, f"personalize/{class_name}") % (2**32)
    set_seed(class_seed)  # the same initial adapter on every process
    # the frozen parts run in the mixed-precision dtype, the trained parameters stay float32
    weight_dtype = _weight_dtype(accelerator)
    frozen = ("vae", "unet") if config.method == "textual-inversion" else ("vae", "text_encoder", "unet")
    dtypes = {key: weight_dtype for key in frozen} if weight_dtype != torch.float32 else {}
    comps = load_components(config.model, config.revision, dtypes)
    if config.method == "textual-inversion":
        method: TextualInversion | LoraAdapter = TextualInversion(comps, class_name)
    else:
        method = LoraAdapter(comps, class_name, config)
        if weight_dtype != torch.float32:
            cast_training_params(comps["unet"], dtype=torch.float32)
    for key in frozen:
        comps[key].to(accelerator.device).eval()
    model = method.trainable
    model.train()

    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.batch_size * accelerator.num_processes
    max_grad_norm = config.max_grad_norm
    if max_grad_norm is None:
        max_grad_norm = 1.0 if config.method == "lora" else 0.0
    optimizer = torch.optim.AdamW(
        method.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8
    )
    loader = get_dataloader(
        images, method.phrase, comps["tokenizer"], method.templates, config, accelerator.num_processes
    )
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    set_seed(class_seed, device_specific=True)  # different noise on each process

    state = {"step": 0, "losses": []}

    def save_hook(models, weights, output_dir):
        # the adapter and the loss history instead of the whole text encoder / UNet
        if accelerator.is_main_process:
            for m in models:
                method.save(accelerator.unwrap_model(m), Path(output_dir))
            (Path(output_dir) / "progress.json").write_text(json.dumps(state))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            method.load(accelerator.unwrap_model(models.pop()), Path(input_dir))
        saved = json.loads((Path(input_dir) / "progress.json").read_text())
        state["losses"] = list(saved["losses"])

    hooks = [
        accelerator.register_save_state_pre_hook(save_hook),
        accelerator.register_load_state_pre_hook(load_hook),
    ]
    try:
        found = _checkpoints(folder) if config.resume_from_checkpoint else []
        if found:
            accelerator.print(f"{class_name}: resuming from {found[-1]}")
            accelerator.load_state(str(found[-1]))
            state["step"] = int(found[-1].name.split("-")[1])
        steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
        first_epoch, skip = divmod(state["step"] * config.gradient_accumulation_steps, len(loader))
        epochs = math.ceil(config.max_train_steps / steps_per_epoch)
        # the prepared (possibly DDP-wrapped) module is the one that gets called
        vae = comps["vae"]
        text_encoder = model if config.method == "textual-inversion" else comps["text_encoder"]
        unet = model if config.method == "lora" else comps["unet"]
        noise_scheduler = comps["noise_scheduler"]
        prediction = noise_scheduler.config.prediction_type
        bar = tqdm(
            total=config.max_train_steps,
            initial=state["step"],
            desc=f"{config.method} {class_name}",
            disable=not (config.progress and accelerator.is_local_main_process),
        )
        micro_losses: list[float] = []
        for epoch in range(first_epoch, epochs):
            if state["step"] >= config.max_train_steps:
                break
            active = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
            for batch in active:
                with accelerator.accumulate(model):
                    with torch.no_grad():
                        pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
                        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                    noise = torch.randn_like(latents)
                    timesteps = torch.randint(
                        0,
                        noise_scheduler.config.num_train_timesteps,
                        (latents.shape[0],),
                        device=latents.device,
                    ).long()
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    if config.method == "textual-inversion":
                        cond = text_encoder(batch["input_ids"])[0].to(weight_dtype)
                    else:
                        with torch.no_grad():
                            cond = text_encoder(batch["input_ids"].to(accelerator.device))[0]
                    if prediction == "epsilon":
                        target = noise
                    elif prediction == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        raise ValueError(f"unsupported prediction type {prediction!r} of {config.model}")
                    pred = unet(noisy, timesteps, cond).sample
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_(method.parameters(), max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    method.restore(accelerator.unwrap_model(model))
                micro_losses.append(float(accelerator.reduce(loss.detach(), "mean")))
                if accelerator.sync_gradients:
                    state["step"] += 1
                    state["losses"].append(float(np.mean(micro_losses)))
                    micro_losses = []
                    bar.update(1)
                    bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
                    if config.checkpointing_steps and state["step"] % config.checkpointing_steps == 0:
                        _save_checkpoint(accelerator, folder, state["step"], config.checkpoints_total_limit)
                    if state["step"] >= config.max_train_steps:
                        break
            skip = 0
        bar.close()
        accelerator.wait_for_everyone()
        final = accelerator.unwrap_model(model)
        entry = {
            **method.describe(),
            "folder": folder.name,
            "weights": f"{folder.name}/{TI_WEIGHTS if config.method == 'textual-inversion' else LORA_WEIGHTS}",
            "num_images": len(images),
            "seed": class_seed,
            "steps": state["step"],
            "loss": loss_summary(state["losses"]),
            "seconds": round(time.perf_counter() - t0, 2),
            "complete": True,
        }
        if accelerator.is_main_process:
            method.save(final, folder)
            for stale in _checkpoints(folder):  # the final adapter supersedes them
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
    finally:
        for h in hooks:
            h.remove()
        accelerator.free_memory()
    return entry


def _save_checkpoint(accelerator, folder: Path, step: int, limit: int) -> None:
    if accelerator.is_main_process and limit > 0:
        old = _checkpoints(folder)
        for stale in old[: max(0, len(old) - limit + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder / f"checkpoint-{step}"))


def _resolved_revision(model: str, revision: str | None) -> str | None:
    """The commit a Hub id resolved to (None for a local folder or when unknown)."""
    if os.path.isdir(model):
        return None
    try:
        from transformers import PretrainedConfig

        cfg = PretrainedConfig.from_pretrained(
            model, subfolder="text_encoder", revision=revision, **trust.code_kwargs()
        )
        return getattr(cfg, "_commit_hash", None)
    except OSError:
        return None


def train(config: PersonalizeTrainConfig) -> dict[str, Any]:
    """Personalise the model on every selected class (see the module docstring); returns the manifest.

    Raises ValueError for a class without images (naming it), FileExistsError when ``output`` already
    holds adapters and neither ``overwrite`` nor ``resume_from_checkpoint`` is set.
    """
    trust.configure(config.trust_remote_code, config.allow_bin_weights)
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from ..runtime import check_model_ref

    model_ref = check_model_ref(config.model, "--model")
    config.model = model_ref
    names, images = class_images(config.dataset, config.split, config.kinds, config.classes)
    out = Path(config.output)
    manifest_path = out / MANIFEST
    previous: dict[str, Any] = {}
    if manifest_path.is_file():
        if config.resume_from_checkpoint:
            previous = read_manifest(out)
            if (previous.get("method"), previous.get("base_model")) != (config.method, config.model):
                raise ValueError(
                    f"{out} holds {previous.get('method')} adapters of {previous.get('base_model')}; "
                    f"cannot resume them as {config.method} of {config.model}"
                )
        elif not config.overwrite:
            raise FileExistsError(
                f"{out} already holds adapters ({MANIFEST}); pass --resume-from-checkpoint latest to "
                "continue, --overwrite to start again, or choose another --output"
            )
    has_gpu = torch.cuda.is_available() or (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )
    accelerator = Accelerator(
        cpu=config.cpu or not has_gpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(out)),
    )
    if accelerator.is_main_process:
        if manifest_path.is_file() and config.overwrite and not config.resume_from_checkpoint:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    t0 = time.perf_counter()
    manifest: dict[str, Any] = {
        "method": config.method,
        "base_model": config.model,
        "revision": config.revision,
        "resolved_revision": _resolved_revision(config.model, config.revision),
        "dataset": str(config.dataset),
        "split": config.split,
        "kinds": list(config.kinds),
        "dataset_classes": names,
        "tokens": {},
        "classes": {},
        "max_train_steps": config.max_train_steps,
        "lr": config.learning_rate,
        "effective_lr": config.learning_rate
        * (
            config.gradient_accumulation_steps * config.batch_size * accelerator.num_processes
            if config.scale_lr
            else 1
        ),
        "batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "resolution": config.resolution,
        "seed": config.seed,
        "mixed_precision": accelerator.mixed_precision,
        "settings": {k: v for k, v in asdict(config).items() if k != "progress"},
        "package_version": __version__,
    }
    for name, entry in previous.get("classes", {}).items():
        if name in images and entry.get("complete") and (out / entry["weights"]).is_file():
            manifest["classes"][name] = entry
            manifest["tokens"][name] = entry["token"]
    for what, naming in (("adapter folder", class_folder), ("token", placeholder_token)):
        named = {name: naming(name).lower() for name in images}
        clash = {v for v, n in Counter(named.values()).items() if n > 1}
        if clash and (what == "adapter folder" or config.method == "textual-inversion"):
            raise ValueError(f"classes {[c for c in images if named[c] in clash]} get the same {what}")
    folders = {name: class_folder(name) for name in images}
    for name, imgs in images.items():
        if name in manifest["classes"]:
            accelerator.print(f"{name}: already trained, skipped")
            continue
        entry = _train_class(accelerator, config, name, imgs, out / folders[name])
        manifest["classes"][name] = entry
        manifest["tokens"][name] = entry["token"]
        manifest["seconds"] = round(time.perf_counter() - t0, 2)
        if accelerator.is_main_process:  # after every class, so that a rerun can skip it
            manifest_path.write_text(json.dumps(manifest, indent=2))
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    if accelerator.is_main_process:
        manifest_path.write_text(json.dumps(manifest, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return manifest


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


class PersonalizedGenerator:
    """Text-to-image with a base model and the per-class adapters of a ``train`` output folder.

    Textual-inversion tokens of all classes are loaded at once; a class's LoRA is loaded when the class
    is asked for (and the previous one unloaded). ``__call__`` returns a
    :class:`~augment.synthesize.output.CounterfactualOutput` with masks None (the segmentation stage
    masks the images) and one recipe per image.
    """

    name = "personalize"

    def __init__(self, pipe, manifest: dict[str, Any], adapter_dir: str | os.PathLike, model_info: dict):
        self.pipe = pipe
        self.manifest = manifest
        self.method = manifest["method"]
        self.adapter_dir = Path(adapter_dir)
        self.model_info = model_info
        self._active: str | None = None
        if self.method == "textual-inversion":
            for entry in manifest["classes"].values():
                pipe.load_textual_inversion(str(self.adapter_dir / entry["folder"]), token=entry["token"])

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | os.PathLike,
        model: str | None = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> PersonalizedGenerator:
        """Load the base model named in ``personalize.json`` (or ``model``) and the adapters."""
        from diffusers import AutoPipelineForText2Image

        from ..runtime import check_model_ref, model_info, resolve_device, resolve_dtype

        manifest = read_manifest(adapter_dir)
        if not manifest.get("classes"):
            raise ValueError(f"{adapter_dir}/{MANIFEST} lists no trained class")
        ref = check_model_ref(model or manifest["base_model"], "--model")
        rev = revision if revision is not None else manifest.get("revision")
        device = resolve_device(device)
        torch_dtype = resolve_dtype(device, dtype)
        with warnings.catch_warnings():  # newer diffusers call it ``dtype``; ``torch_dtype`` works in all
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = AutoPipelineForText2Image.from_pretrained(
                ref, revision=rev, torch_dtype=torch_dtype, **trust.model_kwargs()
            )
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        info = model_info(ref, pipe.text_encoder, rev, torch_dtype)
        if info["revision"] is None:
            info["revision"] = manifest.get("resolved_revision")
        return cls(pipe, manifest, adapter_dir, info)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def token(self, class_name: str) -> str:
        """The phrase that stands for ``class_name`` in prompts (``<dog>``, or ``sks dog`` for LoRA)."""
        return self.manifest["classes"][class_name]["token"]

    def adapter_path(self, class_name: str) -> Path:
        return self.adapter_dir / self.manifest["classes"][class_name]["weights"]

    def _activate(self, class_name: str) -> None:
        if self.method != "lora" or self._active == class_name:
            return
        if self._active is not None:
            self.pipe.unload_lora_weights()
        folder = self.adapter_dir / self.manifest["classes"][class_name]["folder"]
        self.pipe.load_lora_weights(str(folder), adapter_name=class_folder(class_name))
        self._active = class_name

    def check_inputs(self, class_name, prompt, seed, num_inference_steps, guidance_scale) -> None:
        if class_name not in self.manifest["classes"]:
            raise ValueError(f"class_name {class_name!r} has no adapter; trained: {self.classes}")
        if not prompt:
            raise ValueError("prompt must be a non-empty list")
        if len(seed) != len(prompt):
            raise ValueError(f"seed has {len(seed)} entries for {len(prompt)} prompts")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")

    def __call__(
        self,
        class_name: str,
        prompt: list[str],
        seed: Sequence[int],
        negative_prompt: str = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
    ) -> CounterfactualOutput:
        """One image per prompt, each from a CPU ``torch.Generator`` seeded with its ``seed`` entry
        (so an image does not depend on its batch). Images flagged by the pipeline's safety checker are
        returned with ``recipes[i]["nsfw"] = True``."""
        import torch

        self.check_inputs(class_name, prompt, seed, num_inference_steps, guidance_scale)
        self._activate(class_name)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]
        result = self.pipe(
            prompt=list(prompt),
            negative_prompt=[negative_prompt] * len(prompt) if negative_prompt else None,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            output_type=output_type,
        )
        flags = getattr(result, "nsfw_content_detected", None) or [False] * len(prompt)
        recipes = []
        for p, s, flagged in zip(prompt, seed, flags):
            recipes.append(
                {
                    "generator": self.name,
                    "method": self.method,
                    "model": self.model_info["model"],
                    "revision": self.model_info["revision"],
                    "dtype": self.model_info["dtype"],
                    "adapter": str(self.adapter_path(class_name)),
                    "token": self.token(class_name),
                    "prompt": p,
                    "negative_prompt": negative_prompt,
                    "seed": int(s),
                    "steps": int(num_inference_steps),
                    "guidance": float(guidance_scale),
                    "scheduler": type(self.pipe.scheduler).__name__,
                    "nsfw": bool(flagged),
                    "package_version": __version__,
                }
            )
        return CounterfactualOutput(images=list(result.images), masks=[None] * len(prompt), recipes=recipes)

    def describe(self) -> dict[str, Any]:
        return {
            "generator": self.name,
            "method": self.method,
            **self.model_info,
            "adapters": str(self.adapter_dir),
            "tokens": {c: self.token(c) for c in self.classes},
        }


@dataclass
class PersonalizeGenerateConfig:
    """Settings of ``personalize.py generate`` (see :func:`build_parser`)."""

    dataset: str
    adapters: str
    output: str
    per_class: int
    classes: list[str] | None = None
    split: str = "train"
    model: str | None = None
    revision: str | None = None
    alt_source: str = "dataset"
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    batch_size: int = 4
    resolution: int | None = None
    device: str | None = None
    dtype: str | None = None
    mask_source: str = "none"
    sam: str | None = None
    sam_checkpoint: str | None = None
    sam_type: str = "vit_h"
    detector: str | None = None
    box_threshold: float = 0.1
    max_boxes: int = 4
    fill_holes: bool = True
    dilate: int = 0
    min_mask_area: float = 0.005
    max_mask_area: float = 0.95
    segment_batch_size: int = 8
    overwrite: bool = False
    progress: bool = True
    # loading policy (augment/trust.py): both off unless the flags say otherwise
    trust_remote_code: bool = False
    allow_bin_weights: bool = False

    def __post_init__(self):
        if self.per_class < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError(
                f"per_class, batch_size and steps must be >= 1, got {self.per_class}, {self.batch_size}, {self.steps}"
            )
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {self.mask_source!r}")
        if self.mask_source == "sam" and not self.detector:
            raise ValueError(
                "--mask-source sam needs --detector: generated images have no mask to take a box from"
            )


def alt_phrases_by_class(dataset, split: str, class_names: Sequence[str]) -> dict[str, list[str]]:
    """The distinct ``alt_phrases`` of each class's originals in ``split``, in order of first use."""
    table = dataset[split].select_columns(["label", "kind", "alt_phrases"])
    out: dict[str, list[str]] = {c: [] for c in class_names}
    for label, kind, alts in zip(table["label"], table["kind"], table["alt_phrases"]):
        if kind != "original" or not 0 <= label < len(class_names):
            continue
        bucket = out[class_names[label]]
        for a in alts or []:
            a = a.strip()
            if a and a not in bucket:
                bucket.append(a)
    return out


def read_alt_source(value: str, classes: Sequence[str]) -> dict[str, list[str]] | None:
    """``--alt-source``: None for ``dataset``, empty lists for ``none``; a ``.json`` file holds a
    list of phrases (for every class) or ``{class: [phrases]}``; any other file one phrase a line."""
    if value == "dataset":
        return None
    if value == "none":
        return {c: [] for c in classes}
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"--alt-source {value!r} is neither 'dataset', 'none' nor a file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            return {c: [str(a) for a in data] for c in classes}
        if isinstance(data, dict):
            return {c: [str(a) for a in data.get(c, [])] for c in classes}
        raise ValueError(f"{path}: expected a JSON list of phrases or an object class -> list")
    phrases = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {c: phrases for c in classes}


def _copy_input(dataset, input_dir: Path, writer) -> dict[str, set[str]]:
    """Every row, rejection and phrase mask of the input dataset into ``writer``; returns ids per split."""
    import pyarrow.parquet as pq

    from ..dataset import Row, load_rejected

    ids: dict[str, set[str]] = {}
    for split in dataset:
        ids[split] = set()
        for r in dataset[split]:
            writer.add(
                split,
                Row(
                    id=r["id"],
                    image=r["image"],
                    label=r["label"],
                    kind=r["kind"],
                    source_id=r["source_id"],
                    mask=r["mask"],
                    bg_label=r["bg_label"],
                    caption=r["caption"],
                    fg_phrases=list(r["fg_phrases"]),
                    bg_phrases=list(r["bg_phrases"]),
                    alt_phrases=list(r["alt_phrases"]),
                    spurious_phrases=list(r["spurious_phrases"]),
                    recipe=json.loads(r["recipe"]) if r["recipe"] else {},
                ),
            )
            ids[split].add(r["id"])
    for table in load_rejected(input_dir).values():
        for r in table:
            writer.reject(r["id"], r["split"], r["stage"], r["reason"])
    for f in sorted((input_dir / "phrase_masks").glob("*.parquet")):
        split = f.name.split("-")[0]
        for r in pq.read_table(f).to_pylist():
            mask = Image.open(io.BytesIO(r["mask"]["bytes"]))
            mask.load()
            writer.add_phrase_mask(split, r["id"], r["phrase"], mask, r["boxes"], r["scores"])
    return ids


def _next_index(ids: set[str], prefix: str) -> int:
    """The first k with no ``{prefix}{k}`` among ``ids`` above the highest taken one."""
    taken = [int(i[len(prefix) :]) for i in ids if i.startswith(prefix) and i[len(prefix) :].isdigit()]
    return max(taken) + 1 if taken else 0


def generate(
    config: PersonalizeGenerateConfig, generator: PersonalizedGenerator | None = None, segmenter=None
) -> dict[str, Any]:
    """Write a new dataset folder: the input's rows plus ``per_class`` generated rows per class.

    ``generator`` / ``segmenter`` may be handed in (tests, or to reuse loaded models); otherwise they
    are built from ``config``. Returns the writer's summary with ``generated`` and ``seconds`` added.
    """
    trust.configure(config.trust_remote_code, config.allow_bin_weights)
    from tqdm.auto import tqdm

    from ..dataset import DatasetWriter, Row, load_counterfactual_dataset

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("generate runs in one process; start it with python, not a multi-process launcher")
    t0 = time.perf_counter()
    input_dir = Path(config.dataset)
    output = Path(config.output)
    if output.resolve() == input_dir.resolve():
        raise ValueError(f"--output {output} is the input dataset; generation writes a new folder")
    if output.exists() and any(output.iterdir()) and not config.overwrite:  # before any model loads
        raise FileExistsError(
            f"{output} exists and is not empty; choose another --output or pass --overwrite"
        )
    manifest = read_manifest(config.adapters)
    dataset = load_counterfactual_dataset(input_dir)
    if config.split not in dataset:
        raise ValueError(f"{input_dir} has no {config.split!r} split (it has {sorted(dataset)})")
    names = list(dataset[config.split].features["label"].names)
    trained = list(manifest["classes"])
    classes = list(config.classes) if config.classes else trained
    missing = [c for c in classes if c not in manifest["classes"]]
    if missing:
        raise ValueError(f"class(es) {missing} have no adapter in {config.adapters} (trained: {trained})")
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise ValueError(f"class(es) {unknown} are not classes of {input_dir} ({names})")
    alts = read_alt_source(config.alt_source, classes)
    if alts is None:
        alts = alt_phrases_by_class(dataset, config.split, names)
    if segmenter is None and config.mask_source != "none":
        from ..segment import segmenter_from_config

        segmenter = segmenter_from_config(config)
    if generator is None:
        generator = PersonalizedGenerator.from_pretrained(
            config.adapters,
            model=config.model,
            revision=config.revision,
            device=config.device,
            dtype=config.dtype,
        )
    writer = DatasetWriter(config.output, names, overwrite=config.overwrite)
    ids = _copy_input(dataset, input_dir, writer)
    all_ids = set().union(*ids.values())
    mask_describe = segmenter.describe() if segmenter is not None and hasattr(segmenter, "describe") else None
    mask_source = config.mask_source
    if segmenter is not None and mask_source == "none":  # a segmenter handed in: its own mode
        mask_source = getattr(segmenter, "mode", type(segmenter).__name__)
    generated: Counter = Counter()
    rejected: Counter = Counter()
    bar = tqdm(total=config.per_class * len(classes), desc="personalize", disable=not config.progress)
    for name in classes:
        label = names.index(name)
        token = generator.token(name)
        source_id = f"personalize/{class_folder(name)}"
        prefix = f"{source_id}/generated/"
        start = _next_index(all_ids, prefix)
        jobs = []
        for j in range(config.per_class):
            k = start + j
            choices = alts.get(name) or []
            alt = choices[k % len(choices)] if choices else None
            rid = f"{prefix}{k}"
            jobs.append((rid, alt, prompt_for(token, alt), item_seed(config.seed, rid)))
        for b in range(0, len(jobs), config.batch_size):
            chunk = jobs[b : b + config.batch_size]
            out = generator(
                name,
                prompt=[p for _, _, p, _ in chunk],
                seed=[s for *_, s in chunk],
                negative_prompt=config.negative_prompt,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.resolution,
                width=config.resolution,
            )
            results = None
            if segmenter is not None:
                results = segmenter(out.images, [name] * len(chunk))
            for i, (rid, alt, prompt, _) in enumerate(chunk):
                recipe = dict(out.recipes[i])
                recipe["alt"] = alt
                if recipe.pop("nsfw", False):
                    writer.reject(
                        rid, config.split, "generate", "the pipeline's safety checker flagged the image"
                    )
                    rejected["generate"] += 1
                    continue
                mask = None
                if results is None:
                    recipe["mask"] = {"source": "none"}
                else:
                    res = results[i]
                    if res.mask is None:
                        writer.reject(rid, config.split, "segment", res.error or "no mask")
                        rejected["segment"] += 1
                        continue
                    mask = Image.fromarray(np.asarray(res.mask, dtype=np.uint8) * 255)  # 2-D uint8: mode L
                    recipe["mask"] = {
                        "source": mask_source,
                        "boxes": res.boxes,
                        "box_source": res.box_source,
                        "box_scores": res.box_scores,
                        "area": res.area,
                    }
                image = out.images[i].convert("RGB")
                writer.add(
                    config.split,
                    Row(
                        id=rid,
                        image=image,
                        label=label,
                        kind="generated",
                        source_id=source_id,
                        mask=mask,
                        bg_label=-1,
                        caption=prompt.replace(token, name),
                        bg_phrases=[alt] if alt else [],
                        recipe=recipe,
                    ),
                )
                generated[name] += 1
            bar.update(len(chunk))
    bar.close()
    settings_path = input_dir / "generation.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    settings.pop("package_version", None)
    settings["output"] = str(config.output)
    settings["personalize"] = {
        **{k: v for k, v in asdict(config).items() if k != "progress"},
        "generator": generator.describe(),
        "segmentation": mask_describe,
        "input_dataset": str(input_dir),
    }
    summary = writer.close(
        settings=settings,
        description=(
            f"`{input_dir.name}` plus {sum(generated.values())} images generated by scripts/personalize.py "
            f"({manifest['method']} adapters of `{manifest['base_model']}`)."
        ),
    )
    summary["generated"] = dict(generated)
    summary["rejected_generated"] = dict(rejected)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None, not a flag's bool, not an empty string,
    and not when the help text already explains it."""

    def _get_help_string(self, action):
        d = action.default
        quiet = d is None or isinstance(d, bool) or d == "" or d is argparse.SUPPRESS
        if quiet or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """``personalize.py train ...`` and ``personalize.py generate ...``."""
    p = argparse.ArgumentParser(
        prog="personalize.py",
        description=(
            "Personalised text-to-image augmentation (ASPIRE step 5, DA-Fusion): `train` fits one "
            "textual-inversion token or DreamBooth-LoRA per class on a dataset folder's images; `generate` "
            "writes a new dataset folder with the input's rows plus generated images of each class."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,generate}")
    fmt = _HelpFormatter

    t = sub.add_parser(
        "train",
        help="fit per-class adapters (run with python or accelerate launch)",
        formatter_class=fmt,
        description=(
            "Fit one adapter per class on the class's images of a dataset folder (default: its positive "
            "rows, the background-edited images), under Hugging Face Accelerate. textual-inversion: a new "
            "token <class-name> per class, initialised from a word of the class name (or 'object'), only "
            "its embedding row trained; ASPIRE's defaults (1000 steps, lr 5e-4, batch 4, 512 px). lora: "
            "DreamBooth-LoRA on the UNet's attention projections, prompt 'a photo of a {identifier} "
            "{class}'. Writes OUTPUT/<class>/ (learned_embeds.safetensors or pytorch_lora_weights.safetensors) "
            "and OUTPUT/personalize.json."
        ),
    )
    t.add_argument("--dataset", required=True, help="dataset folder written by scripts/generate.py")
    t.add_argument(
        "--model",
        required=True,
        metavar="ID_OR_PATH",
        help="a Stable-Diffusion-shaped text-to-image model, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, or a folder",
    )
    t.add_argument("--revision", help="model revision (branch, tag or commit) on the Hub")
    t.add_argument("--method", required=True, choices=METHODS, help="what is trained per class")
    t.add_argument("--output", required=True, metavar="ADAPTER_DIR", help="where the adapters go")
    t.add_argument(
        "--kinds",
        nargs="+",
        default=["positive"],
        choices=KINDS,
        metavar="KIND",
        help=f"row kinds whose images are trained on ({', '.join(KINDS)})",
    )
    t.add_argument(
        "--classes", nargs="+", metavar="CLASS", help="class names to personalise (default: every class)"
    )
    t.add_argument("--split", default="train", help="split the training images come from")
    t.add_argument("--max-train-steps", type=int, default=1000, help="optimizer steps per class")
    t.add_argument(
        "--lr", type=float, help="AdamW learning rate (default: 5e-4 for textual-inversion, 1e-4 for lora)"
    )
    t.add_argument(
        "--scale-lr",
        action="store_true",
        help="multiply the learning rate by batch size x accumulation steps x processes",
    )
    t.add_argument("--batch-size", type=int, default=4, help="images per process per step")
    t.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step"
    )
    t.add_argument("--resolution", type=int, default=512, help="training side in pixels (multiple of 8)")
    t.add_argument(
        "--center-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="crop the square from the centre (otherwise at random; on by default)",
    )
    t.add_argument(
        "--random-flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flip training images left-right with probability 0.5 (on by default)",
    )
    t.add_argument("--seed", type=int, default=0, help="run seed (each class draws its own from it)")
    t.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], help="default: from the accelerate config"
    )
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument(
        "--lr-scheduler",
        default="constant",
        choices=["constant", "constant_with_warmup", "linear", "cosine"],
        help="learning-rate schedule (diffusers.optimization.get_scheduler)",
    )
    t.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up steps of the schedule")
    t.add_argument(
        "--max-grad-norm",
        type=float,
        help="gradient clipping (default: 1.0 for lora, none for textual-inversion)",
    )
    t.add_argument("--rank", type=int, default=4, help="LoRA rank")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    t.add_argument(
        "--identifier", default="sks", help="lora: the rare word that names the class's instance in prompts"
    )
    t.add_argument(
        "--checkpointing-steps",
        type=int,
        default=500,
        help="save_state every N steps into OUTPUT/<class>/checkpoint-N (0: never); removed once the class is done",
    )
    t.add_argument("--checkpoints-total-limit", type=int, default=2, help="checkpoints kept per class")
    t.add_argument(
        "--resume-from-checkpoint",
        choices=["latest"],
        help="skip finished classes, resume an unfinished one from its last checkpoint",
    )
    t.add_argument("--overwrite", action="store_true", help="replace adapters already in --output")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    trust.add_arguments(t.add_argument_group("loading models"))
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    g = sub.add_parser(
        "generate",
        help="write a new dataset folder with generated images per class",
        formatter_class=fmt,
        description=(
            "Generate --per-class images of each class with the base model and its adapters, prompted "
            "'a photo of a {token} in {alt}' (alt: an alternative background of the class's originals; "
            "'a photo of a {token}' when there is none), each image from its own seed. Writes a NEW dataset "
            "folder holding every row of --dataset unchanged plus kind=generated rows (id "
            "personalize/{class folder}/generated/{k}); images the segmentation stage cannot mask are recorded in "
            "the rejected table."
        ),
    )
    g.add_argument("--dataset", required=True, help="the input dataset folder (copied into --output)")
    g.add_argument("--adapters", required=True, metavar="ADAPTER_DIR", help="the output folder of `train`")
    g.add_argument("--output", required=True, metavar="NEW_DIR", help="the new dataset folder")
    g.add_argument("--per-class", type=int, required=True, help="images generated per class")
    g.add_argument(
        "--classes", nargs="+", metavar="CLASS", help="classes to generate (default: every trained class)"
    )
    g.add_argument("--split", default="train", help="split of the alt phrases and of the generated rows")
    g.add_argument(
        "--model", metavar="ID_OR_PATH", help="base model (default: the one the adapters were trained on)"
    )
    g.add_argument("--revision", help="base model revision (default: the training one)")
    g.add_argument(
        "--alt-source",
        default="dataset",
        metavar="dataset|none|FILE",
        help="alternative backgrounds: 'dataset' (the originals' alt_phrases), 'none' (ASPIRE's "
        "'a photo of a {token}'), a text file (one phrase a line) or a JSON file (a list, or class -> list)",
    )
    g.add_argument("--negative-prompt", default="", help="negative prompt of every image")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument(
        "--seed", type=int, default=0, help="run seed; each image's seed derives from it and its id"
    )
    g.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    g.add_argument("--resolution", type=int, help="image side (default: the model's)")
    g.add_argument("--device", help="torch device (default: Accelerate's, a GPU when there is one)")
    g.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="default: bfloat16 on a GPU, float32 elsewhere",
    )
    m = g.add_argument_group(
        "masks",
        "none: no mask (recorded in the recipe). sam: --detector finds the class's box, SAM masks it. "
        "grounded: the same through the grounded mode of augment.segment. An image that gets no mask "
        "is rejected with the reason.",
    )
    add_mask_arguments(m, MASK_SOURCES, "none", what="class")
    g.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    trust.add_arguments(g.add_argument_group("loading models"))
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> PersonalizeTrainConfig | PersonalizeGenerateConfig:
    """The command's configuration; a bad value exits with argparse's usage error."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    try:
        if command == "train":
            return PersonalizeTrainConfig(**args)
        return PersonalizeGenerateConfig(**args)
    except ValueError as e:
        parser.error(f"{command}: {e}")
        raise  # unreachable: parser.error exits


def cli(argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/personalize.py``; returns the exit status."""
    config = parse_args(argv)
    try:
        if isinstance(config, PersonalizeTrainConfig):
            result = train(config)
            if int(os.environ.get("RANK", "0")) == 0:
                brief = {
                    "method": result["method"],
                    "tokens": result["tokens"],
                    "loss": {c: e["loss"].get("mean_last_tenth") for c, e in result["classes"].items()},
                    "seconds": result.get("seconds"),
                }
                print(json.dumps(brief, indent=2))
                print(f"wrote {config.output}/{MANIFEST}")
        else:
            result = generate(config)
            print(json.dumps(result, indent=2))
            print(f"wrote {config.output} (load it with datasets.load_dataset({config.output!r}))")
    # OSError: a model that cannot load or an existing output; ImportError: an optional package missing
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        print(f"personalize.py: error: {trust.redact(str(e))}", file=sys.stderr)
        return 2
    return 0
