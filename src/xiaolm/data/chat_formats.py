"""Chat (SFT) and preference (DPO) records: readers for the common formats, validated.

Formats, detected per record (or named with ``fmt``):

- ``minimind``: ``{"conversations": [{"role": ..., "content": ...}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system"?: ...}``
- ``openai``: ``{"messages": [{"role": ..., "content": ...}, ...]}``
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}``

Preference records: minimind's ``{"chosen": [messages], "rejected": [messages]}`` (two whole
conversations that share everything but the last assistant turn), and the ShareGPT style of the
LLaMA-Factory demo files, ``{"conversations": [prompt], "chosen": {"from": "gpt", "value": ...},
"rejected": {...}}`` (``messages`` works in place of ``conversations``; chosen/rejected may also be
plain strings).

Files are ``.jsonl`` (one record a line) or ``.json`` (one JSON array, pretty-printed or not). A
malformed record (not JSON, a missing role, empty content, turns out of order) raises
:class:`~xiaolm.data.readers.BadRecordError` with ``file:line``; ``skip_bad=True`` counts and skips
it instead. A conversation is never silently changed into something else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xiaolm.data.readers import BadRecordError, ReadStats, iter_json_records, keep_good_records

Message = dict[str, str]
CHAT_FORMATS = ("auto", "minimind", "sharegpt", "openai", "alpaca")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}


# --------------------------------------------------------------------------- reading records


def _list_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")
                            and not p.name.startswith(".") and p.name != "manifest.json")
        elif path.is_file():
            if path.suffix not in (".json", ".jsonl"):
                raise ValueError(f"{path}: chat data must be .jsonl or .json")
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not files:
        raise ValueError(f"no .jsonl or .json files in {[str(p) for p in paths]}")
    return files


def _content(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: content is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"{where}: content is empty")
    return value


def _parse_messages(
    items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[Message]:
    """A list of turns as messages: `role_key` names the speaker (mapped through `roles`),
    `content_key` the text. One parser for every format, so every format gets the same checks."""
    if not isinstance(items, list) or not items:
        raise ValueError(f"field {key!r} must be a non-empty list of messages")
    messages = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        if role_key not in item:
            raise ValueError(f"{where}: {role_key!r} is missing (keys: {sorted(item)})")
        if item[role_key] not in roles:
            raise ValueError(f"{where}: role {item[role_key]!r} is not one of {sorted(roles)}")
        if content_key not in item:
            raise ValueError(f"{where}: {content_key!r} is missing")
        messages.append({"role": roles[item[role_key]], "content": _content(item[content_key], where)})
    return messages


def _role_messages(items: Any, key: str) -> list[Message]:
    """{"role", "content"} items (minimind, OpenAI)."""
    return _parse_messages(items, key, "role", "content", {role: role for role in ROLES})


def _sharegpt_messages(items: Any, key: str) -> list[Message]:
    """{"from", "value"} items (ShareGPT)."""
    return _parse_messages(items, key, "from", "value", _SHAREGPT_ROLES)


def _detect(record: dict) -> str:
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        turns = record["conversations"]
        first = turns[0] if isinstance(turns, list) and turns else {}
        return "sharegpt" if isinstance(first, dict) and "from" in first else "minimind"
    if "instruction" in record:
        return "alpaca"
    raise ValueError(f"unknown chat format (keys: {sorted(record)[:10]}); expected 'conversations', 'messages' "
                     "or 'instruction'")


def _with_system(record: dict, messages: list[Message]) -> list[Message]:
    system = record.get("system")
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": _content(system, "system")}, *messages]
    return messages


def parse_conversation(record: Any, fmt: str = "auto") -> list[Message]:
    """One record -> messages [system?, user, assistant, user, assistant, ...], validated.
    Raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    fmt = _detect(record) if fmt == "auto" else fmt
    if fmt == "minimind":
        messages = _role_messages(record.get("conversations"), "conversations")
    elif fmt == "openai":
        messages = _role_messages(record.get("messages"), "messages")
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(record.get("conversations"), "conversations")
    elif fmt == "alpaca":
        messages = _alpaca_messages(record)
    else:
        raise ValueError(f"unknown chat format {fmt!r}; choose from {list(CHAT_FORMATS)}")
    messages = _with_system(record, messages)
    check_turn_order(messages)
    return messages


def _alpaca_messages(record: dict) -> list[Message]:
    for key in ("instruction", "output"):
        if key not in record:
            raise ValueError(f"alpaca record: {key!r} is missing (keys: {sorted(record)})")
    messages: list[Message] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError("alpaca record: 'history' must be a list of [query, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError(f"history[{i}]: expected a [query, answer] pair")
        messages += [{"role": "user", "content": _content(pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _content(pair[1], f"history[{i}][1]")}]
    query = _content(record["instruction"], "instruction")
    if record.get("input"):
        query = f"{query}\n{_content(record['input'], 'input')}"
    messages += [{"role": "user", "content": query},
                 {"role": "assistant", "content": _content(record["output"], "output")}]
    return messages


def check_turn_order(messages: list[Message], ends_with: str = "assistant") -> None:
    """system? then user/assistant alternating, starting with user and ending with `ends_with`."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("the conversation has no user or assistant turn")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(f"turn {i + 1} is {message['role']!r} where {expected!r} was expected "
                             "(a system message may only come first; user and assistant alternate)")
    if turns[-1]["role"] != ends_with:
        raise ValueError(f"the conversation ends with a {turns[-1]['role']!r} turn, expected {ends_with!r}")


@dataclass
class PreferencePair:
    """A prompt conversation (ending with a user turn) and two candidate assistant replies."""

    prompt: list[Message]
    chosen: str
    rejected: str


def _reply(value: Any, key: str) -> str:
    if isinstance(value, str):
        return _content(value, key)
    if isinstance(value, dict):
        role = value.get("role", _SHAREGPT_ROLES.get(value.get("from", ""), value.get("from")))
        if role != "assistant":
            raise ValueError(f"{key}: the reply must come from the assistant, got role {role!r}")
        return _content(value.get("content", value.get("value")), key)
    raise ValueError(f"{key}: expected a string or a message, got {type(value).__name__}")


def parse_preference(record: Any) -> PreferencePair:
    """One preference record (minimind or ShareGPT style) -> PreferencePair. Raises ValueError."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise ValueError(f"preference record: {key!r} is missing (keys: {sorted(record)})")
    prompt_key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
    if prompt_key is None:  # minimind: two whole conversations
        chosen = parse_conversation({"messages": record["chosen"]}, "openai")
        rejected = parse_conversation({"messages": record["rejected"]}, "openai")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("'chosen' and 'rejected' must share every turn but the last assistant reply")
        return PreferencePair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])
    turns = record[prompt_key]
    first = turns[0] if isinstance(turns, list) and turns else {}
    prompt = (_sharegpt_messages(turns, prompt_key) if isinstance(first, dict) and "from" in first
              else _role_messages(turns, prompt_key))
    prompt = _with_system(record, prompt)
    check_turn_order(prompt, ends_with="user")
    return PreferencePair(prompt, _reply(record["chosen"], "chosen"), _reply(record["rejected"], "rejected"))


def _read(paths, parse, skip_bad: bool, stats: ReadStats | None) -> Iterator[Any]:
    for path in _list_files(paths):
        yield from keep_good_records(_parsed_records(path, parse), skip_bad, stats)


def _parsed_records(path: Path, parse) -> Iterator[Any]:
    """`parse` applied to each JSON record of `path`; a record it rejects becomes a
    BadRecordError with the file and line."""
    for line_no, record in iter_json_records(path):
        if not isinstance(record, BadRecordError):
            try:
                record = parse(record)
            except ValueError as err:
                record = BadRecordError(path, line_no, str(err))
        yield record


def read_conversations(paths: Sequence[str | Path], fmt: str = "auto", *, skip_bad: bool = False,
                       stats: ReadStats | None = None) -> list[list[Message]]:
    """Every conversation under `paths` (files or folders of .jsonl/.json), validated."""
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; choose from {list(CHAT_FORMATS)}")
    return list(_read(paths, lambda r: parse_conversation(r, fmt), skip_bad, stats))


def read_preferences(paths: Sequence[str | Path], *, skip_bad: bool = False,
                     stats: ReadStats | None = None) -> list[PreferencePair]:
    return list(_read(paths, parse_preference, skip_bad, stats))
