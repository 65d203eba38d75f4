"""TRL's dataset conventions (issue 12 point 9): prompt + completion concatenated as they are,
`messages` through the tokenizer's chat template, a documented default template (said once)
when the tokenizer has none; training, profiling and evaluation encode the same way."""

from __future__ import annotations

import logging

import pytest

from merit_trainer.profiling.calibration import count_supervised_tokens, encode_supervised
from merit_trainer.tiny import build_byte_tokenizer
from merit_trainer.training import encode_examples
from meritrun import textenc
from meritrun.data import parse_example
from meritrun.textenc import IGNORE, encode_context, encode_example

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: cab"},
        {"role": "assistant", "content": "abc"}]
# A template unlike ChatML, to see that the tokenizer's own is the one used.
OWN_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/]{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture
def tok():
    textenc._warned.clear()
    return build_byte_tokenizer()


def text(tok, ids):
    return tok.decode([i for i in ids if i != IGNORE], skip_special_tokens=False)


@pytest.mark.parametrize("key", ["completion", "response"])
def test_prompt_and_completion_are_concatenated_as_they_are(tok, key):
    ex = parse_example({"source": "s", "prompt": "sort: cab\n", key: "abc"})
    enc = encode_example(tok, ex, max_len=512)
    assert text(tok, enc.input_ids) == "sort: cab\nabc<|eos|>"  # no role markers of ours
    assert text(tok, enc.labels) == "abc<|eos|>"
    assert enc.input_ids == tok("sort: cab\nabc")["input_ids"] + [tok.eos_token_id]
    assert encode_context(tok, ex) == tok("sort: cab\n")["input_ids"]


def test_a_chat_template_is_not_applied_to_plain_prompt_completion(tok):
    tok.chat_template = OWN_TEMPLATE
    ex = parse_example({"source": "s", "prompt": "p ", "completion": "c"})
    assert text(tok, encode_example(tok, ex, max_len=64).input_ids) == "p c<|eos|>"


def test_messages_use_the_tokenizers_chat_template(tok, caplog):
    tok.chat_template = OWN_TEMPLATE
    ex = parse_example({"source": "s", "messages": CHAT})
    enc = encode_example(tok, ex, max_len=512)
    assert text(tok, enc.input_ids) == ("[system]be brief[/][user]sort: cab[/][assistant]abc[/]"
                                        "<|eos|>")
    assert text(tok, enc.labels) == "abc[/]<|eos|>"
    assert text(tok, encode_context(tok, ex)) == "[system]be brief[/][user]sort: cab[/][assistant]"
    assert "no chat template" not in caplog.text


def test_messages_without_a_template_use_chatml_and_say_so_once(tok, caplog):
    ex = parse_example({"source": "s", "messages": CHAT})
    with caplog.at_level(logging.WARNING, logger="meritrun.textenc"):
        first = encode_example(tok, ex, max_len=512)
        encode_example(tok, ex, max_len=512)
        encode_context(tok, ex)
    assert caplog.text.count("has no chat template") == 1
    assert "ChatML" in caplog.text and "docs/data.md" in caplog.text
    assert text(tok, first.input_ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsort: cab<|im_end|>\n"
        "<|im_start|>assistant\nabc<|im_end|>\n<|eos|>")
    assert text(tok, first.labels) == "abc<|im_end|>\n<|eos|>"


def test_trl_conversational_prompt_completion_lists(tok):
    ex = parse_example({"source": "s", "prompt": CHAT[:2], "completion": CHAT[2:]})
    assert ex.conversational and ex.response == "abc"
    assert encode_example(tok, ex, max_len=512) == encode_example(
        tok, parse_example({"source": "s", "messages": CHAT}), max_len=512)


def test_truncation_keeps_the_start_and_can_leave_nothing_supervised(tok):
    ex = parse_example({"source": "s", "prompt": "x" * 20, "completion": "abc"})
    assert encode_example(tok, ex, max_len=21).supervised == 1
    assert encode_example(tok, ex, max_len=20).supervised == 0


def test_training_profiling_and_token_accounting_agree(tok):
    examples = [parse_example({"source": "s", "prompt": f"copy: {w}\n", "completion": w})
                for w in ("ab", "abcdef", "x" * 40, "y" * 200)]
    examples.append(parse_example({"source": "s", "messages": CHAT}))
    trained, skipped = encode_examples(tok, examples, max_len=128)
    profiled = encode_supervised(tok, examples, max_len=128)
    assert trained == profiled and len(trained) == 4 and skipped == 1
    assert count_supervised_tokens(tok, examples, max_len=128) == sum(e.supervised
                                                                       for e in trained)


def test_both_completion_and_response_is_refused():
    with pytest.raises(ValueError, match="not both"):
        parse_example({"source": "s", "prompt": "p", "completion": "c", "response": "r"})
