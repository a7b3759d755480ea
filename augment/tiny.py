"""Tiny, seeded, randomly initialised models for tests and offline benchmarks.

They exercise the same ``from_pretrained`` path as a real model id: each builder saves a model folder
and returns its path. The weights are random, so the outputs are garbage by design; what they test is
the plumbing (batching, padding, validation, fallbacks), never quality.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "build_tiny_chat_llm"]

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
