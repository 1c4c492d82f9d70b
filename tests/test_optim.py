"""Muon for the hidden matrices, AdamW for the rest, driven by the loop as one optimizer."""

import json

import pytest
import torch

from xiaolm.config import TrainConfig
from xiaolm.model.transformer import Transformer
from xiaolm.train.optim import CombinedOptimizer, build_optimizer
from xiaolm.train.runners import run_pretrain

from conftest import tiny_model_config, tiny_train_config


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = Transformer(tiny_model_config())
    optimizer = build_optimizer(model.named_parameters(), TrainConfig(optimizer="muon"), "cpu")
    assert isinstance(optimizer, CombinedOptimizer)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    adamw_names = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert muon_names == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")}
    assert "embed_tokens.weight" in adamw_names and "norm.weight" in adamw_names
    # every parameter once, the tied output head included through the embedding
    assert len(muon_names) + len(adamw_names) == len(list(model.parameters()))
    assert len(optimizer.param_groups) == 3


def test_optimizer_name_is_checked():
    with pytest.raises(ValueError, match="optimizer must be adamw or muon"):
        TrainConfig(optimizer="sgd")


def test_muon_trains(tmp_path, tokenizer, shards):
    cfg = tiny_train_config(tmp_path / "run", max_steps=20, eval_every=0, optimizer="muon", lr=1e-2)
    run_pretrain(tiny_model_config(), cfg, tokenizer, *shards)
    curve = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "tok_per_s" in r]
    assert curve[-1] < curve[0] - 0.5


def test_resume_refuses_another_optimizer(tmp_path, tokenizer, shards):
    run_pretrain(tiny_model_config(), tiny_train_config(tmp_path / "run", max_steps=2), tokenizer, *shards)
    with pytest.raises(ValueError, match="train.optimizer: checkpoint has 'adamw', this run has 'muon'"):
        run_pretrain(tiny_model_config(),
                     tiny_train_config(tmp_path / "run", max_steps=4, resume=True, optimizer="muon"), tokenizer,
                     *shards)
