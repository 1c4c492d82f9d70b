"""transformers interop, checked against transformers itself (this file also runs under the oldest
transformers the project allows, in the second virtualenv `make test` builds):

- import: tiny random Llama / Qwen2 / Qwen3 models (transformers' from_config, save_pretrained) with
  foreign tokenizers give transformers' logits (within 1e-4; the difference is float rounding,
  about 2e-6 seen) and the same greedy tokens, and export back to the same logits;
- export: each architecture xiaolm picks (Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE) and each RoPE
  scaling computes in transformers what it computes in xiaolm, past the trained context too;
- foreign chat templates: rendered as transformers renders them, the SFT mask token by token;
- the end token an exported base model is scored with, and its bits-per-byte.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from xiaolm.checkpoint import load_model, write_model_folder
from xiaolm.cli import main
from xiaolm.config import to_dict
from xiaolm.data.chat_tokens import tokenize_conversation
from xiaolm.inference.engine import Engine, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.interop.hf_config import architecture_for
from xiaolm.interop.hf_export import export_hf
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import load_tokenizer

from chat_helpers import make_checkpoint
from conftest import tiny_model_config
from interop_helpers import write_foreign_tokenizer, write_hf_model

transformers = pytest.importorskip("transformers")

FAMILIES = [("llama", "llama3"), ("qwen2", "qwen"), ("qwen3", "qwen")]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # compare fixed lengths, whatever the tokens
    out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False,
                         pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("architecture, style", FAMILIES)
def test_import_matches_transformers_and_exports_back(tmp_path, architecture, style):
    hf = write_hf_model(tmp_path / "hf", architecture, style)
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.qkv_bias == (architecture == "qwen2") and loaded.config.qk_norm == (architecture == "qwen3")
    ids = torch.randint(0, 380, (2, 50))
    expected = logits_of(hf, ids)
    torch.testing.assert_close(logits_of(loaded.model, ids), expected, atol=1e-4, rtol=1e-4)
    prompt = loaded.tokenizer.encode_prompt("The answer is")
    request = Request(prompt, SamplingConfig(max_new_tokens=12, temperature=0))
    Engine(loaded.model, None).run([request])
    assert request.output_ids == hf_greedy(hf, prompt, 12)

    # back to transformers: the same architecture and logits, the tokenizer and its roles intact
    assert main(["export", "hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert type(back).__name__ == type(hf).__name__
    torch.testing.assert_close(logits_of(back, ids), expected, atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False) == loaded.tokenizer.render_chat(MESSAGES)
    assert load_tokenizer(tmp_path / "back").stop_ids == loaded.tokenizer.stop_ids


def test_import_refuses_what_xiaolm_cannot_compute(tmp_path):
    write_hf_model(tmp_path / "hf", "qwen2", "qwen")
    config_path = tmp_path / "hf" / "config.json"
    original = json.loads(config_path.read_text())
    cases = [({"use_sliding_window": True}, "sliding-window"), ({"model_type": "gemma"}, "model_type='gemma'"),
             ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
             ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
             ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "short_factor": [1]}}, "short_factor")]
    for change, message in cases:
        config_path.write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / "hf")
    config_path.write_text(json.dumps(original))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_model(tmp_path / "hf")


EXPORTS = {
    "llama": dict(),
    "qwen2": dict(qkv_bias=True, tie_embeddings=False),
    "qwen3": dict(qk_norm=True, head_dim=32),
    "mixtral": dict(num_experts=4, num_experts_per_token=2, moe_intermediate_size=48),
    "qwen3_moe": dict(qk_norm=True, num_experts=4, num_experts_per_token=1, moe_intermediate_size=48, first_k_dense=1),
}


def save_randomised(directory, tokenizer, **overrides):
    """A fresh model whose biases and norm weights (0 and 1 at init) are drawn too, so their
    mapping matters; saved as a checkpoint."""
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    write_model_folder(directory, model, tokenizer, {"model": to_dict(model.config)})
    return model.eval()


@pytest.mark.parametrize("architecture", list(EXPORTS))
def test_export_picks_the_architecture_that_computes_the_same(tmp_path, tokenizer, architecture):
    model = save_randomised(tmp_path / "ckpt", tokenizer, **EXPORTS[architecture])
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == architecture
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40))
    torch.testing.assert_close(logits_of(hf, ids), logits_of(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides, reason", [
    (dict(num_experts=4, moe_scoring="sigmoid"), "latent attention"),
    (dict(num_experts=4, num_experts_per_token=2, num_shared_experts=1), "Qwen2-MoE gates"),
    (dict(num_experts=4, num_experts_per_token=1), "renormalises"),
    (dict(num_experts=4, num_experts_per_token=2, first_k_dense=1), "first_k_dense=1"),
    (dict(num_experts=4, num_experts_per_token=2, qkv_bias=True), "qkv_bias"),
    (dict(qkv_bias=True, qk_norm=True), "both q/k/v bias and QK-norm"),
])
def test_export_refuses_what_no_architecture_computes(overrides, reason):
    with pytest.raises(ValueError, match=reason):
        architecture_for(tiny_model_config(**overrides))


def test_export_refuses_a_routing_bias(tmp_path, tokenizer):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, num_experts=4, num_experts_per_token=2,
                                          qk_norm=True))
    model.layers[0].mlp.expert_bias[0] = 0.5
    write_model_folder(tmp_path / "ckpt", model, tokenizer, {"model": to_dict(model.config)})
    with pytest.raises(ValueError, match="expert_bias is not zero"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


ROPE_SCALINGS = {
    "linear": dict(rope_scaling_factor=3.0),
    "ntk": dict(rope_scaling_factor=3.0),
    "dynamic": dict(rope_scaling_factor=3.0, rope_original_max_seq_len=32),
    "yarn": dict(rope_scaling_factor=3.0, rope_original_max_seq_len=32),
    "yarn-attention-factor": dict(rope_scaling_factor=3.0, rope_original_max_seq_len=32, rope_attention_factor=1.2,
                                  rope_yarn_beta_fast=16.0, rope_yarn_beta_slow=2.0),
    "llama3": dict(rope_scaling_factor=3.0, rope_original_max_seq_len=32, rope_low_freq_factor=1.0,
                   rope_high_freq_factor=4.0),
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers_past_the_trained_context(tmp_path, tokenizer, kind):
    overrides = dict(rope_scaling=kind.split("-")[0], max_seq_len=96, rope_theta=10000.0, **ROPE_SCALINGS[kind])
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    model = load_model(checkpoint).model
    export_hf(checkpoint, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 90))  # three times the trained 32 positions
    expected = logits_of(hf, ids)
    torch.testing.assert_close(logits_of(model, ids), expected, atol=2e-4, rtol=1e-4)
    short = ids[:, :20]  # dynamic scaling starts past the trained context only
    torch.testing.assert_close(logits_of(model, short), logits_of(hf, short), atol=2e-4, rtol=1e-4)
    imported = load_model(tmp_path / "hf")  # and read back from config.json, it computes the same
    torch.testing.assert_close(logits_of(imported.model, ids), expected, atol=2e-4, rtol=1e-4)
    if kind != "ntk":  # ntk is exported as the larger base it amounts to
        assert imported.config.rope_scaling == kind.split("-")[0]


@pytest.mark.parametrize("style", ["qwen", "llama3"])
def test_foreign_chat_template_and_sft_mask(tmp_path, style):
    write_foreign_tokenizer(tmp_path, style)
    tokenizer = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for add in (False, True):
        assert tokenizer.render_chat(MESSAGES[:4], add) == hf.apply_chat_template(
            MESSAGES[:4], tokenize=False, add_generation_prompt=add)
    ids, supervised = tokenize_conversation(tokenizer, MESSAGES)
    assert ids == hf(hf.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    runs, current = [], []
    for token, flag in zip(ids + [None], supervised + [False]):
        if flag:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    end = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>"}[style]
    assert [tokenizer.decode(run) for run in runs] == ["你好！" + end, "4" + end]
    unsupervised = tokenizer.decode([t for t, f in zip(ids, supervised) if not f])
    assert "Be brief." in unsupervised and "2+2?" in unsupervised
    if style == "llama3":  # BOS first everywhere; documents end with <|end_of_text|>, turns with <|eot_id|>
        assert tokenizer.add_bos and ids[0] == tokenizer.bos_id
        assert tokenizer.document_ids([7]) == [tokenizer.bos_id, 7, tokenizer.eos_id]
        assert tokenizer.decode([tokenizer.eos_id, tokenizer.end_of_turn_id]) == "<|end_of_text|><|eot_id|>"
    else:  # without a system message, the template's default one is rendered, never supervised
        ids, supervised = tokenize_conversation(tokenizer, MESSAGES[1:])
        assert "You are Qwen" in tokenizer.decode([t for t, f in zip(ids, supervised) if not f])
        assert tokenizer.decode([t for t, f in zip(ids, supervised) if f]) == "你好！<|im_end|>4<|im_end|>"
        assert not tokenizer.add_bos
        assert tokenizer.decode([tokenizer.eos_id, tokenizer.end_of_turn_id]) == "<|endoftext|><|im_end|>"


def test_exported_eos_is_the_models_end_token(tmp_path, tokenizer):
    base = make_checkpoint(tmp_path / "base", tokenizer)
    chat = make_checkpoint(tmp_path / "chat", tokenizer)
    configs = json.loads((chat / "config.json").read_text())
    (chat / "config.json").write_text(json.dumps({**configs, "sft": {"from": "base"}}))
    for checkpoint, eos in ((base, "<|endoftext|>"), (chat, "<|im_end|>")):
        out = export_hf(checkpoint, tmp_path / f"hf-{checkpoint.name}")
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
        assert hf_tokenizer.eos_token == eos and hf_tokenizer.pad_token == "<|endoftext|>"
        assert hf_tokenizer.bos_token is None and hf_tokenizer("a")["input_ids"] == tokenizer.encode("a")
        generation = transformers.GenerationConfig.from_pretrained(str(out))
        assert sorted(generation.eos_token_id) == [0, 2] and generation.eos_token_id[0] == tokenizer.tokenizer.token_to_id(eos)
        config = transformers.AutoConfig.from_pretrained(str(out))
        assert config.max_position_embeddings == 64 and config.tie_word_embeddings
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
        assert rope["rope_theta"] == 1e6  # transformers 4.x read rope_theta, 5.x rope_parameters
        fields = json.loads((out / "config.json").read_text())
        assert fields["rope_theta"] == fields["rope_parameters"]["rope_theta"] == 1e6
        assert fields["torch_dtype"] == fields["dtype"] == "float32"


def test_bits_per_byte_through_transformers_equals_eval_ppl(tmp_path, tokenizer):
    """A user's scoring script: each document through AutoTokenizer plus its eos_token_id, packed
    into windows as `xiaolm eval ppl` packs them, scored by the exported model: the same bpb."""
    from conftest import sample_texts
    from xiaolm.eval.ppl import evaluate_text

    checkpoint = make_checkpoint(tmp_path / "base", tokenizer)
    out = export_hf(checkpoint, tmp_path / "hf")
    documents = [text[:200] for text in sample_texts("val", limit=12)]
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))
    ours = evaluate_text(load_model(checkpoint).model, tokenizer, [data], tmp_path / "tokens", seq_len=64)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    stream = [t for d in documents for t in hf_tokenizer(d)["input_ids"] + [hf_tokenizer.eos_token_id]]
    end = (len(stream) - 1) // 64 * 64  # whole windows of 64 targets, as eval ppl scores them
    windows = torch.tensor([stream[start:start + 65] for start in range(0, end, 64)])  # (N, 65)
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
    assert nats / end == pytest.approx(ours["loss"], rel=1e-5)  # the same tokens, end tokens, logits
    # bytes of the scored text, decoded in one piece (only a character cut at the very end differs)
    num_bytes = len(hf_tokenizer.decode(stream[1:end + 1], skip_special_tokens=True).encode("utf-8"))
    assert nats / num_bytes / math.log(2) == pytest.approx(ours["bpb"], rel=1e-3)


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3") / "hf"
    write_hf_model(folder, "llama", "llama3", max_position_embeddings=256)
    return folder


@pytest.mark.parametrize("command", ["sft", "lora", "dpo", "distill", "eval ppl", "eval mcq", "generate", "chat"])
def test_every_stage_takes_the_transformers_folder(command, llama3_folder, tmp_path):
    """Each command takes the transformers folder (a Llama-3-style model: BOS, <|eot_id|>)
    directly: it is imported on the fly, and a training run keeps the imported tokenizer."""
    import io

    from chat_helpers import DPO_TRAIN, SFT_TRAIN
    from conftest import SAMPLE

    folder, out = str(llama3_folder), str(tmp_path / "out")
    train = ["--max-steps", "1", "--eval-every", "0", "--seq-len", "256", "--batch-size", "2", "--device", "cpu",
             "--no-progress", "--truncate", "tokens", "--val-fraction", "0", "--out-dir", out]
    few_chats = tmp_path / "chats.jsonl"  # a handful of records keeps each run about a second
    few_chats.write_text("".join(SFT_TRAIN.read_text().splitlines(keepends=True)[:8]))
    few_pairs = tmp_path / "pairs.jsonl"
    few_pairs.write_text("".join(DPO_TRAIN.read_text().splitlines(keepends=True)[:4]))
    argv = {
        "sft": ["sft", "--from", folder, "--data", str(few_chats), *train],
        "lora": ["sft", "--from", folder, "--data", str(few_chats), "--lora", *train],
        "dpo": ["dpo", "--from", folder, "--data", str(few_pairs), *train],
        "distill": ["distill", "--teacher", folder, "--student", "tiny", "--hidden-size", "32", "--num-layers", "1",
                    "--max-seq-len", "256", "--data", str(few_chats), *train],
        "eval ppl": ["eval", "ppl", "--ckpt", folder, "--data", str(SAMPLE / "val.jsonl"), "--max-batches", "1",
                     "--out", out, "--device", "cpu"],
        "eval mcq": ["eval", "mcq", "--ckpt", folder, "--data", str(SAMPLE.parent / "exams"), "--subjects",
                     "law_article_source", "--out", out, "--device", "cpu", "--no-progress"],
        "generate": ["generate", "--ckpt", folder, "--prompt", "The", "--max-new-tokens", "4", "--device", "cpu"],
    }
    if command == "chat":
        from xiaolm.inference.chat import run_chat

        transcript = io.StringIO()
        run_chat(folder, SamplingConfig(max_new_tokens=4, temperature=0), stdin=io.StringIO("hi\n"),
                 stdout=transcript, device="cpu")
        assert "assistant> " in transcript.getvalue()
        return
    assert main(argv[command]) == 0
    if command in ("sft", "lora", "dpo", "distill"):
        trained = load_model(out)
        assert trained.tokenizer.add_bos and trained.tokenizer.decode([trained.tokenizer.end_of_turn_id]) == "<|eot_id|>"
        if command == "sft":  # and exports as the architecture it came from
            assert main(["export", "hf", "--ckpt", out, "--out", str(tmp_path / "hf")]) == 0
            assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"


def test_chat_stops_on_the_imported_end_of_turn(tmp_path):
    from xiaolm.inference.chat import ChatSession

    write_hf_model(tmp_path / "hf", "qwen2", "qwen")
    loaded = load_model(tmp_path / "hf")
    end_of_turn = loaded.tokenizer.end_of_turn_id
    head = torch.nn.Linear(64, loaded.config.vocab_size)  # a head that always says <|im_end|>
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[end_of_turn] = 10.0
    loaded.model.lm_head = head
    session = ChatSession(loaded.model, loaded.tokenizer, SamplingConfig(max_new_tokens=5, temperature=0))
    assert "".join(session.reply("hi")) == "" and session.last_stop_id == end_of_turn
    prompt = session.prompt_ids("again")
    assert loaded.tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are Qwen")


def test_head_dim_and_bias_defaults_keep_old_checkpoints(tmp_path, tokenizer):
    """A config.json written before these options existed loads and computes as before."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    configs = json.loads((checkpoint / "config.json").read_text())
    for field in ("head_dim", "qkv_bias", "rope_scaling", "rope_scaling_factor"):
        configs["model"].pop(field)
    (checkpoint / "config.json").write_text(json.dumps(configs))
    loaded = load_model(checkpoint)
    assert loaded.config.head_dim == 16 and not loaded.config.qkv_bias
    assert to_dict(loaded.config) == to_dict(Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size)).config)


def test_benchmark_peer_is_the_exported_model():
    """bench/ compares xiaolm with transformers through `build_hf_model`, the export's own mapping."""
    from xiaolm.interop.hf_export import build_hf_model

    for overrides in (dict(), dict(qk_norm=True, head_dim=32)):
        model = Transformer(tiny_model_config(**overrides)).eval()
        peer = build_hf_model(model.config, model).eval()
        ids = torch.randint(0, 512, (2, 30))
        torch.testing.assert_close(logits_of(peer, ids), logits_of(model, ids), atol=1e-5, rtol=1e-5)
