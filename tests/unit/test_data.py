"""The JSONL data format: both example shapes parse; bad lines name file and line."""

from __future__ import annotations

import json

import pytest

from meritrun.data import group_by_source, iter_examples, parse_example, write_examples
from meritrun.errors import DataError


def test_prompt_response_and_messages_forms():
    a = parse_example({"source": "s", "prompt": "p", "response": "r"})
    b = parse_example({"source": "s", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"}]})
    assert a.response == b.response == "r"
    assert [t.role for t in b.turns] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "p", "response": "r"}, "source"),
    ({"source": "s", "prompt": "p"}, "'prompt' and 'completion' \\(or 'response'\\)"),
    ({"source": "s", "prompt": "p", "response": ""}, "empty"),
    ({"source": "s", "messages": [{"role": "user", "content": "p"}]}, "assistant"),
    ({"source": "s", "messages": [{"role": "bot", "content": "p"}]}, "role"),
    ([1, 2], "JSON object"),
])
def test_bad_records_say_why(record, reason):
    with pytest.raises(ValueError, match=reason):
        parse_example(record)


def test_bad_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "mix.jsonl"
    good = json.dumps({"source": "s", "prompt": "p", "response": "r"})
    path.write_text(f"{good}\n\n{good}\n{{not json\n")
    with pytest.raises(DataError, match=rf"{path}:4:"):
        list(iter_examples(path))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        list(iter_examples(tmp_path / "nope.jsonl"))


def test_round_trip_and_grouping(tmp_path):
    examples = [parse_example({"source": s, "prompt": "p", "response": "r"}) for s in "abab"]
    write_examples(tmp_path / "x.jsonl", examples)
    again = list(iter_examples(tmp_path / "x.jsonl"))
    assert again == examples
    assert {k: len(v) for k, v in group_by_source(again).items()} == {"a": 2, "b": 2}
