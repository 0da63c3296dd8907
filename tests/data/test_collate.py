"""Multi-turn VL conversations: only assistant turns (and their EOS) are supervised, through to the model's loss."""

from vla_scale.data.batch import IGNORE_INDEX
from vla_scale.data.collate import render_conversation
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer

TURNS = [
    {"from": "human", "value": "<image>\nWhat is on the table?"},
    {"from": "gpt", "value": "A red cube."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_only_assistant_turns_are_labelled():
    tok = build_tiny_tokenizer()
    ids, labels = render_conversation(tok, TURNS, max_text_len=200)
    assert len(ids) == len(labels)
    supervised = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    expected = _ids(tok, " A red cube.") + [tok.eos_token_id] + _ids(tok, " On the left.") + [tok.eos_token_id]
    assert supervised == expected
    # every labelled position carries its own id (the model shifts), and user turns are never labelled
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    user = _ids(tok, "USER: Where is it? ASSISTANT:")
    start = next(k for k in range(len(ids)) if ids[k : k + len(user)] == user)
    assert all(lab == IGNORE_INDEX for lab in labels[start : start + len(user)])
