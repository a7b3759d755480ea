"""Foreground, background and alternative-background phrases from a caption and a label.

Two extractors with one interface, ``extractor(captions, labels) -> list[Extraction]``:

* :class:`CaptionParser`: deterministic, no model. The label word is the object; the phrases after
  *on, in, at, near, with, under* are the background.
* :class:`LLMExtractor`: any transformers chat model (``Qwen/Qwen2.5-1.5B-Instruct``, a local folder,
  ...). The conversation is rendered from the versioned template ``prompts/extract_v1.json`` (system
  message, few-shot examples, the caption and label), decoded greedily in batches with left padding,
  and the answer ``{"foreground": [...], "background": [...], "alt": [...]}`` is validated by
  :func:`parse_answer`. A bad answer is sent back with the reason, at most ``max_repairs`` times;
  after that the item falls back to the caption parser (``method`` says so), and an item that even
  the parser cannot read is returned as a rejection with both reasons. Nothing is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prompts import EXTRACT, load_json

from . import trust

__all__ = [
    "AnswerError",
    "Extraction",
    "CaptionParser",
    "LLMExtractor",
    "parse_answer",
    "parse_caption",
]

KEYS = ("foreground", "background", "alt")
MAX_WORDS = 6
MAX_CHARS = 60
MAX_ITEMS = 8
PREPOSITIONS = ("on", "in", "at", "near", "with", "under")
_ARTICLES = {"a", "an", "the", "some", "its", "his", "her", "their"}
# words that end a background phrase in a caption ("on the grass next to a tree")
_STOP = set(PREPOSITIONS) | {"and", "next", "while", "of", "by", "behind", "beside", "during", "to", "from"}


class AnswerError(ValueError):
    """An answer (or caption) that cannot be turned into phrases; the message says why."""


@dataclass
class Extraction:
    """The phrases of one item, or why there are none.

    ``method``: ``llm`` (first answer valid), ``llm-repaired`` (valid after ``attempts - 1`` repairs),
    ``caption-parser`` (no LLM configured), ``caption-parser-fallback`` (the LLM failed; ``error`` says
    how), ``rejected`` (``error`` holds the LLM's and the parser's reasons), or ``no-caption`` (set by
    the generation job for an image with no caption but its label: there is nothing to extract).
    """

    foreground: list[str] = field(default_factory=list)
    background: list[str] = field(default_factory=list)
    alt: list[str] = field(default_factory=list)
    method: str = "caption-parser"
    attempts: int = 0
    error: str | None = None

    @property
    def rejected(self) -> bool:
        return self.method == "rejected"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _label_words(label: str) -> set[str]:
    words = {w for w in re.findall(r"[a-z0-9]+", label.lower())}
    return words | {w + "s" for w in words} | {w[:-1] for w in words if w.endswith("s") and len(w) > 3}


def _json_object(text: str) -> str:
    """The first balanced ``{...}`` of ``text`` (code fences and chatter around it are ignored)."""
    start = text.find("{")
    if start < 0:
        raise AnswerError("no JSON object in the answer")
    depth, in_string, escape = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    raise AnswerError("the JSON object is not closed (truncated answer?)")


def _clean_list(key: str, value: Any) -> list[str]:
    if isinstance(value, str):  # a lone phrase where a list was asked for
        value = [value]
    if not isinstance(value, list):
        raise AnswerError(f'"{key}" must be a list of strings, got {type(value).__name__}')
    if len(value) > MAX_ITEMS:
        raise AnswerError(f'"{key}" has {len(value)} phrases; at most {MAX_ITEMS}')
    out: list[str] = []
    for v in value:
        if not isinstance(v, str):
            raise AnswerError(f'"{key}" must hold strings, found {type(v).__name__}')
        phrase = " ".join(v.strip().strip(".").lower().split())
        if not phrase:
            continue
        if len(phrase) > MAX_CHARS or len(phrase.split()) > MAX_WORDS:
            raise AnswerError(f'"{key}" phrase {v!r} is too long (at most {MAX_WORDS} words)')
        if phrase not in out:
            out.append(phrase)
    return out


def parse_answer(text: str, label: str) -> Extraction:
    """Validate an LLM answer for an item labelled ``label``; raises :class:`AnswerError` with the reason.

    Valid: one JSON object with exactly the keys ``foreground``, ``background``, ``alt``; lists of at
    most ``MAX_ITEMS`` short phrases; ``background`` and ``alt`` not empty; the labelled object not
    among ``foreground``. Phrases are lower-cased, whitespace-normalised and de-duplicated.
    """
    try:
        data = json.loads(_json_object(text))
    except json.JSONDecodeError as e:
        raise AnswerError(f"the answer is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise AnswerError("the answer is not a JSON object")
    missing = [k for k in KEYS if k not in data]
    extra = sorted(set(data) - set(KEYS))
    if missing or extra:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {extra}"] if extra else []
        raise AnswerError(", ".join(parts) + f"; the keys must be {list(KEYS)}")
    fg, bg, alt = (_clean_list(k, data[k]) for k in KEYS)
    if not bg:
        raise AnswerError('"background" is empty')
    if not alt:
        raise AnswerError('"alt" is empty')
    words = _label_words(label)
    leaked = [p for p in fg if words & set(re.findall(r"[a-z0-9]+", p))]
    if leaked:
        raise AnswerError(f'"foreground" names the labelled object {label!r}: {leaked}')
    return Extraction(foreground=fg, background=bg, alt=alt, method="llm")


def parse_caption(caption: str, label: str) -> Extraction:
    """The deterministic parser: phrases after on/in/at/near/with/under are the background.

    ``foreground`` and ``alt`` stay empty (a caption names neither reliably). Raises
    :class:`AnswerError` when the caption has no such phrase.
    """
    words = re.findall(r"[a-z0-9'-]+|[,.;:!?]", caption.lower())
    label_words = _label_words(label)
    background: list[str] = []
    i = 0
    while i < len(words):
        if words[i] in PREPOSITIONS:
            j, phrase = i + 1, []
            while j < len(words) and words[j] not in _STOP and words[j] not in ",.;:!?":
                phrase.append(words[j])
                j += 1
            while phrase and phrase[0] in _ARTICLES:
                phrase = phrase[1:]
            text = " ".join(phrase[:MAX_WORDS])
            if text and not (label_words & set(phrase)) and text not in background:
                background.append(text)
            i = j
        else:
            i += 1
    if not background:
        raise AnswerError(
            f"the caption {caption!r} has no phrase after {'/'.join(PREPOSITIONS)} to take as background"
        )
    return Extraction(background=background, method="caption-parser")


def _from_caption(caption: str, label: str, llm_error: str | None = None, attempts: int = 0) -> Extraction:
    """:func:`parse_caption`, or a rejection saying why; ``llm_error``: the LLM failed first (fallback)."""
    try:
        r = parse_caption(caption, label)
    except AnswerError as e:
        why = f"caption parser: {e}"
        return Extraction(
            method="rejected", attempts=attempts, error=f"{llm_error}; {why}" if llm_error else why
        )
    if llm_error:
        r.method, r.attempts, r.error = "caption-parser-fallback", attempts, llm_error
    return r


class CaptionParser:
    """:func:`parse_caption` over a batch, as an extractor; failures are rejections, not exceptions."""

    def __call__(
        self, captions: Sequence[str], labels: Sequence[str], progress: bool = False
    ) -> list[Extraction]:
        return [_from_caption(c, lab) for c, lab in zip(captions, labels, strict=True)]

    def describe(self) -> dict[str, Any]:
        return {"extractor": "caption-parser", "prepositions": list(PREPOSITIONS)}


Generate = Callable[[list[list[dict[str, str]]]], list[str]]


class LLMExtractor:
    """Phrase extraction with a chat LLM; see the module docstring for the repair and fallback rules.

    ``generate`` maps a batch of conversations (lists of ``{"role", "content"}``) to answer texts; the
    usual way to get one is :meth:`from_pretrained`, which wraps a transformers causal LM.
    """

    def __init__(
        self,
        generate: Generate,
        batch_size: int = 8,
        max_repairs: int = 2,
        template: str = EXTRACT,
        info: dict[str, Any] | None = None,
    ):
        if max_repairs < 0:
            raise ValueError(f"max_repairs must be >= 0, got {max_repairs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generate = generate
        self.batch_size = batch_size
        self.max_repairs = max_repairs
        self.template_name = template
        self.template = load_json(template)
        self.info = dict(info or {})

    # -- prompts --------------------------------------------------------------------------------
    def messages(self, caption: str, label: str) -> list[dict[str, str]]:
        """System message, the template's few-shot examples as turns, then this item's question."""
        t = self.template
        msgs = [{"role": "system", "content": t["system"]}]
        for ex in t.get("examples", []):
            msgs.append(
                {"role": "user", "content": t["user"].format(caption=ex["caption"], label=ex["label"])}
            )
            msgs.append({"role": "assistant", "content": json.dumps(ex["answer"])})
        msgs.append({"role": "user", "content": t["user"].format(caption=caption, label=label)})
        return msgs

    def repair_turns(self, answer: str, error: str) -> list[dict[str, str]]:
        return [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": self.template["repair"].format(error=error)},
        ]

    # -- running --------------------------------------------------------------------------------
    def _generate_batched(self, conversations: list[list[dict[str, str]]], bar) -> list[str]:
        answers: list[str] = []
        for s in range(0, len(conversations), self.batch_size):
            chunk = conversations[s : s + self.batch_size]
            answers.extend(self.generate(chunk))
            if bar is not None:
                bar.update(len(chunk))
        return answers

    def __call__(
        self, captions: Sequence[str], labels: Sequence[str], progress: bool = False
    ) -> list[Extraction]:
        from tqdm.auto import tqdm

        captions, labels = list(captions), list(labels)
        if len(captions) != len(labels):
            raise ValueError(f"{len(captions)} captions but {len(labels)} labels")
        conversations = [self.messages(c, lab) for c, lab in zip(captions, labels)]
        results: list[Extraction | None] = [None] * len(captions)
        errors: list[str] = [""] * len(captions)
        pending = list(range(len(captions)))
        bar = tqdm(total=len(captions), desc="extract phrases", unit="item", disable=not progress)
        for attempt in range(1, self.max_repairs + 2):
            if not pending:
                break
            answers = self._generate_batched(
                [conversations[i] for i in pending], bar if attempt == 1 else None
            )
            still = []
            for i, answer in zip(pending, answers, strict=True):
                try:
                    r = parse_answer(answer, labels[i])
                except AnswerError as e:
                    errors[i] = str(e)
                    conversations[i] = conversations[i] + self.repair_turns(answer, str(e))
                    still.append(i)
                    continue
                r.method, r.attempts = ("llm" if attempt == 1 else "llm-repaired"), attempt
                results[i] = r
            pending = still
        bar.close()
        tries = self.max_repairs + 1
        for i in pending:
            why = f"LLM answer invalid after {tries} attempt{'s' if tries > 1 else ''}: {errors[i]}"
            results[i] = _from_caption(captions[i], labels[i], why, tries)
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:  # every item ends as phrases, a fallback or a rejection; never silently dropped
            raise RuntimeError(f"extraction lost items {missing}")
        return results  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        return {
            "extractor": "llm",
            **self.info,
            "template": self.template_name,
            "max_repairs": self.max_repairs,
            "batch_size": self.batch_size,
        }

    # -- transformers ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 96,
        revision: str | None = None,
        **kwargs,
    ) -> LLMExtractor:
        """Load a chat LLM (hub id or folder) with ``AutoModelForCausalLM``; decoding is greedy.

        ``dtype``: ``"float16"``/``"bfloat16"`` on a GPU (default there: bfloat16), float32 on a CPU.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .runtime import check_model_ref, model_info, resolve_device, resolve_dtype

        model_id_or_path = check_model_ref(model_id_or_path, "--llm")

        device = resolve_device(device)
        torch_dtype = resolve_dtype(device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, revision=revision, **trust.code_kwargs())
        if tokenizer.chat_template is None:
            raise ValueError(
                f"{model_id_or_path}: the tokenizer has no chat template; use an instruction-tuned model"
            )
        tokenizer.padding_side = "left"  # generation continues at the right edge of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            model_id_or_path, revision=revision, dtype=torch_dtype, **trust.model_kwargs()
        )
        model.to(device).eval()
        info = {
            **model_info(model_id_or_path, model, revision, torch_dtype),
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
        }
        return cls(_HFGenerate(model, tokenizer, max_new_tokens), info=info, **kwargs)


class _HFGenerate:
    """Batched greedy generation with a transformers causal LM and its chat template."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.generate_kwargs: dict[str, Any] = {}  # extra model.generate arguments (benchmarks)
        self.calls = 0

    def __call__(self, conversations: list[list[dict[str, str]]]) -> list[str]:
        import torch

        tok = self.tokenizer
        texts = [
            tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=tok.pad_token_id,
                **self.generate_kwargs,
            )
        self.calls += 1
        new = out[:, enc["input_ids"].shape[1] :]
        return tok.batch_decode(new, skip_special_tokens=True)
