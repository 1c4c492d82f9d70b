import pytest
import torch

from xiaolm.config import ModelConfig
from xiaolm.inference.engine import Engine, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.transformer import Transformer

from conftest import greedy_reference, tiny_model_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=100, num_heads=3), "num_heads=3 must divide hidden_size=100"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide num_heads=4"),
        (dict(num_layers=0), "num_layers must be positive"),
        (dict(hidden_size=12, num_heads=4, num_kv_heads=2), "head_dim=3 must be even"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model_config(**overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="choose from"):
        ModelConfig.from_preset("huge")


def test_preset_sizes():
    # parameter counts of the named shapes, tied embeddings counted once
    small = Transformer(ModelConfig.from_preset("minimind2-small"))
    assert 25_500_000 < small.num_parameters() < 26_500_000
    assert small.lm_head.weight is small.embed_tokens.weight
    tiny = ModelConfig.from_preset("tiny")
    assert tiny.hidden_size < small.config.hidden_size


def test_untied_embeddings_are_separate():
    model = Transformer(tiny_model_config(tie_embeddings=False))
    assert model.lm_head.weight is not model.embed_tokens.weight


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_decode_equals_full_forward(qk_norm):
    model = Transformer(tiny_model_config(qk_norm=qk_norm)).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 20)
        pieces = [model(ids[:, :7], cache=cache)]  # prefill
        pieces.append(model(ids[:, 7:12], cache=cache))  # several tokens onto a filled cache
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]  # one at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20


def test_kv_cache_rows_at_different_positions_equal_full_forward():
    # three sequences of different lengths decoded in one batch, each row at its own position
    model = Transformer(tiny_model_config()).eval()
    sequences = [torch.randint(0, 512, (20,)) for _ in range(3)]
    prompt_lengths = [9, 4, 12]
    cache = model.allocate_cache(3, 24)
    with torch.no_grad():
        pieces = [[model(s[None, :p], cache=cache.rows(i, i + 1))[0]]
                  for i, (s, p) in enumerate(zip(sequences, prompt_lengths))]  # prefill each row alone
        assert cache.lengths.tolist() == prompt_lengths
        for step in range(5):  # one token for every row together
            tokens = torch.stack([s[p + step] for s, p in zip(sequences, prompt_lengths)])[:, None]
            logits = model(tokens, cache=cache)
            for i in range(3):
                pieces[i].append(logits[i])
        two = torch.stack([s[p + 5:p + 7] for s, p in zip(sequences, prompt_lengths)])  # two tokens at once
        logits = model(two, cache=cache)
        for i in range(3):
            pieces[i].append(logits[i])
        for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
            full = model(s[None, :p + 7])[0]
            torch.testing.assert_close(torch.cat(pieces[i]), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [p + 7 for p in prompt_lengths]


def test_greedy_engine_equals_full_forward_decoding():
    model = Transformer(tiny_model_config()).eval()
    prompts = torch.randint(0, 512, (3, 5)).tolist()
    requests = [Request(p, SamplingConfig(max_new_tokens=30, temperature=0)) for p in prompts]
    Engine(model, None, num_slots=3).run(requests)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == greedy_reference(model, prompt, 30)
        assert request.finish_reason == "length"


def test_sequence_longer_than_context_is_refused():
    model = Transformer(tiny_model_config(max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causality():
    # changing a later token must not change earlier logits
    model = Transformer(tiny_model_config()).eval()
    ids = torch.randint(0, 512, (1, 16))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
