import torch

from xiaolm.inference.generate import SamplingConfig, TextStreamer, apply_repetition_penalty, generate_tokens, sample_next
from xiaolm.model.transformer import Transformer

from conftest import tiny_model_config


def test_streamer_never_splits_or_drops_characters(tokenizer):
    text = "三国演义：滚滚长江东逝水，浪花淘尽英雄。🙂 emoji and English, ünïcödé."
    ids = tokenizer.encode(text)
    # a byte-level tokenizer this small splits multi-byte characters across tokens
    assert any(not tokenizer.token_bytes()[i].decode("utf-8", errors="ignore") for i in ids) or len(ids) > len(text) // 2
    streamer = TextStreamer(tokenizer.token_bytes())
    pieces = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_streamer_one_byte_at_a_time():
    text = "汉字ab"
    table = [bytes([b]) for b in range(256)]
    streamer = TextStreamer(table)
    pieces = [streamer.push(b) for b in text.encode("utf-8")]
    assert pieces == ["", "", "汉", "", "", "字", "a", "b"]


def test_streamer_keeps_invalid_bytes_visible():
    streamer = TextStreamer([b"\xe6\xb1", b"a"])
    out = streamer.push(0) + streamer.push(1) + streamer.flush()
    assert out == "\ufffda"


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert picks == {0, 1}
    # top token has p ~= 0.72 < 0.8, so the second is kept too, the rest dropped
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), gen)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), gen)) for _ in range(50)}
    assert picks == {0}


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_seeded_sampling_is_reproducible_and_stops():
    model = Transformer(tiny_model_config()).eval()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)
    a = [int(t) for t in generate_tokens(model, [1, 2, 3], cfg)]
    b = [int(t) for t in generate_tokens(model, [1, 2, 3], cfg)]
    assert a == b and len(a) == 20
    stop = a[4]
    c = [int(t) for t in generate_tokens(model, [1, 2, 3], cfg, stop_ids=[stop])]
    assert c[-1] == stop and len(c) == a.index(stop) + 1
