"""Evaluation: C-Eval-layout exams, option scoring, bits-per-byte, the report card."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xiaolm.config import McqConfig
from xiaolm.eval.mcq import (
    Exam, Question, build_prompt, encode_options, evaluate_mcq, load_exam, score_options,
    write_mcq_results,
)
from xiaolm.eval.ppl import evaluate_text
from xiaolm.eval.report import collect_run, compare_runs, render_report
from xiaolm.model.transformer import Transformer

from conftest import ROOT, SAMPLE, tiny_model_config


class FixedLogits(nn.Module):
    """A model whose next-token distribution ignores the context: `logits` at every position."""

    def __init__(self, logits: torch.Tensor, max_seq_len: int = 512) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.float())
        self.config = tiny_model_config(vocab_size=len(logits), max_seq_len=max_seq_len)

    def forward(self, input_ids, cache=None):
        return self.logits.expand(*input_ids.shape, -1)


def letter_id(tokenizer, letter: str) -> int:
    (token,) = tokenizer.encode(letter)
    return token


def test_known_option_probabilities_give_exact_accuracy(tokenizer):
    # the model puts most probability on "C", then "A": questions with two options get A,
    # questions with three or more get C, whatever the prompt says
    logits = torch.zeros(tokenizer.vocab_size)
    logits[letter_id(tokenizer, "C")], logits[letter_id(tokenizer, "A")] = 5.0, 3.0
    questions = [Question("s", str(i), f"问题{i}", ["甲", "乙"], answer=i % 2) for i in range(4)]  # A right twice
    questions += [Question("s", str(4 + i), f"问题{i}", ["甲", "乙", "丙", "丁", "戊"], answer=i % 5)
                  for i in range(10)]  # C right twice
    exam = Exam({"s": questions})
    result = evaluate_mcq(FixedLogits(logits), tokenizer, exam, McqConfig(progress=False, batch_size=3))
    overall = result["summary"]["overall"]
    assert overall["accuracy"] == pytest.approx(4 / 14)
    assert overall["chance"] == pytest.approx((4 / 2 + 10 / 5) / 14)
    assert [r["predicted"] for r in result["records"]] == ["A"] * 4 + ["C"] * 10


def test_option_scores_with_a_shared_kv_prefix_equal_full_forwards(tokenizer):
    model = Transformer(tiny_model_config(max_seq_len=128)).eval()
    q = Question("s", "0", "中华人民共和国的首都是哪里？", ["北京", "上海市", "广州的天河区"], answer=0)
    prompt = build_prompt(q, Exam({"s": [q]}), "text")
    encoded = encode_options(tokenizer, prompt, q.options, max_len=128)
    expected = []
    for s, start in zip(encoded.sequences, encoded.starts):
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([s]))[0].float(), dim=-1)  # (T, V)
        expected.append(sum(float(logprobs[j - 1, s[j]]) for j in range(start, len(s))))
    assert score_options(model, encoded) == pytest.approx(expected, abs=1e-4)


def test_long_prompts_are_cut_from_the_left(tokenizer):
    q = Question("s", "0", "很长的题目" * 50, ["甲", "乙"], answer=0)
    encoded = encode_options(tokenizer, build_prompt(q, Exam({"s": [q]}), "letter"), ["A", "B"], max_len=40)
    assert encoded.truncated and all(len(s) <= 40 for s in encoded.sequences)
    assert tokenizer.decode(encoded.sequences[0][encoded.starts[0]:]) == "A"
    assert tokenizer.decode(encoded.sequences[0]).endswith("B. 乙\n答案：A")


def write_ceval(root):
    (root / "dev").mkdir(parents=True)
    (root / "val").mkdir()
    (root / "test").mkdir()
    header = "id,question,A,B,C,D,answer,explanation\n"
    (root / "dev" / "math_dev.csv").write_text(header + "0,1+1=?,1,2,3,4,B,一加一等于二\n", encoding="utf-8")
    (root / "val" / "math_val.csv").write_text(
        header + '0,2+2=?,3,4,5,6,B,\n1,"三选一,带逗号",x,y,z,,C,\n', encoding="utf-8")
    (root / "val" / "history_val.csv").write_text("\ufeffid,question,A,B,answer\n0,秦朝的开国皇帝?,秦始皇,汉武帝,A\n",
                                                  encoding="utf-8")
    (root / "test" / "math_test.csv").write_text("id,question,A,B,C,D\n7,3+3=?,6,7,8,9\n8,0+1=?,0,1,2,3\n",
                                                 encoding="utf-8")
    mapping = {"math": ["Math", "数学", "STEM"], "history": ["History", "历史", "Humanities"]}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")


def test_ceval_layout_parsing_kshot_prompt_and_test_submission(tmp_path, tokenizer):
    write_ceval(tmp_path)
    exam = load_exam(tmp_path, "val")
    assert sorted(exam.questions) == ["history", "math"]
    math_q = exam.questions["math"]
    assert [q.options for q in math_q] == [["3", "4", "5", "6"], ["x", "y", "z"]]
    assert [q.answer for q in math_q] == [1, 2] and exam.category("math") == "STEM"
    prompt = build_prompt(math_q[0], exam, "letter", num_shots=1, explanations=True)
    assert prompt == ("以下是中国关于数学考试的单项选择题，请选出其中的正确答案。\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n"
                      "答案：B\n解析：一加一等于二\n\n2+2=?\nA. 3\nB. 4\nC. 5\nD. 6\n答案：")
    chat = build_prompt(math_q[0], exam, "letter", chat=tokenizer)
    assert chat.startswith("<|im_start|>user\n") and chat.endswith("<|im_start|>assistant\n答案：")

    test = load_exam(tmp_path, "test")
    assert all(q.answer is None for q in test.questions["math"])
    logits = torch.zeros(tokenizer.vocab_size)
    logits[letter_id(tokenizer, "D")] = 1.0
    result = evaluate_mcq(FixedLogits(logits), tokenizer, test, McqConfig(progress=False))
    assert result["summary"]["overall"]["accuracy"] is None
    written = write_mcq_results(result, tmp_path / "out", "mcq_test")
    assert json.loads(written[-1].read_text()) == {"math": {"7": "D", "8": "D"}}


def test_jsonl_questions_and_bad_answers(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text('{"question": "q1", "options": ["a", "b", "c"], "answer": 2}\n'
                    '{"question": "q2", "choices": ["a", "b"], "answer": "b", "subject": "x"}\n')
    exam = load_exam(good, answer_base=0)
    assert exam.questions["q"][0].answer == 2 and exam.questions["x"][0].answer == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q1", "options": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: answer 'C' is outside the 2 options"):
        load_exam(bad)
    with pytest.raises(ValueError, match="no test/"):
        load_exam(tmp_path, "test")


def test_the_committed_exam_set_loads():
    exam = load_exam(ROOT / "data" / "exams", "val")
    assert set(exam.questions) == {"law_article_source", "poetry_next_line", "text_continuation", "unilaw_topic",
                                   "unilaw_dispute_focus", "english_sentence_ending"}
    assert {len(q.options) for q in exam.questions["unilaw_topic"]} == {20}
    assert all(q.answer is not None for qs in exam.questions.values() for q in qs)
    assert all(len(exam.dev[s]) == 5 for s in exam.questions) and exam.category("unilaw_topic") == "Social Science"
    assert all(q.answer is None for qs in load_exam(ROOT / "data" / "exams", "test").questions.values() for q in qs)
    # the English subject is asked in English (MMLU's wording), its dev questions as the shots
    question = exam.questions["english_sentence_ending"][0]
    shot = exam.dev["english_sentence_ending"][0]
    prompt = build_prompt(question, exam, "letter", num_shots=1)
    assert exam.language("english_sentence_ending") == "en" and exam.language("unilaw_topic") == "zh"
    assert prompt.startswith("The following are multiple choice questions about English Sentence Ending. "
                             f"Choose the correct answer.\n\n{shot.question}\nA. ")
    assert f"\nAnswer: {'ABCD'[shot.answer]}\n\n{question.question}\nA. " in prompt and prompt.endswith("\nAnswer: ")


def test_ppl_of_a_uniform_model_is_the_vocabulary_size(tmp_path, tokenizer):
    model = FixedLogits(torch.zeros(tokenizer.vocab_size), max_seq_len=32)
    result = evaluate_text(model, tokenizer, [SAMPLE / "val.jsonl"], tmp_path / "tokens", batch_size=4, max_batches=2)
    assert result["loss"] == pytest.approx(math.log(tokenizer.vocab_size))
    assert result["perplexity"] == pytest.approx(tokenizer.vocab_size)
    assert result["num_tokens"] == 8 * 32 and 0 < result["bpb"] < result["loss"] / math.log(2)


def fake_run(directory, losses, expert_load=False):
    directory.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "loss": loss, "tokens": 100 * step, "tok_per_s": 50.0, "elapsed_s": float(step)}
        if expert_load:
            record |= {"expert_load": [[0.5 + 0.1 * step, 0.5 - 0.1 * step], [0.25, 0.75]], "aux_loss": 0.01}
        lines.append(record)
        if step % 2 == 0:
            lines.append({"step": step, "val_loss": loss + 0.1, "val_bpb": loss / 2})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    (directory / "config.json").write_text(json.dumps({"model": tiny_model_config().__dict__,
                                                       "train": {"batch_size": 4, "seq_len": 32, "lr": 0.01}}))
    (directory / "run_info.json").write_text(json.dumps({"git_commit": "abc123", "device": "cpu", "torch": "x"}))
    (directory / "evals").mkdir()
    (directory / "evals" / "ppl_val.json").write_text(json.dumps(
        {"kind": "ppl", "name": "ppl_val", "num_tokens": 64, "loss": 3.0, "perplexity": 20.1, "bpb": 1.5}))
    (directory / "evals" / "mcq.json").write_text(json.dumps({
        "kind": "mcq", "name": "mcq", "subjects": {"law": {"num_questions": 4, "accuracy": 0.5, "chance": 0.25}},
        "categories": {"Humanities": {"num_questions": 4, "accuracy": 0.5, "chance": 0.25}},
        "overall": {"num_questions": 4, "accuracy": 0.5, "chance": 0.25, "average": 0.5}}))


def test_report_card_plots_expert_load_and_compares_runs(tmp_path):
    pytest.importorskip("matplotlib")
    fake_run(tmp_path / "a", [5.0, 4.0, 3.5, 3.2], expert_load=True)
    fake_run(tmp_path / "b", [5.0, 4.5, 4.0, 3.9])
    text = render_report(tmp_path / "a").read_text()
    assert "![loss](loss.png)" in text and "![expert_load_1](expert_load_1.png)" in text and "abc123" in text
    assert "| ppl_val | 64 | 3 | 20.1 | 1.5 |" in text and "50.0%" in text
    assert (tmp_path / "a" / "expert_load_0.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (tmp_path / "a" / "report.html").read_text()
    compared = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp").read_text()
    assert "| val bits/byte | 1.6 | 1.95 |" in compared and "| mcq accuracy | 50.0% | 50.0% |" in compared
    assert collect_run(tmp_path / "b")["evals"][0]["kind"] == "mcq"


def test_report_card_falls_back_to_svg_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    fake_run(tmp_path / "a", [5.0, 4.0], expert_load=True)
    text = render_report(tmp_path / "a").read_text()
    assert "![loss](loss.svg)" in text and (tmp_path / "a" / "expert_load_0.svg").read_text().startswith("<svg")
