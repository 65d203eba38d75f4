"""The data format: JSON Lines, one example per line.

TRL's dataset conventions, so a dataset that works with TRL's SFTTrainer works here:
- standard prompt-completion: `{"source", "prompt": str, "completion": str}` (`response` is
  accepted for `completion`); the text is prompt + completion, concatenated as they are;
- conversational: `{"source", "messages": [{role, content}, ...]}`, or `prompt` and
  `completion` given as message lists; rendered with the tokenizer's chat template.
Supervised tokens are the completion / final assistant turn (meritrun.textenc encodes both
kinds, for training, profiling and evaluation alike). Bad lines are reported with file and
line number. No tokenization here (that needs the model's tokenizer).
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
    conversational: bool = False  # chat messages (template) vs plain prompt + completion

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
        return Example(source, _turns(record["messages"], "messages"), conversational=True)
    if "completion" in record and "response" in record:
        raise ValueError("give 'completion' or 'response' (the same field), not both")
    key = "completion" if "completion" in record else "response"
    prompt, completion = record.get("prompt"), record.get(key)
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational form
        return Example(source, _turns(prompt + completion, f"prompt + {key}"),
                       conversational=True)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ValueError("needs string fields 'prompt' and 'completion' (or 'response'), "
                         "or 'messages'")
    if not completion:
        raise ValueError(f"{key!r} is empty: nothing to supervise")
    return Example(source, (Turn("user", prompt), Turn("assistant", completion)))


def _turns(messages: object, what: str) -> tuple[Turn, ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{what!r} must be a non-empty list of messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{what}[{i}] needs role in {sorted(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{what}[{i}].content must be a string")
        turns.append(Turn(m["role"], m["content"]))
    if turns[-1].role != "assistant":
        raise ValueError("the last message must be the assistant's (the supervised turn)")
    return tuple(turns)


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
    """The JSONL record of an example, in the form it was read (TRL's key names)."""
    if not example.conversational:
        return {"source": example.source, "prompt": example.prompt,
                "completion": example.response}
    return {"source": example.source,
            "messages": [{"role": t.role, "content": t.content} for t in example.turns]}


def write_examples(path: Path | str, examples: Sequence[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(example_to_record(ex)) + "\n")
