"""Chat and preference data: formats, file:line errors, the assistant-only mask, truncation, packing."""

import json

import pytest
import torch

from xiaolm.data.chat_formats import parse_conversation, parse_preference, read_conversations, read_preferences
from xiaolm.data.chat_tokens import IGNORE_INDEX, build_sft_data, tokenize_conversation
from xiaolm.data.corpus import build_chat_data
from xiaolm.data.readers import BadRecordError, ReadStats
from xiaolm.model.transformer import document_mask
from xiaolm.tokenizer.bpe import IM_END

from conftest import SAMPLE

CHAT = SAMPLE / "chat"
EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def test_all_formats_give_the_same_messages():
    minimind = {"conversations": EXPECTED}
    openai = {"messages": EXPECTED}
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    alpaca = {"system": "Be brief.", "instruction": "2+2", "input": "?", "output": "4", "history": [["你好", "你好！"]]}
    for record in (minimind, openai, sharegpt):
        assert parse_conversation(record) == EXPECTED
    alpaca_messages = parse_conversation(alpaca)
    assert alpaca_messages[3]["content"] == "2+2\n?" and alpaca_messages[:3] == EXPECTED[:3]
    assert parse_conversation(sharegpt, "sharegpt") == EXPECTED
    with pytest.raises(ValueError, match="unknown chat format"):
        parse_conversation({"text": "x"})


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "'role' is missing"),
    ({"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]}, "content is empty"),
    ({"conversations": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}, "turn 1 is 'assistant'"),
    ({"conversations": [{"role": "user", "content": "hi"}]}, "ends with a 'user' turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "turn 2 is 'system'"),
])
def test_bad_records_name_file_and_line(tmp_path, record, reason):
    path = tmp_path / "chat.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(BadRecordError, match=f"{path}:3: .*{reason}"):
        read_conversations([path])
    stats = ReadStats()
    assert len(read_conversations([path], skip_bad=True, stats=stats)) == 1 and stats.num_bad == 1


def test_not_json_and_json_array_line_numbers(tmp_path):
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    with pytest.raises(BadRecordError, match=r"x.jsonl:2: bad JSON"):
        read_conversations([lines])
    array = tmp_path / "x.json"
    good = {"instruction": "a", "input": "", "output": "b"}
    array.write_text(json.dumps([good, good, {"instruction": "a", "output": ""}], indent=2))
    expected_line = array.read_text().splitlines().index("  {", 10) + 1  # where the third record starts
    with pytest.raises(BadRecordError, match=rf"x.json:{expected_line}: output: content is empty"):
        read_conversations([array])


def test_preference_formats():
    prompt = [{"role": "user", "content": "Q"}]
    minimind = {"chosen": prompt + [{"role": "assistant", "content": "good"}],
                "rejected": prompt + [{"role": "assistant", "content": "bad"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"}}
    for record in (minimind, sharegpt):
        pair = parse_preference(record)
        assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, "good", "bad")
    with pytest.raises(ValueError, match="share every turn"):
        parse_preference({**minimind, "rejected": [{"role": "user", "content": "other"},
                                                   {"role": "assistant", "content": "bad"}]})
    pairs = read_preferences([CHAT / "dpo" / "train.jsonl"])
    assert len(pairs) > 50 and all(p.prompt[-1]["role"] == "user" for p in pairs)


def test_mask_covers_exactly_the_assistant_tokens(tokenizer):
    ids, supervised = tokenize_conversation(tokenizer, EXPECTED)
    assert ids == tokenizer.encode(tokenizer.render_chat(EXPECTED))  # the template in the tokenizer, one place
    # token by token: the supervised tokens are the assistant contents, each closed by <|im_end|>
    runs, current = [], []
    for token, flag in zip(ids, supervised):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    assert [tokenizer.decode(run) for run in runs] == ["你好！" + IM_END, "4" + IM_END]
    unsupervised = tokenizer.decode([t for t, f in zip(ids, supervised) if not f])
    assert "Be brief." in unsupervised and "2+2?" in unsupervised and "assistant\n" in unsupervised


def test_truncation_drops_samples_without_targets_and_counts_them(tokenizer):
    long_user = [{"role": "user", "content": "很长的问题" * 40}, {"role": "assistant", "content": "好"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    data = build_sft_data([long_user, short], tokenizer, seq_len=48)
    assert data.stats.num_dropped == 1 and data.stats.num_truncated == 1 and data.stats.num_conversations == 2
    with pytest.raises(ValueError, match="no conversation has a supervised token"):
        build_sft_data([long_user], tokenizer, seq_len=48)


def test_truncation_keeps_whole_replies_or_cuts_tokens(tokenizer):
    long_reply = "很长的回答" * 40
    two_turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                 {"role": "user", "content": "more"}, {"role": "assistant", "content": long_reply}]
    one_long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_reply}]
    turns = build_sft_data([two_turns, one_long], tokenizer, seq_len=48, pack=False)
    # "turns": the first exchange survives whole, ending with its supervised <|im_end|>; the lone
    # long reply has no whole reply within 48 tokens and is dropped, counted
    assert turns.num_rows == 1 and turns.stats.num_truncated == 2 and turns.stats.num_dropped == 1
    supervised = turns.targets[0][turns.targets[0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(supervised) == "ok" + IM_END
    used = int((turns.doc_ids[0] >= 0).sum())
    assert tokenizer.decode(turns.inputs[0, :used].tolist() + [turns.targets[0, used - 1].item()]) == \
        tokenizer.render_chat(two_turns[:2]).rstrip("\n")
    # "tokens": both cut at 49 tokens, mid-reply, with no end token on the long replies
    tokens = build_sft_data([two_turns, one_long], tokenizer, seq_len=48, pack=False, truncate="tokens")
    assert tokens.num_rows == 2 and tokens.stats.num_dropped == 0, tokens.stats
    counts = sorted(int((row != IGNORE_INDEX).sum()) for row in tokens.targets)
    assert counts[0] > len(tokenizer.encode("ok")) + 1 and counts[1] > 20  # both keep part of the long reply
    assert (tokens.targets == tokenizer.end_of_turn_id).sum() == 1  # only "ok"'s end survives
    with pytest.raises(ValueError, match="--truncate tokens"):
        build_sft_data([one_long], tokenizer, seq_len=48)
    with pytest.raises(ValueError, match="truncate='middle'"):
        build_sft_data([one_long], tokenizer, seq_len=48, truncate="middle")


def test_packing_keeps_conversations_apart(tokenizer):
    conversations = read_conversations([CHAT / "sft" / "train.jsonl"])[:30]
    packed = build_sft_data(conversations, tokenizer, seq_len=256, pack=True)
    unpacked = build_sft_data(conversations, tokenizer, seq_len=256, pack=False)
    assert packed.num_rows < unpacked.num_rows == 30 - unpacked.stats.num_dropped
    assert (packed.targets != IGNORE_INDEX).sum() == (unpacked.targets != IGNORE_INDEX).sum()
    assert packed.doc_ids.max() >= 1  # some row holds several conversations
    # a target never belongs to another conversation: the last input of each document is its own
    for row in range(packed.num_rows):
        docs = packed.doc_ids[row]
        ends = (docs[1:] != docs[:-1]).nonzero().flatten()
        for end in ends.tolist():
            assert packed.targets[row, end] in (IGNORE_INDEX, tokenizer.end_of_turn_id)
    mask = document_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    assert mask.tolist() == [[True, False, False, False, False], [True, True, False, False, False],
                             [False, False, True, False, False], [False, False, True, True, False],
                             [False, False, False, False, True]]


def test_default_chat_sample_is_up_to_date(tmp_path):
    # the committed sample was built by `xiaolm data build --out data/sample ... --chat-max-records 40`;
    # its manifest matches, so nothing is fetched (the cache folder is empty)
    manifest = build_chat_data(CHAT, tmp_path / "empty-cache", max_per_file=40)
    assert manifest["up_to_date"] and manifest["sources"]["identity.json"] == 40
    identity = [c for c in read_conversations([CHAT / "sft"]) if "xiaolm" in c[-1]["content"]]
    assert identity and not any("{{" in c[-1]["content"] for c in identity)
