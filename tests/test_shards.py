import numpy as np
import pytest

from xiaolm.data.shards import PackedTokens, read_meta, write_shards

from conftest import sample_texts


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("shards") / "train"
    write_shards(sample_texts("train", limit=200), tokenizer, directory, source_key="k", shard_tokens=20_000)
    return directory


def test_documents_end_with_eos_and_round_trip(shard_dir, tokenizer):
    meta = read_meta(shard_dir)
    assert len(meta["shards"]) > 1  # small shard size forces several shards
    assert meta["num_documents"] == 200
    texts = sample_texts("train", limit=200)
    first = meta["shards"][0]["name"]
    tokens = np.fromfile(shard_dir / f"{first}.bin", dtype=meta["dtype"])
    starts = np.load(shard_dir / f"{first}.docs.npy")
    end = starts[1] - 1
    assert tokens[end] == tokenizer.eos_id
    assert tokenizer.decode(tokens[: end].tolist()) == texts[0]
    assert meta["num_bytes"] == sum(len(t.encode()) for t in texts)


def test_cached_when_key_matches(shard_dir, tokenizer):
    before = (shard_dir / "meta.json").stat().st_mtime_ns
    write_shards(["other text"], tokenizer, shard_dir, source_key="k")
    assert (shard_dir / "meta.json").stat().st_mtime_ns == before


def test_every_token_is_a_target_once_per_epoch(shard_dir):
    data = PackedTokens(shard_dir, seq_len=32, seed=3)
    seen = np.zeros(data.num_windows, dtype=int)
    order = data._order_for(0)
    seen[order] += 1
    assert (seen == 1).all()
    inputs, targets = data.batch(0, 4)
    assert inputs.shape == targets.shape == (4, 32)
    assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())  # shifted by one
    # consecutive windows overlap by exactly one token, and no token is padding
    assert np.array_equal(data.window(0)[-1:], data.window(1)[:1])


def test_order_is_seeded_and_changes_per_epoch(shard_dir):
    a = PackedTokens(shard_dir, seq_len=32, seed=3)
    b = PackedTokens(shard_dir, seq_len=32, seed=3)
    c = PackedTokens(shard_dir, seq_len=32, seed=4)
    n = a.num_windows
    assert np.array_equal(a.sample(5), b.sample(5))
    assert not np.array_equal(a._order_for(0), c._order_for(0))
    assert not np.array_equal(a._order_for(0), a._order_for(1))
    assert np.array_equal(a.sample(n + 2), a.window(int(a._order_for(1)[2])))


def test_too_little_data_is_a_clear_error(tmp_path, tokenizer):
    write_shards(["短"], tokenizer, tmp_path / "s")
    with pytest.raises(ValueError, match="too few for one window"):
        PackedTokens(tmp_path / "s", seq_len=64, seed=0)


def test_empty_input_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        write_shards([], tokenizer, tmp_path / "s")
    assert not (tmp_path / "s").exists()
