"""The README's commands, run as a user would (small step counts), and CLI error handling."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from xiaolm.cli import main

from conftest import ROOT, SAMPLE

TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4", "--eval-every", "5", "--eval-batches", "2",
        "--save-every", "5", "--no-progress"]


def test_readme_commands_are_all_tested():
    # every subcommand the README shows is exercised below (torchrun's in test_ddp.py)
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"(?:^|-m xiaolm\.cli |make )\s*(?:xiaolm )?(data build|tokenizer train|tokenizer eval|"
                           r"pretrain|generate|speedrun)\b", readme, re.M))
    assert shown == {"data build", "tokenizer train", "tokenizer eval", "pretrain", "generate", "speedrun"}


def test_data_build_of_the_sample_is_cached(capsys):
    assert main(["data", "build", "--out", str(SAMPLE), "--no-npm", "--max-chars-per-source", "150000",
                 "--val-fraction", "0.05"]) == 0
    assert "up to date" in capsys.readouterr().out


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


def test_speedrun_on_the_sample(tmp_path):
    out = tmp_path / "speedrun"
    result = subprocess.run(
        [sys.executable, "-m", "xiaolm.cli", "speedrun", "--corpus", str(SAMPLE), "--out", str(out),
         "--vocab-size", "600", *TINY, "--max-steps", "10"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Samples" in report and "val_bpb" in report and "![loss](loss.svg)" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain"]["steps"] == 10 and len(summary["samples"]) >= 5
    assert set(summary["timings_s"]) == {"corpus", "tokenizer", "tokenize", "pretrain", "samples"}
    # running it again resumes: nothing is retrained, the report is rewritten
    shutil.rmtree(out / "samples", ignore_errors=True)
    again = subprocess.run(
        [sys.executable, "-m", "xiaolm.cli", "speedrun", "--corpus", str(SAMPLE), "--out", str(out),
         "--vocab-size", "600", *TINY, "--max-steps", "10"],
        capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stdout


@pytest.mark.parametrize("flag", ["--hidden-size", "--lr", "--grad-accum-steps", "--precision", "--compile", "--resume"])
def test_every_config_field_has_a_flag(flag, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert flag in capsys.readouterr().out
