"""Mixture of Experts: routing, dispatch, balancing, and the MoE model through training."""

import json
import math

import pytest
import torch

from xiaolm.config import ModelConfig
from xiaolm.inference.engine import Engine, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.moe import (
    MoEFeedForward,
    balance_loss,
    gathered_dispatch,
    grouped_dispatch,
    loop_dispatch,
    num_active_parameters,
)
from xiaolm.model.transformer import FeedForward, Transformer
from xiaolm import checkpoint as ckpt
from xiaolm.train.runners import run_pretrain
from xiaolm.train.stages import next_token_loss

from conftest import greedy_reference, sample_texts, tiny_model_config, tiny_train_config


def tiny_moe_config(**overrides) -> ModelConfig:
    base = dict(num_experts=4, num_experts_per_token=2, moe_intermediate_size=32)
    return tiny_model_config(**{**base, **overrides})


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_every_token_gets_k_distinct_experts_with_weights_summing_to_one(scoring, top_k):
    layer = MoEFeedForward(tiny_moe_config(num_experts=6, num_experts_per_token=top_k, moe_scoring=scoring))
    layer.expert_bias.copy_(torch.randn(6))  # a bias changes the choice, never the rule
    with torch.no_grad():
        layer.router.weight.normal_()
        scores, indices, weights = layer.route(torch.randn(50, 64))
    assert indices.shape == weights.shape == (50, top_k)
    assert all(len(set(row)) == top_k for row in indices.tolist())
    assert (weights > 0).all()
    if top_k > 1:  # normalised
        torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    else:  # top-1 keeps the raw score, so the router learns from the language-model loss
        torch.testing.assert_close(weights[:, 0], scores.gather(-1, indices)[:, 0])


def test_one_expert_top1_equals_the_dense_feed_forward():
    moe = MoEFeedForward(tiny_moe_config(num_experts=1, num_experts_per_token=1, moe_intermediate_size=48))
    dense = FeedForward(64, 48)
    dense.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize("per_sequence", [False, True])
def test_balance_loss_is_minimal_for_uniform_routing(per_sequence):
    B, T, E, k = 2, 8, 4, 2
    uniform_probs = torch.full((B, T, E), 1 / E)
    balanced = torch.tensor([[0, 1], [2, 3]]).repeat(B, T // 2, 1)  # (B, T, k), every expert equally
    assert balance_loss(uniform_probs, balanced, E, per_sequence).item() == pytest.approx(1.0)
    # any skew, in the choices and the probabilities behind them, costs more
    skewed_probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).expand(B, T, E)
    skewed = torch.tensor([0, 1]).expand(B, T, k)
    assert balance_loss(skewed_probs, skewed, E, per_sequence).item() > 1.2
    # tokens that share one router distribution p all choose its top k: the loss is then E times
    # the mean of p's k largest entries, above 1 unless p is uniform
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        probs = torch.rand(E, generator=generator).softmax(-1).expand(B, T, E)
        chosen = probs.topk(k, dim=-1).indices
        assert balance_loss(probs, chosen, E, per_sequence).item() > 1.0


def test_grouped_and_gathered_dispatch_equal_the_naive_loop():
    layer = MoEFeedForward(tiny_moe_config(num_experts=5, num_experts_per_token=2))
    x = torch.randn(40, 64, requires_grad=True)

    def run(dispatch):  # output and gradients of the input, the router and every expert
        _, indices, weights = layer.route(x)
        out = dispatch(x, indices, weights, layer.experts)
        return out, torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])

    looped, grads_looped = run(loop_dispatch)
    for dispatch in (grouped_dispatch, gathered_dispatch):  # gathered: what compiled decoding runs
        out, grads = run(dispatch)
        torch.testing.assert_close(out, looped, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, grads_looped):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_experts_without_tokens_still_get_zero_gradients():
    # DDP needs a gradient for every parameter, even for an expert no token chose this step
    layer = MoEFeedForward(tiny_moe_config(num_experts=4, num_experts_per_token=1))
    layer.expert_bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))  # every token picks expert 0
    layer.train()
    layer(torch.randn(2, 6, 64)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert all(p.grad.abs().sum() == 0 for p in layer.experts[3].parameters())
    assert layer.experts[0].down_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides", [
    dict(num_shared_experts=1, first_k_dense=1),
    dict(moe_scoring="sigmoid", num_experts_per_token=3),
])
def test_kv_cache_decode_equals_full_forward(overrides):
    model = Transformer(tiny_moe_config(**overrides)).eval()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, 20)
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_engine_equals_full_forward_decoding():
    model = Transformer(tiny_moe_config(num_shared_experts=1)).eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (5, 8)]  # rows at different positions
    requests = [Request(p, SamplingConfig(max_new_tokens=12, temperature=0)) for p in prompts]
    Engine(model, None, num_slots=2).run(requests)
    for prompt, request in zip(prompts, requests):
        assert request.output_ids == greedy_reference(model, prompt, 12)


def test_training_loss_includes_the_weighted_aux_loss():
    model = Transformer(tiny_moe_config(moe_aux_loss_coef=0.5, num_layers=3, first_k_dense=1))
    batch = {"inputs": torch.randint(0, 512, (2, 16)), "targets": torch.randint(0, 512, (2, 16))}
    out = next_token_loss(model, batch)  # the loop trains on out.loss + out.aux_loss
    per_layer = [block.mlp.last_aux_loss for block in model.layers[1:]]
    assert model.layers[0].mlp.__class__ is FeedForward and all(a is not None for a in per_layer)
    torch.testing.assert_close(out.aux_loss, 0.5 * sum(per_layer), rtol=1e-4, atol=1e-6)
    model.config.moe_aux_loss_coef = 0.0
    plain = next_token_loss(model, batch)
    assert plain.aux_loss is None
    torch.testing.assert_close(plain.loss, out.loss, rtol=1e-5, atol=1e-6)  # the same forward
    model.eval()  # evaluation and decoding carry no aux loss
    assert model(batch["inputs"], return_aux_loss=True)[1] is None


def test_bias_balancing_moves_load_towards_uniform():
    config = tiny_moe_config(num_experts=4, num_experts_per_token=1, moe_bias_update_rate=0.05,
                             moe_balance_loss="none")
    layer = MoEFeedForward(config).train()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.02)
        layer.router.weight[0] += 0.05  # with inputs of positive mean, expert 0 wins most tokens
    x = torch.randn(4, 32, 64) + 0.5

    def max_load():
        _, indices, _ = layer.route(x.flatten(0, 1))
        return torch.bincount(indices.flatten(), minlength=4).max().item() / indices.numel()

    before = max_load()
    for _ in range(100):
        layer(x)
        layer.update_bias(lambda t: t)
    assert before > 0.4 and max_load() < before - 0.1
    assert layer.step_counts.sum() == 0 and "expert_bias" in layer.state_dict()


@pytest.mark.parametrize("overrides, message", [
    (dict(num_experts_per_token=5), "num_experts_per_token=5 must be between 1 and num_experts=4"),
    (dict(first_k_dense=2), "first_k_dense=2 must be in"),
    (dict(moe_scoring="tanh"), "moe_scoring must be softmax or sigmoid"),
    (dict(moe_balance_loss="global"), "moe_balance_loss must be batch, sequence or none"),
    (dict(num_experts=0, num_shared_experts=1), "num_shared_experts needs routed experts"),
])
def test_invalid_moe_config_raises_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_moe_config(**overrides)


def test_dense_config_is_unchanged():
    config = tiny_model_config()
    assert config.num_experts == 0 and config.moe_intermediate_size == 0
    assert not any(isinstance(m, MoEFeedForward) for m in Transformer(config).modules())


def preset_counts(name):
    with torch.device("meta"):  # counts only: no memory, no initialisation cost
        model = Transformer(ModelConfig.from_preset(name))
    return model.num_parameters(), num_active_parameters(model)


def test_moe_preset_sizes():
    total, active = preset_counts("minimind-3-moe")  # the reference publishes 198M total, 64M active
    assert 197e6 < total < 199.5e6 and 63e6 < active < 65e6
    total, active = preset_counts("deepseek-moe-small")
    dense_total, _ = preset_counts("minimind2-small")
    assert abs(active - dense_total) / dense_total < 0.01  # as wide per token as its dense peer
    assert total > 2.5 * active
    total, active = preset_counts("tiny-moe")
    assert active == preset_counts("tiny")[0] + 4 * 4 * 256  # plus the routers


def records(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_moe_trains_logs_load_and_resumes_exactly(tmp_path, tokenizer, shards):
    model_cfg = dict(num_shared_experts=1, first_k_dense=1, moe_bias_update_rate=1e-2,
                     moe_balance_loss="sequence")
    full = tiny_train_config(tmp_path / "full", max_steps=8, save_every=4, log_every=2)
    run_pretrain(tiny_moe_config(**model_cfg), full, tokenizer, *shards)
    logged = [r for r in records(tmp_path / "full") if "tok_per_s" in r]
    assert len(logged) == 4 and all(math.isfinite(r["loss"]) for r in logged)
    for record in logged:
        assert len(record["expert_load"]) == 1  # one MoE layer: the first block is dense
        assert len(record["expert_load"][0]) == 4 and sum(record["expert_load"][0]) == pytest.approx(1.0, abs=1e-4)
        assert record["aux_loss"] >= 1.0 - 1e-6
    half = tiny_train_config(tmp_path / "half", max_steps=8, save_every=4, log_every=2, stop_after_steps=4)
    run_pretrain(tiny_moe_config(**model_cfg), half, tokenizer, *shards)
    resumed = tiny_train_config(tmp_path / "half", max_steps=8, save_every=4, log_every=2, resume=True)
    run_pretrain(tiny_moe_config(**model_cfg), resumed, tokenizer, *shards)
    assert [r["loss"] for r in records(tmp_path / "half") if "tok_per_s" in r] == [r["loss"] for r in logged]
    a = ckpt.load_model(tmp_path / "full").model.state_dict()
    b = ckpt.load_model(tmp_path / "half").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bias = a["layers.1.mlp.expert_bias"]
    assert bias.abs().sum() > 0  # the routing bias moved, was saved, and resumed exactly


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, tokenizer_dir):
    # sequence-wise balance loss: the mean over ranks of per-sequence means is the mean over the
    # whole batch, so 2 processes x batch 2 train exactly like 1 process x batch 4 (routing biases too)
    from test_ddp import TINY_FLAGS, read_losses, run_cli

    for split, limit in [("train", 150), ("val", 30)]:
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for text in sample_texts(split, limit=limit):
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    moe_flags = ["--num-experts", "4", "--num-experts-per-token", "2", "--moe-intermediate-size", "32",
                 "--num-shared-experts", "1", "--first-k-dense", "1", "--moe-balance-loss", "sequence",
                 "--moe-bias-update-rate", "0.01"]
    # logging every 2 steps: the per-rank load counters must survive DDP's buffer broadcast in between
    common = ["pretrain", "--data", "train.jsonl", "--val-data", "val.jsonl", "--tokenizer", str(tokenizer_dir),
              *TINY_FLAGS, *moe_flags, "--log-every", "2"]
    run_cli([*common, "--out-dir", "ddp", "--batch-size", "2"], tmp_path, nproc=2)
    run_cli([*common, "--out-dir", "single", "--batch-size", "4"], tmp_path)
    ddp_train, ddp_val = read_losses(tmp_path / "ddp")
    single_train, single_val = read_losses(tmp_path / "single")
    assert len(ddp_train) == len(single_train) == 3
    assert ddp_train == pytest.approx(single_train, abs=2e-4)
    assert ddp_val == pytest.approx(single_val, abs=2e-4)
    ddp_load = [r["expert_load"] for r in records(tmp_path / "ddp") if "expert_load" in r]
    single_load = [r["expert_load"] for r in records(tmp_path / "single") if "expert_load" in r]
    assert len(ddp_load) == 3 and ddp_load == single_load  # counts summed over both ranks


def test_checkpoint_from_before_moe_still_resumes(tmp_path, tokenizer, shards):
    # a dense checkpoint written before the MoE fields existed: they take their defaults on resume
    run = tmp_path / "run"
    run_pretrain(tiny_model_config(), tiny_train_config(run, max_steps=2, save_every=2), tokenizer, *shards)
    config_file = run / "checkpoints" / "step_000002" / "config.json"
    configs = json.loads(config_file.read_text())
    configs["model"] = {k: v for k, v in configs["model"].items() if "expert" not in k and "moe" not in k
                        and k != "first_k_dense"}
    config_file.write_text(json.dumps(configs))
    (config_file.parent / "checksums.json").unlink()  # such a checkpoint predates checksums too
    result = run_pretrain(tiny_model_config(), tiny_train_config(run, max_steps=4, save_every=2, resume=True),
                      tokenizer, *shards)
    assert result.checkpoint.name == "step_000004"


def test_sft_and_dpo_train_a_moe_model_with_its_balance_loss(tmp_path, tokenizer):
    import json

    from chat_helpers import DPO_TRAIN, SFT_TRAIN, make_checkpoint
    from conftest import tiny_train_config
    from xiaolm.train.runners import run_dpo, run_sft

    start = make_checkpoint(tmp_path / "start", tokenizer, num_experts=4, num_experts_per_token=2)
    sft = tiny_train_config(tmp_path / "sft", seq_len=64, max_steps=3, eval_every=0, save_every=3)
    run_sft(start, [SFT_TRAIN], sft, val_fraction=0)
    dpo = tiny_train_config(tmp_path / "dpo", seq_len=64, max_steps=2, eval_every=0, save_every=2, lr=1e-4)
    run_dpo(tmp_path / "sft", [DPO_TRAIN], dpo, val_fraction=0)
    for run in ("sft", "dpo"):
        records = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        logged = [r for r in records if "expert_load" in r]
        # fractions are logged rounded to 5 decimals
        assert logged and all(abs(sum(layer) - 1) < 1e-4 for r in logged for layer in r["expert_load"])
        assert all(r["aux_loss"] >= 1.0 - 1e-6 for r in logged)
