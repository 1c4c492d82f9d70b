"""GGUF export, checked by readers that are not xiaolm's: transformers' GGUF loader (always) and
llama.cpp's Python binding (when it is installed)."""

import pytest
import torch

from xiaolm.checkpoint import load_model
from xiaolm.cli import build_parser, main
from xiaolm.interop import gguf_export
from xiaolm.interop.gguf_export import DTYPES, export_gguf, gguf_architecture

from xiaolm.checkpoint import write_model_folder
from xiaolm.config import to_dict
from xiaolm.model.transformer import Transformer

from chat_helpers import make_checkpoint
from conftest import tiny_model_config

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


def test_without_the_rotary_permutation_the_logits_differ(tmp_path, checkpoint, reference, monkeypatch):
    """The check above is sensitive to llama.cpp's q/k row order: leave it out and it fails."""
    monkeypatch.setattr(gguf_export, "permute_rotary_rows", lambda weight, num_heads: weight)
    ids, expected = reference
    _, logits = transformers_logits(export_gguf(checkpoint, tmp_path / "m.gguf", dtype="f32"), ids)
    assert (logits - expected).abs().max() > 100 * TOLERANCE["f32"]


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
                            "18 minutes, see docs/gguf.md)")
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
