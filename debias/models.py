"""Backbones: a small ResNet for 64-pixel images, any transformers image classifier, and one wrapper.

Every model the trainer uses is a transformers ``PreTrainedModel``, so it is saved with
``save_pretrained`` (safetensors) and loaded with ``AutoModelForImageClassification.from_pretrained``
from a folder or a Hub id. The small ResNet registers itself with the Auto classes when this module
is imported.

CLAD's contrastive features are the pooled vector the classification head reads (2048-d for a
ResNet-50). :class:`ClassifierWithFeatures` captures that vector with a forward pre-hook on the
head's last ``nn.Linear``, which works for ResNet, ConvNeXt, ViT, Swin, RegNet, EfficientNet and
the small ResNet alike, without changing the model's weights or names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from augment import trust

SMALL_RESNET = "small-resnet"


class SmallResNetConfig(PretrainedConfig):
    """Configuration of :class:`SmallResNetForImageClassification`.

    Args:
        widths: channels of the four stages (each stage after the first halves the resolution).
        depths: basic blocks per stage.
        stem_stride: total downsampling of the stem (2: a stride-2 conv; 4: plus a max-pool).
    """

    model_type = "clad-small-resnet"

    def __init__(
        self,
        widths: tuple[int, ...] | list[int] = (16, 32, 64, 128),
        depths: tuple[int, ...] | list[int] = (1, 1, 1, 1),
        stem_stride: int = 4,
        num_channels: int = 3,
        **kwargs,
    ):
        if len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} must have the same length")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        self.widths = list(widths)
        self.depths = list(depths)
        self.stem_stride = stem_stride
        self.num_channels = num_channels
        super().__init__(**kwargs)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNetForImageClassification(PreTrainedModel):
    """A ResNet with basic blocks sized for small images (64 px by default): a 3x3 stem, four stages,
    global average pooling and a linear classifier. ``pixel_values``: (B, 3, H, W) normalised."""

    config_class = SmallResNetConfig
    base_model_prefix = "small_resnet"
    main_input_name = "pixel_values"

    def __init__(self, config: SmallResNetConfig):
        super().__init__(config)
        stem: list[nn.Module] = [
            nn.Conv2d(
                config.num_channels, config.widths[0], 3, 2 if config.stem_stride >= 2 else 1, 1, bias=False
            ),
            nn.BatchNorm2d(config.widths[0]),
            nn.ReLU(inplace=True),
        ]
        if config.stem_stride == 4:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        stages, cin = [], config.widths[0]
        for i, (w, d) in enumerate(zip(config.widths, config.depths)):
            blocks = [_BasicBlock(cin, w, 1 if i == 0 else 2)] + [_BasicBlock(w, w, 1) for _ in range(d - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutputWithNoAttention:
        x = self.stages(self.stem(pixel_values))
        pooled = self.pool(x).flatten(1)
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


AutoConfig.register(SmallResNetConfig.model_type, SmallResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(SmallResNetConfig, SmallResNetForImageClassification, exist_ok=True)


def _head_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of the model's classification head."""
    head = getattr(model, "classifier", None) or getattr(model, "head", None) or getattr(model, "fc", None)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no `classifier`, `head` or `fc` module to take features from"
        )
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the head of {type(model).__name__} has no nn.Linear layer")
    return linears[-1]


class ClassifierWithFeatures(nn.Module):
    """Wrap an image classifier so that ``forward`` returns ``(logits, features)``.

    ``features`` (B, D) is the input of the head's last linear layer. The wrapped model stays a
    plain transformers model (``self.model``) that is saved with ``save_pretrained``.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self._features: torch.Tensor | None = None
        head = _head_linear(model)
        self.feature_dim = head.in_features
        head.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features = inputs[0]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixel_values=pixel_values).logits
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the classification head was not called; cannot take features")
        return logits, features.flatten(1)


@dataclass
class Preprocessing:
    """How a model expects its input: square side in pixels and per-channel mean and std."""

    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std)}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_preprocessing(name_or_path: str, default_resolution: int = 224) -> Preprocessing:
    """Input size and normalisation from a model's ``preprocessor_config.json`` (folder or Hub id)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        path = None
    if path is None:
        return Preprocessing(default_resolution, IMAGENET_MEAN, IMAGENET_STD)
    with open(path) as f:
        cfg = json.load(f)
    size = cfg.get("size", default_resolution)
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default_resolution
    crop = cfg.get("crop_size")
    if isinstance(crop, dict) and cfg.get("do_center_crop", False):
        size = crop.get("height", size)
    return Preprocessing(
        int(size), tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))
    )


def save_preprocessing(path: str | os.PathLike, pre: Preprocessing) -> None:
    """Write ``preprocessor_config.json`` that transformers' ``AutoImageProcessor`` understands."""
    cfg = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": pre.resolution, "width": pre.resolution},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
    }
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def build_model(
    backbone: str,
    class_names: list[str],
    resolution: int | None = None,
    widths: tuple[int, ...] | None = None,
) -> tuple[PreTrainedModel, Preprocessing]:
    """A classifier for ``class_names`` and its preprocessing.

    ``backbone`` is ``"small-resnet"`` (a new :class:`SmallResNetForImageClassification`, trained from
    scratch) or a transformers model id / folder (its head is replaced when the class count differs).
    """
    id2label = dict(enumerate(class_names))
    label2id = {n: i for i, n in id2label.items()}
    if backbone == SMALL_RESNET:
        kwargs = {"widths": widths} if widths else {}
        config = SmallResNetConfig(
            num_labels=len(class_names), id2label=id2label, label2id=label2id, **kwargs
        )
        model = SmallResNetForImageClassification(config)
        return model, Preprocessing(resolution or 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    model = AutoModelForImageClassification.from_pretrained(
        backbone,
        num_labels=len(class_names),
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=True,
        **trust.model_kwargs(),
    )
    pre = read_preprocessing(backbone)
    if resolution:
        pre.resolution = resolution
    return model, pre


def load_classifier(path: str) -> tuple[PreTrainedModel, Preprocessing]:
    """A trained classifier (folder or Hub id) and its preprocessing, ready for evaluation."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a model folder written by scripts/train.py")
    model = AutoModelForImageClassification.from_pretrained(path, **trust.model_kwargs())
    return model.eval(), read_preprocessing(path)
