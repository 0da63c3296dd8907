"""The offline byte-level BPE tokenizer that every family's tiny checkpoint ships with.

Trained on a built-in tabletop-robot corpus, so the words tests and the CPU demo use
are a few tokens each; every byte is in the vocabulary, so no text is ever unknown.
Families differ only in their special tokens and whether BOS is prepended.
"""

from __future__ import annotations

import itertools

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
TINY_VOCAB_SIZE = 512

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "grey", "brown"]
_OBJECTS = [
    "block", "cube", "bowl", "cup", "mug", "plate", "spoon", "fork", "sponge", "towel", "drawer", "cabinet",
    "door", "lid", "pot", "pan", "bottle", "can", "box", "basket", "ball", "button", "switch", "light", "apple",
    "banana", "carrot", "marker", "pen", "book", "tray", "shelf", "table", "sink", "stove", "microwave", "fridge",
]  # fmt: skip
_VERBS = [
    "pick up", "put", "place", "push", "pull", "open", "close", "lift", "move", "slide", "stack", "rotate", "turn on",
    "turn off", "press", "grasp", "release", "wipe", "pour", "drop", "take", "insert", "flip", "fold", "unfold",
]  # fmt: skip
_PLACES = ["on the table", "in the drawer", "into the bowl", "on the plate", "to the left", "to the right",
           "next to the cup", "on top of the box", "in the sink", "on the shelf", "off the tray"]  # fmt: skip
_CAPTIONS = [
    "A robot arm is holding a {c} {o}.",
    "There is a {c} {o} on the table.",
    "The gripper is open and the {o} is {c}.",
    "Question: What color is the {o}? Answer: It is {c}.",
    "Question: Where is the {o}? Answer: The {o} is {p}.",
    "USER: <image>\nDescribe the image. ASSISTANT: A {c} {o} and a robot gripper.",
    "What does the robot do next? It will {v} the {c} {o}.",
]


def tiny_corpus() -> list[str]:
    """Instructions, captions and QA about tabletop robots, so the tiny BPE covers the words tests use."""
    lines = []
    for verb, colour, obj in itertools.product(_VERBS, _COLOURS, _OBJECTS):
        lines.append(f"{verb} the {colour} {obj}")
    for (colour, obj), place in zip(itertools.product(_COLOURS, _OBJECTS), itertools.cycle(_PLACES)):
        lines.append(f"Put the {colour} {obj} {place}.")
        for template in _CAPTIONS:
            lines.append(template.format(c=colour, o=obj, p=place, v=_VERBS[len(lines) % len(_VERBS)]))
    lines += ["Yes.", "No.", "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9"]
    return lines


def build_tiny_tokenizer(
    pad: str | None = PAD,
    bos: str | None = BOS,
    eos: str = EOS,
    extra_special_tokens: dict[str, str] | None = None,
    append_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained offline; prepends `bos` (Llama/Gemma style) unless it is None (Qwen style), no EOS
    unless `append_eos` (CLIP style: its text model pools the EOS position). `pad=None` pads with `eos` (CLIP).

    The defaults are LLaVA's (`<pad>`, `<s>`, `</s>`, `<image>` as `image_token`). `extra_special_tokens`
    maps attribute names to token strings (e.g. `{"image_token": "<|image_pad|>"}`); they get ids right
    after pad/bos/eos, in the given order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    extras = {"image_token": IMAGE} if extra_special_tokens is None else dict(extra_special_tokens)
    specials = [t for t in [pad, bos, eos] if t is not None] + list(extras.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    if append_eos:
        if bos is None:
            raise ValueError("append_eos needs a bos token too (CLIP's <|startoftext|> ... <|endoftext|> layout)")
        ids = [(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {bos} $B {eos}", special_tokens=ids
        )
    elif bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad if pad is not None else eos,
        extra_special_tokens=extras,
        model_max_length=2048,
        padding_side="right",
    )
