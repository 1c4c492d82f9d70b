import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xiaolm.tokenizer.bpe import CHAT_TEMPLATE, SPECIAL_TOKENS, load_tokenizer, train_tokenizer


def test_special_token_ids(tokenizer):
    assert [tokenizer.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tokenizer.eos_id == 0 and tokenizer.end_of_turn_id == 2 and tokenizer.stop_ids == (2, 0)
    assert tokenizer.bos_id is None and not tokenizer.add_bos and tokenizer.pad_id == 0


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes()[i] for i in ids) == text.encode("utf-8")


def test_round_trip_with_special_tokens_in_text(tokenizer):
    text = f"{SPECIAL_TOKENS[1]}user\n你好{SPECIAL_TOKENS[2]}\n"
    ids = tokenizer.encode(text)
    assert 1 in ids and tokenizer.end_of_turn_id in ids
    assert tokenizer.decode(ids) == text


def test_save_and_load(tokenizer, tokenizer_dir):
    loaded = load_tokenizer(tokenizer_dir)
    assert loaded.encode("中华人民共和国宪法") == tokenizer.encode("中华人民共和国宪法")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="xiaolm tokenizer train"):
        load_tokenizer(tmp_path)


def test_vocab_too_small():
    with pytest.raises(ValueError, match="at least"):
        train_tokenizer(["abc"], vocab_size=100)


def test_hf_autotokenizer_loads_and_renders_chat(tokenizer, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [
        {"role": "system", "content": "你是小助手。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "讲个故事"},
    ]
    for add_generation_prompt in (False, True):
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert rendered == tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    text = tokenizer.render_chat(messages, add_generation_prompt=True)
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert "im_start" in CHAT_TEMPLATE


def test_spread_sample_draws_from_everywhere():
    from xiaolm.utils import spread_sample

    texts = [f"a{i}" * 50 for i in range(100)] + [f"b{i}" * 50 for i in range(100)]  # two "sources"
    picked = list(spread_sample(lambda: iter(texts), max_chars=sum(map(len, texts)) // 10))
    assert 15 <= len(picked) <= 25
    assert any(t.startswith("a") for t in picked) and any(t.startswith("b") for t in picked)
    assert picked == list(spread_sample(lambda: iter(texts), max_chars=sum(map(len, texts)) // 10))
    assert list(spread_sample(lambda: iter(texts), max_chars=10**9)) == texts
