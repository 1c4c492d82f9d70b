import torch

from xiaolm.inference.engine import Engine, Request, TextStreamer
from xiaolm.inference.sampling import SamplingConfig, apply_repetition_penalty, sample_next
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
    out = apply_repetition_penalty(logits, torch.tensor([[True, True, False]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_seeded_sampling_is_reproducible_and_stops():
    model = Transformer(tiny_model_config()).eval()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=7)

    def run(stop_ids=frozenset()):
        request = Request([1, 2, 3], cfg, stop_ids=stop_ids)
        Engine(model, None).run([request])
        return request

    a, b = run(), run()
    assert a.output_ids == b.output_ids and len(a.output_ids) == 20 and a.finish_reason == "length"
    stop = a.output_ids[4]
    c = run(frozenset({stop}))
    assert c.output_ids == a.output_ids[:a.output_ids.index(stop) + 1]
    assert c.finish_reason == "stop" and c.stop_id == stop


def test_vanishing_temperature_and_top_p_are_greedy_not_nan():
    # found by fuzzing the server: logits / 1e-30 overflow float32 and the softmax turns to NaN;
    # top_p = 5e-324 is 0 in float32 and dropped every token
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=1e-30), None), logits.argmax(dim=-1))
    tiny_top_p = SamplingConfig(temperature=1.0, top_p=5e-324)
    assert torch.equal(sample_next(logits, tiny_top_p, torch.Generator().manual_seed(0)), logits.argmax(dim=-1))
