"""Multiple-choice exams in the C-Eval layout, scored by log-likelihood.

Data: a folder `dev/`, `val/`, `test/` of per-subject CSVs `{subject}_{split}.csv` with columns
`id,question,A,B,C,D[,...],answer[,explanation]` (any number of option columns; the test split has
no answers) and an optional `subject_mapping.json` ({subject: [english, chinese, category]}, as C-Eval
ships it); or one such CSV; or jsonl records {question, options: [...], answer: index or letter}.

Two scoring methods:
- `letter` (C-Eval's zero-shot method): the prompt lists the lettered options and ends with "答案："
  ("Answer: " for a subject the mapping marks English, MMLU's wording);
  the prediction is the option letter with the highest probability there. All letters follow the same
  prompt, so one forward pass per question scores every option; questions are batched.
- `text`: the prompt is the question alone; each option's text is scored as a continuation, by its
  log-likelihood per UTF-8 byte (so long options are not penalised for their length and tokenizers
  compare). The shared prompt runs once into a KV cache; the options then run as one batch on it.
"""

from __future__ import annotations

import csv
import json
import string
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xiaolm.config import McqConfig
from xiaolm.tokenizer.bpe import XiaoTokenizer

LETTERS = string.ascii_uppercase
SPLITS = ("dev", "val", "test")
PROMPT_WORDS = {  # language: (header, answer cue, explanation cue)
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案：", "解析："),
    "en": ("The following are multiple choice questions about {subject}. Choose the correct answer.\n\n",
           "Answer: ", "Explanation: "),
}


@dataclass
class Question:
    subject: str
    id: str
    question: str
    options: list[str]
    answer: int | None = None
    """Index of the right option; None where the split carries no answers (C-Eval's test)."""
    explanation: str = ""


@dataclass
class Exam:
    """Questions of one split per subject, the dev questions for k-shot prompts, and the mapping."""

    questions: dict[str, list[Question]]
    dev: dict[str, list[Question]] = field(default_factory=dict)
    mapping: dict[str, list[str]] = field(default_factory=dict)

    def subject_name(self, subject: str) -> str:
        """The subject's name in its questions' language (C-Eval's prompt wording) where the mapping
        has one."""
        names = self.mapping.get(subject)
        index = 0 if self.language(subject) == "en" else 1
        return names[index] if names and len(names) > index else subject.replace("_", " ")

    def language(self, subject: str) -> str:
        """"en" or "zh": the mapping's optional fourth field (xiaolm's), Chinese without it."""
        names = self.mapping.get(subject)
        return names[3] if names and len(names) > 3 else "zh"

    def category(self, subject: str) -> str | None:
        names = self.mapping.get(subject)
        return names[2] if names and len(names) > 2 else None


# --------------------------------------------------------------------------- reading


def parse_answer(value: Any, num_options: int, where: str, number_base: int = 0) -> int:
    """An answer given as a letter ("B") or a number (1, or "1") -> the option's index; numbers count
    from `number_base` (0: the first option is 0; 1: it is 1)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    elif _is_number(text):
        index = int(text) - number_base
    else:
        raise ValueError(f"{where}: answer {value!r} is neither one letter nor a number "
                         "(multi-answer questions are not supported)")
    if not 0 <= index < num_options:
        counted = f" (numbers counting from {number_base})" if _is_number(text) else ""
        raise ValueError(f"{where}: answer {value!r} is outside the {num_options} options{counted}")
    return index


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and value.isdigit())


def _number_base(path: Path, answers: list[Any], answer_base: int | None) -> int:
    """What the file's numeric answers count from: `answer_base` when given; else 0 if some answer
    is 0. A file of numbers none of which is 0 may count from 1 (it would be misread silently until
    its first answer past the last 0-based option), so it needs `answer_base`."""
    numbers = [int(a) for a in answers if _is_number(a.strip() if isinstance(a, str) else a)]
    if answer_base is not None or not numbers:
        return answer_base or 0
    if 0 in numbers:
        return 0
    raise ValueError(f"{path}: answers are numbers and none is 0, so they may count from 1; say how they "
                     "count with --answer-base 0 (the first option is 0) or --answer-base 1 (letters need "
                     "neither)")


def read_csv_questions(path: str | Path, subject: str | None = None, answer_base: int | None = None
                       ) -> list[Question]:
    """One C-Eval CSV. Option columns are the single capital letters, in order; trailing empty
    options are dropped (subjects with fewer options share a wider file). Errors name the line a
    record starts on (a quoted question may span several lines)."""
    path = Path(path)
    subject = subject or subject_of(path)
    rows = []  # (line, row)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            option_columns = [c for c in columns if len(c) == 1 and c in LETTERS]
            if "question" not in columns or len(option_columns) < 2:
                raise ValueError(f"{path}: expected columns id,question,A,B,...[,answer] but found {columns}")
            end = reader.line_num
            for row in reader:
                line, end = end + 1, reader.line_num
                if None in row or None in row.values():  # DictReader's marks of too many / too few values
                    num_values = len(columns) + len(row.get(None, [])) - sum(v is None for v in row.values())
                    raise ValueError(f"{path}:{line}: {num_values} values but the header has {len(columns)} "
                                     "columns (a comma inside a field that is not quoted?)")
                rows.append((line, row))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise ValueError(f"{path}:{reader.line_num}: bad CSV ({error})") from None
    base = _number_base(path, [row.get("answer") or "" for _, row in rows], answer_base)
    questions = []
    for index, (line, row) in enumerate(rows):
        options = [(row.get(c) or "").strip() for c in option_columns]
        while options and not options[-1]:
            options.pop()
        if len(options) < 2 or not all(options):
            raise ValueError(f"{path}:{line}: needs at least two non-empty options, got {options}")
        answer_text = (row.get("answer") or "").strip()
        answer = parse_answer(answer_text, len(options), f"{path}:{line}", base) if answer_text else None
        questions.append(Question(subject, (row.get("id") or str(index)).strip(), row["question"].strip(),
                                  options, answer, (row.get("explanation") or "").strip()))
    return questions


def read_jsonl_questions(path: str | Path, answer_base: int | None = None) -> list[Question]:
    """jsonl: {"question": ..., "options" (or "choices"): [...], "answer": number or letter,
    optional "subject", "id", "explanation"}."""
    path = Path(path)
    records = []  # (line, record)
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not valid UTF-8 ({error.reason})") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            options = record.get("options", record.get("choices")) if isinstance(record, dict) else None
            if not isinstance(options, list) or len(options) < 2 or "question" not in record:
                raise ValueError(f"{where}: needs an object with 'question' and a list of at least two "
                                 "'options'")
            records.append((line_no, record))
    base = _number_base(path, [record.get("answer") for _, record in records], answer_base)
    questions = []
    for line_no, record in records:
        options = [str(o).strip() for o in record.get("options", record.get("choices"))]
        answer = record.get("answer")
        questions.append(Question(
            str(record.get("subject", path.stem)), str(record.get("id", line_no - 1)),
            str(record["question"]).strip(), options,
            None if answer is None else parse_answer(answer, len(options), f"{path}:{line_no}", base),
            str(record.get("explanation", "") or "").strip(),
        ))
    return questions


def subject_of(path: Path) -> str:
    """`computer_network_val.csv` -> `computer_network`."""
    stem = path.stem
    for split in SPLITS:
        if stem.endswith(f"_{split}"):
            return stem[: -len(split) - 1]
    return stem


def _group(questions: Iterable[Question]) -> dict[str, list[Question]]:
    grouped: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        grouped[q.subject].append(q)
    return dict(sorted(grouped.items()))


def _split_files(root: Path, split: str) -> list[Path]:
    folder = root / split if (root / split).is_dir() else root
    return sorted(folder.glob(f"*_{split}.csv"))


def load_exam(path: str | Path, split: str = "val", subjects: list[str] | None = None,
              limit: int | None = None, answer_base: int | None = None) -> Exam:
    """Read a C-Eval folder (split `split`, dev questions for k-shot), one CSV, or one jsonl file;
    `limit`: only the first questions of each subject; `answer_base`: what numeric answers count
    from (0 or 1; needed when a file's numbers include no 0)."""
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if answer_base not in (None, 0, 1):
        raise ValueError(f"answer_base must be 0 or 1, got {answer_base}")
    if path.is_dir():
        files = _split_files(path, split)
        if not files:
            raise ValueError(f"{path}: no {split}/*_{split}.csv files (C-Eval layout: dev/ val/ test/ of "
                             f"{{subject}}_{{split}}.csv)")
        questions = _group(q for f in files for q in read_csv_questions(f, answer_base=answer_base))
        dev = _group(q for f in _split_files(path, "dev")
                     for q in read_csv_questions(f, answer_base=answer_base))
        mapping_file = path / "subject_mapping.json"
        mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file.is_file() else {}
    elif path.is_file() and path.suffix == ".csv":
        questions, dev, mapping = _group(read_csv_questions(path, answer_base=answer_base)), {}, {}
    elif path.is_file() and path.suffix == ".jsonl":
        questions, dev, mapping = _group(read_jsonl_questions(path, answer_base=answer_base)), {}, {}
    else:
        raise ValueError(f"{path}: expected a C-Eval folder, a .csv or a .jsonl file")
    if subjects:
        unknown = sorted(set(subjects) - set(questions))
        if unknown:
            raise ValueError(f"unknown subject(s) {unknown}; {path} has {sorted(questions)}")
        questions = {s: questions[s] for s in subjects}
    if limit is not None:
        questions = {s: qs[:limit] for s, qs in questions.items()}
    if not any(questions.values()):
        raise ValueError(f"{path}: no questions in split {split!r}")
    return Exam(questions, dev, mapping)


# --------------------------------------------------------------------------- prompts


def format_question(q: Question, with_options: bool) -> str:
    if not with_options:
        return q.question
    return q.question + "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(q.options))


def build_prompt(q: Question, exam: Exam, method: str, num_shots: int = 0, explanations: bool = False,
                 chat: XiaoTokenizer | None = None) -> str:
    """The text before the scored answer. C-Eval's wording (MMLU's for English subjects); k-shot
    examples come from the subject's dev split (their explanations after the answer line when asked
    for). `chat`: the tokenizer whose chat template wraps the question as a user turn."""
    with_options = method == "letter"
    header, answer_cue, explanation_cue = PROMPT_WORDS[exam.language(q.subject)]
    header = header.format(subject=exam.subject_name(q.subject))
    shots = []
    for shot in exam.dev.get(q.subject, [])[:num_shots]:
        if shot.answer is None:
            continue
        answer = LETTERS[shot.answer] if with_options else shot.options[shot.answer]
        text = f"{format_question(shot, with_options)}\n{answer_cue}{answer}"
        if explanations and shot.explanation:
            text += f"\n{explanation_cue}{shot.explanation}"
        shots.append(text + "\n\n")
    body = header + "".join(shots) + format_question(q, with_options)
    if chat:
        return chat.render_chat([{"role": "user", "content": body}], add_generation_prompt=True) + answer_cue
    return body + "\n" + answer_cue


def option_continuations(q: Question, method: str) -> list[str]:
    return [LETTERS[i] for i in range(len(q.options))] if method == "letter" else list(q.options)


# --------------------------------------------------------------------------- scoring


@dataclass
class Encoded:
    """One question's token sequences, one per option: `sequences[i][starts[i]:]` is option i's
    scored continuation; all sequences share their first `shared` tokens."""

    sequences: list[list[int]]
    starts: list[int]
    shared: int
    num_bytes: list[int]
    truncated: bool


def encode_options(tokenizer: XiaoTokenizer, prompt: str, continuations: list[str], max_len: int) -> Encoded:
    """Token ids of prompt + each continuation, preceded by what starts a training document (the
    model's BOS, or xiaolm's <|endoftext|>). The continuation starts where the prompt's own encoding
    stops matching, so a merge across the boundary is scored with the option. Too long: tokens are
    dropped from the left of the prompt (the question's end and the options stay)."""
    prompt_ids = tokenizer.encode(prompt)
    sequences, starts = [], []
    for text in continuations:
        full = tokenizer.encode(prompt + text)
        start = _common_prefix(prompt_ids, full)
        if start == len(full):
            raise ValueError(f"option {text!r} adds no tokens to the prompt")
        sequences.append(tokenizer.with_document_start(full))
        starts.append(start + len(sequences[-1]) - len(full))
    overflow = max(len(s) for s in sequences) - max_len
    if overflow > 0:
        # keep the document start at 0; cut the same tokens after it from every option
        sequences = [s[:1] + s[1 + overflow:] for s in sequences]
        starts = [max(1, start - overflow) for start in starts]
    shared = min(min(starts), _common_prefix_all(sequences))
    num_bytes = [len(text.encode("utf-8")) for text in continuations]
    return Encoded(sequences, starts, shared, num_bytes, overflow > 0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_prefix_all(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = min(n, _common_prefix(sequences[0], s))
    return n


@torch.inference_mode()
def score_single_token_batch(model: torch.nn.Module, batch: list[Encoded]) -> list[list[float]]:
    """Questions whose options are one token each right after a shared prompt (the letter method):
    one batched forward of the prompts, right-padded; log-probabilities at each prompt's last position."""
    device = next(model.parameters()).device
    lengths = [e.shared for e in batch]
    inputs = torch.zeros(len(batch), max(lengths), dtype=torch.long)
    for row, e in enumerate(batch):
        inputs[row, : e.shared] = torch.tensor(e.sequences[0][: e.shared])
    logits = model(inputs.to(device))  # (B, T, V); padding sits after each prompt, unseen by it
    last = logits[torch.arange(len(batch), device=device), torch.tensor(lengths, device=device) - 1]  # (B, V)
    logprobs = F.log_softmax(last.float(), dim=-1).cpu()
    return [[float(logprobs[row, s[e.shared]]) for s in e.sequences] for row, e in enumerate(batch)]


@torch.inference_mode()
def score_options(model: torch.nn.Module, encoded: Encoded) -> list[float]:
    """Sum of log-probabilities of each option's continuation: the shared prefix runs once into a KV
    cache, copied to one row per option; then the options' remaining tokens run as one batch."""
    device = next(model.parameters()).device
    num_options, shared = len(encoded.sequences), encoded.shared
    longest = max(len(s) for s in encoded.sequences)
    prefix_cache = model.allocate_cache(1, shared)
    prefix_logits = model(torch.tensor([encoded.sequences[0][:shared]], device=device), cache=prefix_cache)
    cache = model.allocate_cache(num_options, longest)
    cache.keys[:, :, :, :shared] = prefix_cache.keys  # broadcast over the option rows
    cache.values[:, :, :, :shared] = prefix_cache.values
    cache.length = shared
    rest = torch.zeros(num_options, longest - shared, dtype=torch.long)
    for row, s in enumerate(encoded.sequences):
        rest[row, : len(s) - shared] = torch.tensor(s[shared:])
    # logits at position j predict token j + 1: the prefix's last position, then the options' own
    # (the last token of the longest option predicts nothing, so it need not run)
    logits = prefix_logits[:, -1:].expand(num_options, 1, -1)  # (N, 1, V)
    if longest - shared > 1:
        rest_logits = model(rest[:, :-1].to(device), cache=cache)  # (N, R - 1, V)
        logits = torch.cat([logits, rest_logits], dim=1)  # (N, R, V)
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, rest.to(device)[..., None])[..., 0].cpu()  # (N, R)
    scores = []
    for row, (s, start) in enumerate(zip(encoded.sequences, encoded.starts)):
        scores.append(float(logprobs[row, start - 1 - (shared - 1): len(s) - shared].sum()))
    return scores


def check_shots(exam: Exam, num_shots: int) -> None:
    """k-shot prompts take k answered dev questions of each subject: refuse rather than score with
    fewer and label the result k-shot."""
    if not num_shots:
        return
    available = {s: sum(q.answer is not None for q in exam.dev.get(s, [])) for s in exam.questions}
    short = {s: n for s, n in available.items() if n < num_shots}
    if short:
        counts = ", ".join(f"{s} has {n}" for s, n in short.items())
        raise ValueError(f"--num-shots {num_shots} needs {num_shots} answered dev questions per subject: "
                         f"{counts} (they come from dev/{{subject}}_dev.csv in a C-Eval folder)")


def evaluate_mcq(model: torch.nn.Module, tokenizer: XiaoTokenizer, exam: Exam, cfg: McqConfig) -> dict[str, Any]:
    """Predict every question of `exam`; returns {"records": per question, "summary": accuracies}."""
    check_shots(exam, cfg.num_shots)
    from tqdm import tqdm

    max_len = model.config.max_seq_len
    questions = [q for subject in exam.questions.values() for q in subject]
    encoded = [encode_options(tokenizer, build_prompt(q, exam, cfg.method, cfg.num_shots, cfg.explanations,
                                                    tokenizer if cfg.chat else None),
                              option_continuations(q, cfg.method), max_len) for q in questions]
    model.eval()
    scores: list[list[float] | None] = [None] * len(questions)
    single = [i for i, e in enumerate(encoded)
              if all(len(s) == e.shared + 1 and st == e.shared for s, st in zip(e.sequences, e.starts))]
    others = sorted(set(range(len(questions))) - set(single))
    bar = tqdm(total=len(questions), desc="mcq", unit="q", disable=not cfg.progress)
    # batch prompts of similar length together: less padding
    single.sort(key=lambda i: encoded[i].shared)
    for first in range(0, len(single), cfg.batch_size):
        chunk = single[first: first + cfg.batch_size]
        for i, row in zip(chunk, score_single_token_batch(model, [encoded[i] for i in chunk])):
            scores[i] = row
        bar.update(len(chunk))
    for i in others:
        scores[i] = score_options(model, encoded[i])
        bar.update(1)
    bar.close()
    records = []
    for q, e, raw in zip(questions, encoded, scores):
        # the text method compares log-likelihood per byte of option text
        normalised = raw if cfg.method == "letter" else [s / max(n, 1) for s, n in zip(raw, e.num_bytes)]
        predicted = max(range(len(normalised)), key=normalised.__getitem__)
        records.append({
            "subject": q.subject, "id": q.id, "num_options": len(q.options),
            "predicted": LETTERS[predicted], "answer": None if q.answer is None else LETTERS[q.answer],
            "correct": None if q.answer is None else predicted == q.answer,
            "scores": [round(s, 4) for s in normalised], "truncated": e.truncated,
        })
    return {"records": records, "summary": summarize(records, exam, cfg)}


def summarize(records: list[dict[str, Any]], exam: Exam, cfg: McqConfig) -> dict[str, Any]:
    """Accuracy and chance level (the mean of 1 / number of options) per subject, per category and
    overall; `average` is the mean over subjects (C-Eval's headline number), `accuracy` over questions."""

    def stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        answered = [r for r in rows if r["correct"] is not None]
        return {
            "num_questions": len(rows),
            "accuracy": sum(r["correct"] for r in answered) / len(answered) if answered else None,
            "chance": sum(1 / r["num_options"] for r in rows) / len(rows),
        }

    by_subject: dict[str, list] = defaultdict(list)
    by_category: dict[str, list] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(r)
        by_category[exam.category(r["subject"]) or "unmapped"].append(r)
    subjects = {s: {"category": exam.category(s), **stats(rows)} for s, rows in sorted(by_subject.items())}
    accuracies = [v["accuracy"] for v in subjects.values() if v["accuracy"] is not None]
    overall = stats(records)
    return {
        "config": asdict(cfg) | {"progress": None},
        "overall": {**overall, "average": sum(accuracies) / len(accuracies) if accuracies else None},
        "categories": {c: stats(rows) for c, rows in sorted(by_category.items())},
        "subjects": subjects,
        "num_truncated": sum(r["truncated"] for r in records),
    }


def submission(records: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """C-Eval's submission format: {subject: {question id: predicted letter}}."""
    result: dict[str, dict[str, str]] = defaultdict(dict)
    for r in records:
        result[r["subject"]][r["id"]] = r["predicted"]
    return dict(result)


def write_mcq_results(result: dict[str, Any], out_dir: str | Path, name: str) -> list[Path]:
    """`{name}.json` (summary), `{name}.jsonl` (each question's predicted and true answer) and, when
    no question has an answer (a test split), `{name}_submission.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{name}.json", out_dir / f"{name}.jsonl"]
    written[0].write_text(json.dumps({"kind": "mcq", "name": name, **result["summary"]}, indent=2,
                                     ensure_ascii=False) + "\n", encoding="utf-8")
    written[1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result["records"]),
                          encoding="utf-8")
    if all(r["answer"] is None for r in result["records"]):
        written.append(out_dir / f"{name}_submission.json")
        written[2].write_text(json.dumps(submission(result["records"]), indent=1, ensure_ascii=False) + "\n",
                              encoding="utf-8")
    return written


def format_summary(summary: dict[str, Any]) -> str:
    """Plain-text table of the summary for the terminal."""

    def pct(value: float | None) -> str:
        return "   -  " if value is None else f"{100 * value:5.1f}%"

    lines = [f"{'subject':32} {'n':>5} {'acc':>7} {'chance':>7}"]
    for name, s in summary["subjects"].items():
        lines.append(f"{name:32} {s['num_questions']:5d} {pct(s['accuracy']):>7} {pct(s['chance']):>7}")
    for name, s in summary["categories"].items():
        lines.append(f"{'[' + name + ']':32} {s['num_questions']:5d} {pct(s['accuracy']):>7} {pct(s['chance']):>7}")
    o = summary["overall"]
    lines.append(f"{'overall':32} {o['num_questions']:5d} {pct(o['accuracy']):>7} {pct(o['chance']):>7}"
                 f"   (mean over subjects {pct(o['average']).strip()})")
    if summary["num_truncated"]:
        lines.append(f"warning: {summary['num_truncated']} prompt(s) were cut from the left to fit max_seq_len")
    return "\n".join(lines)
