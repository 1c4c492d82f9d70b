import pytest
import torch

from xiaolm.config import ModelConfig
from xiaolm.inference.generate import SamplingConfig, generate_tokens
from xiaolm.model.transformer import Transformer

from conftest import tiny_model_config


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


def test_greedy_with_cache_equals_without():
    model = Transformer(tiny_model_config()).eval()
    prompt = torch.randint(0, 512, (3, 5))
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    with_cache = torch.stack(list(generate_tokens(model, prompt, cfg, use_cache=True)), dim=1)
    without = torch.stack(list(generate_tokens(model, prompt, cfg, use_cache=False)), dim=1)
    assert with_cache.shape == (3, 30)
    assert torch.equal(with_cache, without)


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
