"""Every default written once: flags generated from the config dataclasses, named presets, one
cache folder, one rule for a sequence longer than the model's context."""

import json
from pathlib import Path

import pytest

from xiaolm.cli import _lora_config, build_parser, config_overrides, main
from xiaolm.config import (
    SAMPLING_PRESETS,
    LoraConfig,
    McqConfig,
    TrainConfig,
    default_cache_dir,
    fit_seq_len,
)
from xiaolm.inference.sampling import SamplingConfig

from chat_helpers import SFT_TRAIN, make_checkpoint
from conftest import SAMPLE, tiny_model_config, tiny_train_config


def parse(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command, preset", [("generate", "generate"), ("chat", "chat")])
def test_sampling_flags_default_to_the_commands_preset(command, preset, capsys):
    args = parse(command, "--ckpt", "run", *(["--prompt", "x"] if command == "generate" else []))
    assert SamplingConfig.from_preset(preset, **config_overrides(args, SamplingConfig)) == SamplingConfig(
        **SAMPLING_PRESETS[preset])
    args = parse(command, "--ckpt", "run", "--top-p", "0.5", "--seed", "3",
                 *(["--prompt", "x"] if command == "generate" else []))
    sampling = SamplingConfig.from_preset(preset, **config_overrides(args, SamplingConfig))
    assert sampling.top_p == 0.5 and sampling.seed == 3
    assert sampling.temperature == SAMPLING_PRESETS[preset]["temperature"]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"1 disables. [{SAMPLING_PRESETS[preset]['top_p']}]" in shown  # the help shows the value used


def test_lora_and_mcq_flags_come_from_their_dataclasses():
    args = parse("sft", "--from", "x", "--data", "d.jsonl")
    assert _lora_config(args) is None
    args = parse("sft", "--from", "x", "--data", "d.jsonl", "--lora", "--lora-rank", "4")
    assert _lora_config(args) == LoraConfig(rank=4)
    args = parse("eval", "mcq", "--ckpt", "x", "--data", "exams", "--num-shots", "2", "--no-progress")
    assert McqConfig(**config_overrides(args, McqConfig)) == McqConfig(num_shots=2, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        McqConfig(method="guess")


@pytest.mark.parametrize("command", ["sft", "dpo", "distill"])
def test_alignment_stages_have_their_own_run_folder(command):
    extra = ["--student", "tiny"] if command == "distill" else []
    source = ["--teacher", "x"] if command == "distill" else ["--from", "x"]
    args = parse(command, *source, *extra, "--data", "d.jsonl")
    cfg = TrainConfig.from_preset(args.preset, **config_overrides(args, TrainConfig))
    assert cfg.out_dir == f"runs/{command}"
    assert TrainConfig.from_preset("tiny").out_dir == "runs/pretrain"


def test_one_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XIAOLM_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("XIAOLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "xiaolm"


def test_a_sequence_longer_than_the_context_is_capped_everywhere(tmp_path, tokenizer, shards, capsys):
    model = tiny_model_config(max_seq_len=64)
    assert fit_seq_len(32, model) == 32 and fit_seq_len(100, model, tiny_model_config(max_seq_len=48)) == 48
    assert "seq_len 100 -> 48: the model's max_seq_len" in capsys.readouterr().out
    # pretraining
    from xiaolm.train.runners import run_pretrain

    run_pretrain(model, tiny_train_config(tmp_path / "run", seq_len=128, max_steps=1), tokenizer, *shards)
    assert "seq_len 128 -> 64" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["seq_len"] == 64
    # SFT (the sft preset asks for 256)
    start = make_checkpoint(tmp_path / "start", tokenizer)
    assert main(["sft", "--from", str(start), "--data", str(SFT_TRAIN), "--out-dir", str(tmp_path / "sft"),
                 "--max-steps", "1", "--batch-size", "2", "--no-progress", "--truncate", "tokens",
                 "--val-fraction", "0"]) == 0
    assert "seq_len 256 -> 64" in capsys.readouterr().out
    # eval ppl
    assert main(["eval", "ppl", "--ckpt", str(start), "--data", str(SAMPLE / "val.jsonl"), "--seq-len", "100",
                 "--max-batches", "1", "--out", str(tmp_path / "evals")]) == 0
    assert "seq_len 100 -> 64" in capsys.readouterr().out
    assert json.loads((tmp_path / "evals" / "ppl_val.json").read_text())["seq_len"] == 64
