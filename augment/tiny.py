"""Tiny, seeded, randomly initialised models for tests and offline benchmarks.

They exercise the same ``from_pretrained`` path as a real model id: each builder saves a model folder
and returns its path. The weights are random, so the outputs are garbage by design; what they test is
the plumbing (batching, padding, validation, fallbacks), never quality.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "build_tiny_captioner",
    "build_tiny_clip",
    "build_tiny_chat_llm",
    "build_tiny_sam",
    "build_tiny_owlv2",
    "build_tiny_grounding_dino",
]

# a ChatML-style template: enough for apply_chat_template with system/user/assistant turns
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat_llm(path: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> str:
    """A Qwen2 causal LM (byte-level BPE of 400 tokens, ChatML template) saved to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from prompts import EXTRACT, load_json

    specials = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(load_json(EXTRACT)), "a photo of a dog on the grass", '{"background": ["sea"]}']
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    path = Path(path)
    Qwen2ForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


CAPTION_WORDS = ["a", "photo", "of", "dog", "cat", "on", "the", "grass", "sea", "in", "with", "tree", "sand"]


def build_tiny_captioner(path: str | Path, seed: int = 0, kind: str = "blip") -> str:
    """An image-to-text model saved to ``path``: BLIP (``kind="blip"``) or GIT (``"git"``), 64 px,
    hidden size 64, 2 layers, a word-level BERT tokenizer over :data:`CAPTION_WORDS`."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *CAPTION_WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]")
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision = {**small, "image_size": 64, "patch_size": 8}
    torch.manual_seed(seed)
    if kind == "blip":
        text = {
            **small,
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id,
            "sep_token_id": tok.sep_token_id,
            "eos_token_id": tok.sep_token_id,
        }
        model = BlipForConditionalGeneration(
            BlipConfig(text_config=text, vision_config=vision, projection_dim=64)
        )
        processor = BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}), tok)
    elif kind == "git":
        config = GitConfig(
            vision_config=vision,
            vocab_size=len(vocab),
            max_position_embeddings=64,
            bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id,
            **small,
        )
        model = GitForCausalLM(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
        )
        processor = GitProcessor(image_processor, tok)
    else:
        raise ValueError(f"kind must be 'blip' or 'git', got {kind!r}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def build_tiny_sam(path: str | Path, seed: int = 0, image_size: int = 128) -> str:
    """A transformers ``SamModel`` (ViT of hidden 64, 2 layers, patch 8, ``image_size`` px input) and its
    ``SamProcessor`` (PIL backend, longest side and padding ``image_size``) saved to ``path``."""
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessorPil,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    patch = 8
    vision = SamVisionConfig(
        hidden_size=64,
        output_channels=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=16,
        mlp_dim=128,
    )
    prompt = SamPromptEncoderConfig(
        hidden_size=32, image_size=image_size, patch_size=patch, mask_input_channels=4
    )
    decoder = SamMaskDecoderConfig(
        hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32
    )
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt.to_dict(),
        mask_decoder_config=decoder.to_dict(),
    )
    mask_side = image_size // 4  # the decoder's low-resolution masks
    processor = SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": image_size},
            pad_size={"height": image_size, "width": image_size},
            mask_size={"longest_edge": mask_side},
            mask_pad_size={"height": mask_side, "width": mask_side},
        )
    )
    path = Path(path)
    SamModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _tiny_clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer over the 256 byte-level characters (alone and with ``</w>``) and a few
    merges, built without any download."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [
        ("d", "o"),
        ("do", "g</w>"),
        ("c", "a"),
        ("ca", "t</w>"),
        ("g", "r"),
        ("a", "s"),
        ("as", "s</w>"),
    ]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _clip_towers(tokenizer, max_length: int, image_size: int, patch_size: int) -> dict:
    """Text and vision tower configs (hidden 32, 2 layers, 4 heads) of a tiny CLIP-family model."""
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": max_length,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return {
        "text_config": text,
        "vision_config": {**tower, "image_size": image_size, "patch_size": patch_size},
    }


def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> str:
    """A ``CLIPModel`` (towers of hidden 32, 2 layers, patch 8, projection 16) with its tiny tokenizer
    (32 tokens) and a PIL image processor, saved to ``path``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tokenizer = _tiny_clip_tokenizer(max_length=32)
    torch.manual_seed(seed)
    config = CLIPConfig(**_clip_towers(tokenizer, 32, image_size, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = {"height": image_size, "width": image_size}
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=size).save_pretrained(path)
    return str(path)


def build_tiny_owlv2(path: str | Path, seed: int = 0, image_size: int = 64) -> str:
    """An ``Owlv2ForObjectDetection`` (text and vision towers of hidden 32, 2 layers; patch 16, so
    ``(image_size / 16)^2`` boxes per image) with an ``Owlv2Processor`` (PIL image backend, a tiny CLIP
    tokenizer, 16 tokens per query) saved to ``path``."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    tokenizer = _tiny_clip_tokenizer(max_length=16)
    torch.manual_seed(seed)
    config = Owlv2Config(**_clip_towers(tokenizer, 16, image_size, patch_size=16), projection_dim=32)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # random box offsets collapse every box to a sliver: predict the anchors
        model.box_head.dense2.weight.zero_()  # each patch's box is its own anchor (a quarter of the side)
        model.box_head.dense2.bias.zero_()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def build_tiny_grounding_dino(path: str | Path, seed: int = 0) -> str:
    """A ``GroundingDinoForObjectDetection`` (transformers Swin backbone of embed 16, one block per
    stage; BERT text tower of hidden 32, one layer; d_model 32, one encoder and two decoder layers,
    20 queries, 32 text positions) with a ``GroundingDinoProcessor`` (PIL image backend, shortest side
    64, a WordPiece tokenizer over a small hand-written vocabulary) saved to ``path``. No timm."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "'", "-"]
    words += ["a", "the", "dog", "cat", "bird", "grass", "sky", "sea", "red", "ball", "tree", "on", "of"]
    words += list(letters) + ["##" + c for c in letters] + list("0123456789")
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, model_max_length=32)
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_indices=[2, 3, 4],
        ).to_dict(),
        text_config=BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
        ).to_dict(),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # one decoder layer breaks the tied box-head definition
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        max_text_len=32,
        encoder_n_points=2,
        decoder_n_points=2,
        disable_custom_kernels=True,
    )
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=tokenizer,
    )
    path = Path(path)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
