"""Phrase extraction: prompt rendering, the answer validator, the caption parser, the repair loop and a
tiny transformers chat model loaded with ``from_pretrained`` from a folder."""

from __future__ import annotations

import json

import pytest

from augment.extract import (
    AnswerError,
    CaptionParser,
    LLMExtractor,
    parse_answer,
    parse_caption,
)
from augment.tiny import build_tiny_chat_llm
from prompts import load_json


# ---------------------------------------------------------------------------------------------- prompts
def test_messages_follow_the_template():
    ex = LLMExtractor(lambda convs: ["{}"] * len(convs))
    t = load_json("extract_v1")
    msgs = ex.messages("a photo of a dog on the grass", "dog")
    assert msgs[0] == {"role": "system", "content": t["system"]}
    roles = [m["role"] for m in msgs[1:-1]]
    assert roles == ["user", "assistant"] * len(t["examples"])
    assert msgs[-1] == {
        "role": "user",
        "content": "Caption: a photo of a dog on the grass\nLabelled object: dog",
    }
    # every few-shot answer is itself a valid answer for its example's label
    for q, a, example in zip(msgs[1:-1:2], msgs[2:-1:2], t["examples"]):
        assert example["caption"] in q["content"]
        got = parse_answer(a["content"], example["label"])
        assert got.background == example["answer"]["background"]


# --------------------------------------------------------------------------------------- the validator
def test_valid_answer_is_normalised():
    r = parse_answer(
        'Sure! ```json\n{"foreground": ["Man ", "man", "a  boat."], "background": ["sea"], "alt": "lake"}\n```',
        "tench",
    )
    assert (r.foreground, r.background, r.alt) == (["man", "a boat"], ["sea"], ["lake"])
    assert r.method == "llm"


def test_braces_inside_strings_do_not_end_the_object():
    r = parse_answer(
        '{"foreground": ["sign {x}"], "background": ["wall"], "alt": ["beach"]} trailing }', "cat"
    )
    assert r.foreground == ["sign {x}"]


@pytest.mark.parametrize(
    "answer, label, reason",
    [
        ("I cannot help with that.", "dog", "no JSON object"),
        ('{"foreground": [], "background": ["grass"], "alt": ["sand"', "dog", "not closed"),
        ("{foreground: [], background: [grass]}", "dog", "not valid JSON"),
        ('{"foreground": [], "background": ["grass"]}', "dog", "missing keys ['alt']"),
        (
            '{"foreground": [], "background": ["grass"], "alt": ["sand"], "x": 1}',
            "dog",
            "unexpected keys ['x']",
        ),
        (
            '{"foreground": ["dogs"], "background": ["grass"], "alt": ["sand"]}',
            "dog",
            "names the labelled object",
        ),
        (
            '{"foreground": ["a Golden Retriever"], "background": ["grass"], "alt": ["sand"]}',
            "golden retriever",
            "names the labelled",
        ),
        ('{"foreground": [], "background": [], "alt": ["sand"]}', "dog", '"background" is empty'),
        ('{"foreground": [], "background": ["grass"], "alt": []}', "dog", '"alt" is empty'),
        ('{"foreground": 3, "background": ["grass"], "alt": ["sand"]}', "dog", "must be a list"),
        ('{"foreground": [1], "background": ["grass"], "alt": ["sand"]}', "dog", "must hold strings"),
        (
            '{"foreground": [], "background": ["one two three four five six seven"], "alt": ["s"]}',
            "dog",
            "too long",
        ),
        ("[1, 2]", "dog", "no JSON object"),
    ],
)
def test_bad_answers_are_refused_with_the_reason(answer, label, reason):
    with pytest.raises(AnswerError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_answer(answer, label)


# ------------------------------------------------------------------------------------ caption parser
@pytest.mark.parametrize(
    "caption, label, background",
    [
        ("a photo of a dog on the grass in a park", "dog", ["grass", "park"]),
        ("A dog with a ball under the old tree.", "dog", ["ball", "old tree"]),
        ("a photo of a star on striped wallpaper", "star", ["striped wallpaper"]),
        ("a car parked on a street next to a tree", "car", ["street"]),
        ("a bird on a bird feeder near the window", "bird", ["window"]),  # the label is not background
    ],
)
def test_caption_parser(caption, label, background):
    r = parse_caption(caption, label)
    assert r.background == background
    assert r.foreground == [] and r.alt == [] and r.method == "caption-parser"


def test_caption_parser_without_a_background_phrase():
    with pytest.raises(AnswerError, match="no phrase after"):
        parse_caption("a photo of a dog", "dog")
    out = CaptionParser()(["a photo of a dog", "a dog on grass"], ["dog", "dog"])
    assert out[0].rejected and "caption parser" in out[0].error
    assert out[1].background == ["grass"]


# ------------------------------------------------------------------------------------- repair loop
class FakeLLM:
    """Scripted answers per item (keyed by the caption in the last user turn of the first question)."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script
        self.seen: dict[str, list[list[dict]]] = {k: [] for k in script}
        self.batch_sizes: list[int] = []

    def __call__(self, conversations):
        self.batch_sizes.append(len(conversations))
        out = []
        for conv in conversations:
            question = [m for m in conv if m["role"] == "user"][len(load_json("extract_v1")["examples"])]
            caption = question["content"].split("\n")[0].removeprefix("Caption: ")
            self.seen[caption].append(conv)
            answers = self.script[caption]
            out.append(answers[min(len(self.seen[caption]), len(answers)) - 1])
        return out


GOOD = '{"foreground": [], "background": ["grass"], "alt": ["snow"]}'


def test_repair_loop_is_bounded_and_falls_back_or_rejects():
    fake = FakeLLM(
        {
            "a dog on the lawn": ["nonsense", GOOD],  # repaired at the second attempt
            "a cat on a sofa": ["nonsense"],  # never valid: caption parser
            "a cow": ["nonsense"],  # never valid and no background phrase: rejected
            "a fish in a tank": [GOOD],  # valid at once
        }
    )
    ex = LLMExtractor(fake, batch_size=2, max_repairs=2)
    out = ex(list(fake.script), ["dog", "cat", "cow", "fish"])
    assert [r.method for r in out] == ["llm-repaired", "caption-parser-fallback", "rejected", "llm"]
    assert [r.attempts for r in out] == [2, 3, 3, 1]
    assert [len(fake.seen[c]) for c in fake.script] == [2, 3, 3, 1]  # never more than 1 + max_repairs
    assert out[1].background == ["sofa"] and "after 3 attempts" in out[1].error
    assert "no JSON object" in out[2].error and "caption parser" in out[2].error
    # the repair turn carries the bad answer and the validator's reason
    last = fake.seen["a cat on a sofa"][-1]
    assert last[-2] == {"role": "assistant", "content": "nonsense"}
    assert "no JSON object in the answer" in last[-1]["content"]
    # batches of 2: the 4 first questions, the 3 first repairs, the 2 second repairs
    assert fake.batch_sizes == [2, 2, 2, 1, 2]


def test_no_repairs():
    fake = FakeLLM({"a dog on grass": ["bad", GOOD]})
    (r,) = LLMExtractor(fake, max_repairs=0)(["a dog on grass"], ["dog"])
    assert r.method == "caption-parser-fallback" and r.attempts == 1 and len(fake.seen["a dog on grass"]) == 1


# --------------------------------------------------------------------------------- a real tiny model
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return build_tiny_chat_llm(tmp_path_factory.mktemp("tiny-llm"))


def test_tiny_llm_garbage_ends_in_fallback_or_rejection(tiny_llm):
    ex = LLMExtractor.from_pretrained(tiny_llm, device="cpu", max_new_tokens=12, batch_size=3, max_repairs=1)
    captions = ["a photo of a dog on the grass", "a cat in a box", "a cow", "a red car on a street"]
    out = ex(captions, ["dog", "cat", "cow", "car"])
    assert len(out) == 4
    for caption, r in zip(captions, out):
        if r.method in ("llm", "llm-repaired"):  # possible in principle, never silently dropped
            assert r.background
        elif caption == "a cow":
            assert r.rejected and r.error
        else:
            assert r.method == "caption-parser-fallback" and r.background and r.error
    info = ex.describe()
    assert info["model"] == tiny_llm and info["template"] == "extract_v1" and info["decoding"] == "greedy"


def test_batched_generation_equals_one_at_a_time(tiny_llm):
    """Left padding: a short and a long prompt in one batch decode exactly as they do alone."""
    ex = LLMExtractor.from_pretrained(tiny_llm, device="cpu", max_new_tokens=10)
    convs = [
        ex.messages("a dog on grass", "dog"),
        ex.messages("a big red car parked on a long street at night", "car"),
    ]
    assert ex.generate.tokenizer.padding_side == "left"
    together = ex.generate(convs)
    alone = [ex.generate([c])[0] for c in convs]
    assert together == alone
    assert ex.generate.calls == 3


def test_llm_without_chat_template_is_refused(tiny_llm, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    target = tmp_path / "no-template"
    shutil.copytree(tiny_llm, target)
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = None
    (target / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(target)
    cfg = json.loads((target / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        LLMExtractor.from_pretrained(str(target), device="cpu")
