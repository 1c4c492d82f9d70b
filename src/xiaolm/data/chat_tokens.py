"""Chat data as token rows: the assistant-only loss mask, truncation to whole replies, packing.

SFT renders each conversation with the tokenizer's chat template and supervises each assistant
turn's reply and closing end-of-turn token (``<|im_end|>``, Llama 3's ``<|eot_id|>``) only
(:func:`tokenize_conversation`). A conversation
too long for the sequence keeps its leading turns up to the last whole reply, or is cut mid-reply
with ``truncate="tokens"`` (:func:`truncate_conversation`); DPO pairs follow the same rule
(:func:`tokenize_preference`). Short conversations are packed into rows whose per-token document
ids keep them apart (:class:`SftData`; the attention mask is ``model.transformer.document_mask``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from xiaolm.data.chat_formats import Message, PreferencePair
from xiaolm.tokenizer.bpe import XiaoTokenizer

IGNORE_INDEX = -100


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
