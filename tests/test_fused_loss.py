"""The fused output head + cross-entropy equals the plain one; activation checkpointing changes
nothing but memory."""

import json

import pytest
import torch
import torch.nn.functional as F

from xiaolm.model.loss import linear_cross_entropy
from xiaolm.model.transformer import Transformer, fused_projections
from xiaolm.train.runners import run_pretrain

from conftest import tiny_model_config, tiny_train_config


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(autocast):
    hidden = torch.randn(300, 64, requires_grad=True)
    weight = torch.randn(500, 64, requires_grad=True)
    targets = torch.randint(0, 500, (300,))
    targets[::7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        plain = F.cross_entropy((hidden @ weight.T).float(), targets)
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=64)  # 5 chunks, the last short
    plain_grads = torch.autograd.grad(plain * 3, [hidden, weight])
    fused_grads = torch.autograd.grad(fused * 3, [hidden, weight])
    tolerance = 1e-2 if autocast else 1e-5  # bf16 matmuls, fp32 softmax in both
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(plain.item(), rel=tolerance)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads):
        assert fused_grad.dtype == torch.float32
        scale = plain_grad.abs().max().item()  # bf16 rounds each product to ~3 digits
        torch.testing.assert_close(fused_grad, plain_grad, rtol=tolerance, atol=tolerance * scale)


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = Transformer(tiny_model_config())
    inputs = torch.randint(0, 512, (2, 16))
    targets = torch.randint(0, 512, (2, 16))
    targets[0, :5] = -100
    logits = model(inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert model(inputs, targets=targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with torch.no_grad():  # evaluation: loss only, no gradients kept
        assert model(inputs, targets=targets).item() == pytest.approx(expected.item(), rel=1e-6)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(run_dir / "metrics.jsonl")) if "tok_per_s" in r]


@pytest.mark.parametrize("overrides", [dict(dropout=0.1), dict(num_experts=4, num_experts_per_token=2)])
def test_activation_checkpointing_gives_identical_losses(tmp_path, tokenizer, shards, overrides):
    for name, recompute in (("plain", False), ("recompute", True)):
        cfg = tiny_train_config(tmp_path / name, max_steps=4, eval_every=0, activation_checkpointing=recompute)
        run_pretrain(tiny_model_config(**overrides), cfg, tokenizer, *shards)
    assert losses(tmp_path / "recompute") == losses(tmp_path / "plain")


def test_stacked_projections_follow_the_weights_at_inference():
    model = Transformer(tiny_model_config()).prepare_for_decoding()
    inputs = torch.randint(0, 512, (1, 8))
    attention = model.layers[0].attn
    with torch.no_grad():
        before = model(inputs)
        assert attention._stacked_weights[1].shape == (64 + 2 * 32, 64)  # q, k, v stacked and kept
        separate = torch.cat([attention.q_proj(attention_input := torch.randn(3, 64)),
                              attention.k_proj(attention_input), attention.v_proj(attention_input)], dim=-1)
        stacked = torch.cat(fused_projections(attention, attention_input,
                                              (attention.q_proj, attention.k_proj, attention.v_proj)), dim=-1)
        torch.testing.assert_close(stacked, separate)
        attention.v_proj.weight.mul_(2.0)  # an in-place change (a step, a load) must not be missed
        after = model(inputs)
    assert not torch.allclose(before, after)
    fresh = Transformer(tiny_model_config()).eval()  # not prepared: projections apart
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs), after)
    assert not hasattr(fresh.layers[0].attn, "_stacked_weights")


def test_training_drops_the_stacks_kept_for_decoding():
    model = Transformer(tiny_model_config()).prepare_for_decoding()
    inputs = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        model(inputs)
    model.train()
    with torch.no_grad():  # fused AdamW writes in place without moving version counters
        for param in model.parameters():
            param.add_(0.01)
    model.eval()
    with torch.no_grad():
        expected = Transformer(tiny_model_config()).eval()
        expected.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(inputs), expected(inputs))
