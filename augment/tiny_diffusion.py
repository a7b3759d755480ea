"""Tiny, seeded Stable-Diffusion-shaped pipelines for tests and offline benchmarks.

Each builder saves a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) and returns its path, so the code under test loads
it with ``from_pretrained`` exactly as it would load ``stabilityai/stable-diffusion-2-inpainting``.
The weights are random: the images are noise; what they test is the plumbing (batching, seeds, masks,
exact pixel restoration, saving and loading adapters).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["build_tiny_clip_text", "build_tiny_diffusion", "TINY_DIFFUSION_KINDS"]

# kind -> (diffusers pipeline class, UNet input channels)
TINY_DIFFUSION_KINDS = {
    "text2img": ("StableDiffusionPipeline", 4),
    "img2img": ("StableDiffusionImg2ImgPipeline", 4),
    "inpaint": ("StableDiffusionInpaintPipeline", 9),
    "instruct-pix2pix": ("StableDiffusionInstructPix2PixPipeline", 8),
}


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level vocabulary: 256 byte symbols, the same with ``</w>``, a few merges."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = ["t h", "th e</w>", "o n</w>", "i n</w>", "o f</w>", "p h", "ph o"]
    for m in merges:
        vocab_list.append(m.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tiny_clip_text(path: str | Path, seed: int = 0, max_length: int = 16):
    """A CLIP tokenizer (byte level, hand-written vocabulary) and a 2-layer CLIP text model of width
    32, saved under ``path/tokenizer`` and ``path/text_encoder``; returns ``(tokenizer, text_encoder)``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_vocab()
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(path / "tokenizer" / "vocab.json"),
        str(path / "tokenizer" / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_length,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(config)
    tokenizer.save_pretrained(path / "tokenizer")
    text_encoder.save_pretrained(path / "text_encoder")
    return tokenizer, text_encoder


def build_tiny_diffusion(path: str | Path, kind: str = "inpaint", seed: int = 0) -> str:
    """A Stable-Diffusion-shaped pipeline of ``kind`` (see :data:`TINY_DIFFUSION_KINDS`) saved to ``path``.

    UNet with blocks (32, 64) and cross-attention width 32, a 4-block VAE (factor 8), the tiny CLIP
    text model, DDIM; 64-px images take about 0.15 s for 4 images x 10 steps on 2 CPU cores.
    """
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    if kind not in TINY_DIFFUSION_KINDS:
        raise ValueError(f"kind must be one of {sorted(TINY_DIFFUSION_KINDS)}, got {kind!r}")
    pipe_cls_name, in_channels = TINY_DIFFUSION_KINDS[kind]
    path = Path(path)
    tokenizer, text_encoder = build_tiny_clip_text(path / "_text", seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        in_channels=in_channels,
        out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe_cls = getattr(diffusers, pipe_cls_name)
    pipe = pipe_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    shutil.rmtree(path / "_text", ignore_errors=True)
    return str(path)
