"""Shared tiny fixtures: a tokenizer trained on the committed corpus sample, tiny configs."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from xiaolm.config import ModelConfig, TrainConfig
from xiaolm.tokenizer.bpe import train_tokenizer


def pypi_reachable() -> bool:
    """Whether the tests that fetch pinned packages can run (CI has PyPI; an offline laptop skips them)."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def sample_texts(split: str = "train", limit: int | None = None) -> list[str]:
    texts = []
    with open(SAMPLE / f"{split}.jsonl", encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if limit and len(texts) >= limit:
                break
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(sample_texts("train", limit=400), vocab_size=512)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tokenizer):
    """Train and val token shards of the sample, for training tests."""
    from xiaolm.data.shards import write_shards

    root = tmp_path_factory.mktemp("data")
    write_shards(sample_texts("train", limit=300), tokenizer, root / "train", source_key="train")
    write_shards(sample_texts("val", limit=50), tokenizer, root / "val", source_key="val")
    return root / "train", root / "val"


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def tiny_train_config(out_dir, **overrides) -> TrainConfig:
    base = dict(out_dir=str(out_dir), seq_len=32, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2,
                eval_every=4, num_eval_batches=2, save_every=4, log_every=1, progress=False, device="cpu",
                precision="fp32")  # auto would measure bf16 on a CPU that has it: exact tests pin fp32
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@torch.no_grad()
def greedy_reference(model, prompt: list[int], num_new: int) -> list[int]:
    """Greedy continuation by full forwards of the whole sequence, no KV cache: what cached and
    batched decoding are held to."""
    ids = list(prompt)
    for _ in range(num_new):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def decode_alone_and_together(model, prompts, samplings, num_slots=None, tokenizer=None):
    """Each request decoded by itself, and all of them in one engine (`num_slots` rows, so some
    may wait for a free slot): the two lists of Requests, in the order of `prompts`."""
    from xiaolm.inference.engine import Engine, Request

    stop = frozenset(tokenizer.stop_ids) if tokenizer is not None else frozenset()
    alone = []
    for prompt, sampling in zip(prompts, samplings):
        request = Request(list(prompt), sampling, stop_ids=stop)
        Engine(model, tokenizer).run([request])
        alone.append(request)
    together = [Request(list(prompt), sampling, stop_ids=stop) for prompt, sampling in zip(prompts, samplings)]
    Engine(model, tokenizer, num_slots=num_slots or len(prompts)).run(together)
    return alone, together
