"""The bad-input catalogue of issue 13: each input a new user tried that ended in a traceback or was
silently accepted, run through the CLI in a subprocess, as a user runs it. Each must exit 2 with
exactly one `xiaolm: error:` line that names the problem (and the file:line for data), print no
traceback, and leave every file that was on disk before untouched (and write none).

Each case copies what it needs into its own folder and runs `xiaolm` there, so a case cannot
disturb another; the shared inputs (tokenizer, a tiny trained run, data files) are built once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE, sample_texts, tiny_model_config, tiny_train_config
from disk_helpers import read_only_folder, small_disk

TINY = ["--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--max-seq-len", "64", "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
        "--num-eval-batches", "2", "--save-every", "2", "--log-every", "1", "--warmup-steps", "1",
        "--device", "cpu", "--precision", "fp32", "--no-progress"]


def xiaolm(args: list[str], cwd: Path, stdin: bytes = b"", preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "xiaolm.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=300, env=env, preexec_fn=preexec_fn)


def assert_refused(result: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, one `xiaolm: error:` line matching `pattern`, no traceback; returns the line."""
    err = result.stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("xiaolm: error:")]
    assert result.returncode == 2 and len(errors) == 1, f"exit {result.returncode}\n{err}"
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by relative path, with its sha256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer, tokenizer_dir, shards):
    """Inputs the cases copy: the tokenizer, a jsonl of sample text, a run with one checkpoint
    (checksums recorded), chat and preference data."""
    from xiaolm.train.runners import run_pretrain

    root = tmp_path_factory.mktemp("catalogue")
    shutil.copytree(tokenizer_dir, root / "tok")
    with open(root / "train.jsonl", "w", encoding="utf-8") as handle:
        for text in sample_texts("train", limit=60):
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    run_pretrain(tiny_model_config(), tiny_train_config(root / "run", max_steps=2, save_every=2, eval_every=0),
                 tokenizer, shards[0])
    turn = [{"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！我是 xiaolm。"}]
    same = {"chosen": turn, "rejected": turn}
    (root / "same.jsonl").write_text(json.dumps(same, ensure_ascii=False) + "\n")
    shutil.copy(SAMPLE / "chat" / "sft" / "val.jsonl", root / "sft.jsonl")
    return root


def pretrain_args(*extra: str) -> list[str]:
    return ["pretrain", "--data", "train.jsonl", "--tokenizer", "tok", *TINY, "--max-steps", "2",
            "--out-dir", "out", *extra]


def old_checkpoint(folder: Path) -> Path:
    """The run's checkpoint as xiaolm wrote it before checksums were recorded."""
    checkpoint = folder / "run" / "checkpoints" / "step_000002"
    (checkpoint / "checksums.json").unlink()
    return checkpoint


def flip_bytes(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def edit_config(path: Path, change) -> None:
    configs = json.loads(path.read_text())
    change(configs)
    path.write_text(json.dumps(configs))


MODEL = "run/checkpoints/step_000002/model.safetensors"


def case_truncated_gz(folder, skip_bad=False):
    data = gzip.compress((folder / "train.jsonl").read_bytes())
    (folder / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    args = pretrain_args("--data", "cut.jsonl.gz", *(["--skip-bad"] if skip_bad else []))
    return args, r"cut\.jsonl\.gz: the gzip stream stops before its end \(a truncated file\?\)"


def case_plain_text_named_gz(folder):
    shutil.copy(folder / "train.jsonl", folder / "plain.jsonl.gz")
    return pretrain_args("--data", "plain.jsonl.gz"), r"plain\.jsonl\.gz: not gzip-compressed"


def case_tokenizer_on_empty_file(folder):
    (folder / "empty.jsonl").write_text("")
    return ["tokenizer", "train", "--data", "empty.jsonl", "--out", "newtok"], \
        "no text to train the tokenizer on"


def case_corrupt_tokenizer_json(folder):
    (folder / "tok" / "tokenizer.json").write_text('{"model": ')
    return pretrain_args(), r"tok/tokenizer\.json: not a readable tokenizer file"


def case_tokenizer_out_is_a_file(folder):
    (folder / "taken").write_text("my notes\n")
    return ["tokenizer", "train", "--data", "train.jsonl", "--out", "taken"], r"--out taken: not a folder"


def case_absurd_hidden_size(folder):
    return pretrain_args("--hidden-size", "100000000"), \
        r"parameters .* need about [\d,]+ GiB .* more than the"


def case_log_every_0(folder):
    return pretrain_args("--log-every", "0"), "log_every must be positive, got 0"


def case_eval_batches_0(folder):
    return pretrain_args("--num-eval-batches", "0"), "num_eval_batches must be positive, got 0"


def case_negative_min_lr_ratio(folder):
    return pretrain_args("--min-lr-ratio", "-5"), r"min_lr_ratio must be in \[0, 1\]"


def case_dpo_negative_beta(folder):
    return ["dpo", "--from", "run", "--data", "same.jsonl", "--beta", "-1", "--out-dir", "out"], \
        "beta must be a positive number"


def case_lora_targets_not_a_regex(folder):
    args = ["sft", "--from", "run", "--data", "sft.jsonl", "--lora", "--lora-targets", "(",
            "--out-dir", "out"]
    return args, r"LoRA targets '\(': not a regular expression"


def case_eval_ppl_seq_len_0(folder):
    return ["eval", "ppl", "--ckpt", "run", "--data", "train.jsonl", "--seq-len", "0"], \
        r"seq_len must be positive, got 0"


def case_generate_temperature_nan(folder):
    return ["generate", "--ckpt", "run", "--prompt", "你好", "--temperature", "nan"], \
        "temperature must be a finite number, got nan"


def case_chat_temperature_nan(folder):
    return ["chat", "--ckpt", "run", "--temperature", "nan"], "temperature must be a finite number, got nan"


def case_out_dir_is_a_file(folder):
    (folder / "out").write_text("not a run\n")
    return pretrain_args(), r"--out-dir out: not a folder"


def case_out_dir_inside_a_file(folder):
    (folder / "notes").write_text("not a folder\n")
    return pretrain_args("--out-dir", "notes/run"), r"--out-dir notes/run: not a folder \(notes is a file\)"


def case_truncated_weights(command):
    def case(folder):
        path = folder / MODEL
        path.write_bytes(path.read_bytes()[:1000])
        return command, r"model\.safetensors: truncated or changed \(1,000 bytes; [\d,]+ were written\)"
    return case


def case_flipped_weight_bytes(command):
    def case(folder):
        flip_bytes(folder / MODEL, 4096, 4096)  # 4 KB of weights, the file's size unchanged
        return command, r"model\.safetensors: checksum mismatch"
    return case


def case_garbled_weights_without_checksums(folder):
    (old_checkpoint(folder) / "model.safetensors").write_bytes(b"garbage\n")
    return ["generate", "--ckpt", "run", "--prompt", "x"], \
        r"model\.safetensors: not a readable safetensors file"


def case_config_not_json(folder):
    (old_checkpoint(folder) / "config.json").write_text("not json\n")
    return ["generate", "--ckpt", "run", "--prompt", "x"], r"step_000002/config\.json: not valid JSON"


def case_config_wrong_type(folder):
    edit_config(old_checkpoint(folder) / "config.json", lambda c: c["model"].update(hidden_size="big"))
    return ["generate", "--ckpt", "run", "--prompt", "x"], \
        r"step_000002/config\.json: 'model' section: model config: hidden_size must be int, got str 'big'"


def case_edited_config_with_checksums(folder):
    path = folder / "run/checkpoints/step_000002/config.json"
    path.write_text(path.read_text().replace('"dropout": 0.0', '"dropout": 0.5'))  # the same length
    return ["generate", "--ckpt", "run", "--prompt", "x"], r"config\.json: checksum mismatch"


def case_chat_non_utf8_stdin(folder):
    return ["chat", "--ckpt", "run", "--max-new-tokens", "2"], "stdin line 2 is not valid UTF-8"


def case_dpo_chosen_equals_rejected(folder):
    return ["dpo", "--from", "run", "--data", "same.jsonl", "--val-fraction", "0", "--out-dir", "out"], \
        "all 1 preference pairs have the same chosen and rejected reply"


def case_resume_below_the_checkpoint(folder):
    return pretrain_args("--out-dir", "run", "--resume", "--max-steps", "1"), \
        r"--max-steps 1 is below step 2 of run/checkpoints/step_000002: a resumed run cannot go back"


def write_mcq(folder: Path, rows: str, header: str = "id,question,A,B,C,D,answer,explanation") -> Path:
    (folder / "exam").mkdir(exist_ok=True)
    path = folder / "exam" / "math_val.csv"
    path.write_text(header + "\n" + rows, encoding="utf-8")
    return path


def mcq_args(*extra: str) -> list[str]:
    return ["eval", "mcq", "--ckpt", "run", "--data", "exam", "--no-progress", *extra]


def case_mcq_shots_without_dev_split(folder):
    write_mcq(folder, "0,1+1=?,1,2,3,4,B,\n")
    return mcq_args("--num-shots", "5"), r"--num-shots 5 needs 5 answered dev questions per subject: math has 0"


def case_mcq_row_with_an_extra_value(folder):
    write_mcq(folder, "0,1+1=?,1,2,3,4,B,\n1,1+2=?,1,2,3,4,5,C,\n")
    return mcq_args(), r"math_val\.csv:3: 9 values but the header has 8 columns"


def case_mcq_multiline_question_line(folder):
    write_mcq(folder, '0,"哪个数\n是偶数？",1,2,3,5,B,\n'
                      '1,"哪个数\n最大？\n",1,2,3,5,Z,\n')
    return mcq_args(), r"math_val\.csv:4: answer 'Z' is outside the 4 options"


def case_mcq_numbers_counting_from_1(folder):
    write_mcq(folder, "0,1+1=?,1,2,3,4,2,\n1,2+2=?,1,2,3,4,4,\n")
    return mcq_args(), r"math_val\.csv: answers are numbers and none is 0, so .* --answer-base"


CASES = {
    "truncated .jsonl.gz": case_truncated_gz,
    "truncated .jsonl.gz with --skip-bad": lambda folder: case_truncated_gz(folder, skip_bad=True),
    "plain text named .gz": case_plain_text_named_gz,
    "tokenizer train on an empty file": case_tokenizer_on_empty_file,
    "corrupt tokenizer.json": case_corrupt_tokenizer_json,
    "tokenizer train --out an existing file": case_tokenizer_out_is_a_file,
    "--hidden-size 100000000": case_absurd_hidden_size,
    "--log-every 0": case_log_every_0,
    "--num-eval-batches 0": case_eval_batches_0,
    "--min-lr-ratio -5": case_negative_min_lr_ratio,
    "dpo --beta -1": case_dpo_negative_beta,
    "--lora-targets '('": case_lora_targets_not_a_regex,
    "eval ppl --seq-len 0": case_eval_ppl_seq_len_0,
    "generate --temperature nan": case_generate_temperature_nan,
    "chat --temperature nan": case_chat_temperature_nan,
    "--out-dir a file": case_out_dir_is_a_file,
    "--out-dir inside a file": case_out_dir_inside_a_file,
    "truncated model.safetensors: generate": case_truncated_weights(
        ["generate", "--ckpt", "run", "--prompt", "x"]),
    "truncated model.safetensors: chat": case_truncated_weights(["chat", "--ckpt", "run"]),
    "truncated model.safetensors: export": case_truncated_weights(
        ["export", "hf", "--ckpt", "run", "--out", "hf"]),
    "truncated model.safetensors: eval": case_truncated_weights(
        ["eval", "ppl", "--ckpt", "run", "--data", "train.jsonl"]),
    "truncated model.safetensors: serve": case_truncated_weights(["serve", "--ckpt", "run", "--port", "0"]),
    "truncated model.safetensors: resume": case_truncated_weights(
        pretrain_args("--out-dir", "run", "--resume", "--max-steps", "4")),
    "4 KB of flipped weight bytes: generate": case_flipped_weight_bytes(
        ["generate", "--ckpt", "run", "--prompt", "x"]),
    "4 KB of flipped weight bytes: export": case_flipped_weight_bytes(
        ["export", "hf", "--ckpt", "run", "--out", "hf"]),
    "4 KB of flipped weight bytes: sft --from": case_flipped_weight_bytes(
        ["sft", "--from", "run", "--data", "sft.jsonl", "--out-dir", "out"]),
    "garbled model.safetensors without checksums": case_garbled_weights_without_checksums,
    "config.json not JSON": case_config_not_json,
    "config.json with a wrong type": case_config_wrong_type,
    "config.json edited after writing": case_edited_config_with_checksums,
    "--resume --max-steps below the checkpoint": case_resume_below_the_checkpoint,
    "chat: non-UTF-8 bytes on stdin": case_chat_non_utf8_stdin,
    "dpo: every pair has chosen == rejected": case_dpo_chosen_equals_rejected,
    "mcq --num-shots 5 without a dev split": case_mcq_shots_without_dev_split,
    "mcq: a row with an extra value": case_mcq_row_with_an_extra_value,
    "mcq: a question spanning lines": case_mcq_multiline_question_line,
    "mcq: numeric answers counting from 1": case_mcq_numbers_counting_from_1,
}
STDIN = {"chat: non-UTF-8 bytes on stdin": "你好\n".encode() + b"\xff\xfe oops\n"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, assets, tmp_path):
    folder = tmp_path / "case"
    shutil.copytree(assets, folder)
    args, pattern = CASES[name](folder)
    before = snapshot(folder)
    assert_refused(xiaolm(args, folder, STDIN.get(name, b"")), pattern)
    assert snapshot(folder) == before


def test_eval_takes_a_folder_written_by_export_hf(assets, tmp_path):
    """Once `KeyError: 'model'`: a transformers folder is imported on the fly, after its checksums
    (recorded by the export) are verified; a damaged one is one line naming the file."""
    folder = tmp_path / "case"
    shutil.copytree(assets, folder)
    assert xiaolm(["export", "hf", "--ckpt", "run", "--out", "hf"], folder).returncode == 0
    result = xiaolm(["eval", "ppl", "--ckpt", "hf", "--data", "train.jsonl", "--out", "evals"], folder)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert b"bits_per_byte=" in result.stdout
    flip_bytes(folder / "hf" / "model.safetensors", 4096, 4096)
    before = snapshot(folder)
    assert_refused(xiaolm(["generate", "--ckpt", "hf", "--prompt", "x"], folder),
                   r"hf/model\.safetensors: checksum mismatch")
    assert snapshot(folder) == before


# --------------------------------------------------------------------------- disks that refuse


def test_read_only_out_dir(assets, tmp_path):
    folder = tmp_path / "case"
    shutil.copytree(assets, folder)
    with read_only_folder(folder / "ro"):
        before = snapshot(folder)
        assert_refused(xiaolm(pretrain_args("--out-dir", "ro/run"), folder),
                       r"--out-dir ro/run: cannot write in ro \((Read-only file system|Permission denied)\)")
        assert snapshot(folder) == before


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(assets, tmp_path):
    """A disk that fills up while a checkpoint is written: one line that says how much space a
    checkpoint needs and that the last good checkpoint is intact; nothing half-written is left, and
    once there is room again the run resumes from it."""
    folder = tmp_path / "case"
    shutil.copytree(assets, folder)
    args = pretrain_args("--out-dir", "disk/run")
    with small_disk(folder / "disk") as disk:
        assert xiaolm(args, folder).returncode == 0  # step 2 saved
        checkpoints = folder / "disk" / "run" / "checkpoints"
        before = snapshot(checkpoints)
        disk.fill()
        result = xiaolm([*args, "--resume", "--max-steps", "4"], folder, preexec_fn=disk.preexec_fn)
        line = assert_refused(result, rf"cannot write checkpoint step_000004 .*{disk.error}.*the last good "
                                      r"checkpoint, disk/run/checkpoints/step_000002, is intact")
        assert snapshot(checkpoints) == before, line  # no half-written folder, latest unchanged
        disk.free()
        assert xiaolm([*args, "--resume", "--max-steps", "4"], folder).returncode == 0
        assert (checkpoints / "latest").read_text().strip() == "step_000004"
