"""The data format: JSON Lines, one example per line.

Each example has a source (string) and either `prompt` + `response` or `messages` (chat turns
with `role` and `content`). Supervised tokens are the response / assistant tokens. Bad lines
are reported with file and line number. No tokenization here (that needs the model's
tokenizer and lives in the trainer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One instruction example; `turns` always ends with the supervised assistant turn."""

    source: str
    turns: tuple[Turn, ...]

    @property
    def prompt(self) -> str:
        return "".join(t.content for t in self.turns if t.role != "assistant")

    @property
    def response(self) -> str:
        return self.turns[-1].content


def parse_example(record: object, *, source_field: str = "source") -> Example:
    """Validate one decoded JSON record; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    source = record.get(source_field)
    if not isinstance(source, str) or not source:
        raise ValueError(f"missing or empty string field {source_field!r}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}] needs role in {sorted(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
            turns.append(Turn(m["role"], m["content"]))
        if turns[-1].role != "assistant":
            raise ValueError("the last message must be the assistant's (the supervised turn)")
        return Example(source, tuple(turns))
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError("needs string fields 'prompt' and 'response', or 'messages'")
    if not response:
        raise ValueError("'response' is empty: nothing to supervise")
    return Example(source, (Turn("user", prompt), Turn("assistant", response)))


def iter_examples(path: Path | str, *, source_field: str = "source") -> Iterator[Example]:
    """Yield examples of a JSONL file; the first bad line raises DataError naming file:line."""
    path = Path(path)
    try:
        handle = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror}") from e
    with handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield parse_example(json.loads(line), source_field=source_field)
            except (ValueError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{lineno}: {e}") from e


def read_examples(paths: Iterable[Path | str], *, source_field: str = "source") -> list[Example]:
    return [ex for p in paths for ex in iter_examples(p, source_field=source_field)]


def group_by_source(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Examples per source, sources in first-seen order, examples in file order."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.source, []).append(ex)
    return groups


def example_to_record(example: Example) -> dict:
    """The JSONL record of an example (chat form only when it has more than two turns)."""
    if len(example.turns) == 2 and example.turns[0].role == "user":
        return {"source": example.source, "prompt": example.prompt, "response": example.response}
    return {"source": example.source,
            "messages": [{"role": t.role, "content": t.content} for t in example.turns]}


def write_examples(path: Path | str, examples: Sequence[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(example_to_record(ex)) + "\n")
