"""`xiaolm data stats`: token lengths of pretraining and chat sets, and what a --seq-len keeps."""

import json

import numpy as np
import pytest

from xiaolm.cli import main
from xiaolm.data.chat_formats import read_conversations
from xiaolm.data.chat_tokens import build_sft_data
from xiaolm.data.stats import data_stats, detect_kind, summarize

from chat_helpers import SFT_TRAIN
from conftest import SAMPLE, sample_texts


def test_text_lengths_are_the_tokenizers_and_seq_len_counts_whole_documents(tmp_path, tokenizer):
    texts = sample_texts("val", limit=40)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    expected = np.array([len(tokenizer.encode(t)) for t in texts])
    result = data_stats([path], tokenizer, seq_lens=[64, int(expected.max())])
    assert result["kind"] == "text"
    assert result["lengths"]["document"].tolist() == expected.tolist()
    summary = result["summaries"]["document"]
    assert (summary["count"], summary["min"], summary["max"]) == (40, expected.min(), expected.max())
    assert summary["p90"] == np.percentile(expected, 90) and summary["mean"] == expected.mean()
    # a window of n positions holds n + 1 tokens: the document and its <|endoftext|>
    assert result["fits"][64] == {"whole": int((expected <= 64).sum()), "split": int((expected > 64).sum())}
    assert result["fits"][int(expected.max())]["split"] == 0


def test_chat_lengths_split_prompt_and_reply_as_sft_does(tokenizer):
    seq_lens = [256, 1024, 8192]
    result = data_stats([SFT_TRAIN], tokenizer, seq_lens=seq_lens)
    assert result["kind"] == "chat"
    lengths = result["lengths"]
    assert (lengths["prompt"] + lengths["reply"]).tolist() == lengths["conversation"].tolist()
    conversations = read_conversations([SFT_TRAIN])
    assert result["summaries"]["conversation"]["count"] == len(conversations)
    for seq_len in seq_lens:  # the same records SFT keeps whole, cuts and drops at that length
        sft = build_sft_data(conversations, tokenizer, seq_len).stats
        fits = result["fits"][seq_len]
        assert fits["dropped"] == sft.num_dropped
        assert fits["cut to whole turns"] + fits["dropped"] == sft.num_truncated
        assert sum(fits.values()) == len(conversations)
    # with every conversation whole, the reply tokens are the tokens SFT puts its loss on
    assert result["fits"][8192]["whole"] == len(conversations)
    assert lengths["reply"].sum() == build_sft_data(conversations, tokenizer, 8192).stats.num_supervised_tokens


def test_a_conversation_longer_than_seq_len_keeps_its_leading_turns(tmp_path, tokenizer):
    turn = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是小助手。"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"conversations": turn * 3}, ensure_ascii=False) + "\n")
    result = data_stats([path], tokenizer, kind="chat", seq_lens=[4, 40, 400])
    first_turn = data_stats([_one(tmp_path, turn)], tokenizer, seq_lens=[1])["summaries"]["conversation"]["max"]
    assert first_turn < 40 < result["summaries"]["conversation"]["max"] < 400
    assert [result["fits"][n] for n in (4, 40, 400)] == [
        {"whole": 0, "cut to whole turns": 0, "dropped": 1},
        {"whole": 0, "cut to whole turns": 1, "dropped": 0},
        {"whole": 1, "cut to whole turns": 0, "dropped": 0}]


def _one(tmp_path, messages):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


def test_cli_prints_tables_and_writes_a_histogram(tmp_path, tokenizer_dir, capsys):
    png = tmp_path / "lengths.png"
    assert main(["data", "stats", str(SFT_TRAIN), "--tokenizer", str(tokenizer_dir), "--seq-len", "128", "256",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for word in ("prompt", "reply", "conversation", "p50", "p90", "p95", "p99", "cut to whole turns"):
        assert word in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "stats", str(SAMPLE / "val.jsonl"), "--tokenizer", str(tokenizer_dir),
                 "--seq-len", "0"]) == 2
    assert "--seq-len must be positive" in capsys.readouterr().err


def test_kind_detection_and_summary():
    assert detect_kind([SFT_TRAIN]) == "chat"
    assert detect_kind([SAMPLE / "val.jsonl"]) == "text"
    assert summarize([1, 2, 3, 4]) == pytest.approx({"count": 4, "min": 1, "mean": 2.5, "p50": 2.5, "p90": 3.7,
                                                     "p95": 3.85, "p99": 3.97, "max": 4})
