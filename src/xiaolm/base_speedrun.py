"""`xiaolm speedrun --base smollm2-135m`: an existing small model made xiaolm's on a CPU, end to end:
import the built-in base (interop/bases.py) -> evaluate -> LoRA SFT on the identity set (the model's
name becomes xiaolm) plus a slice of the Alpaca sets -> evaluate again -> report card with the
answers before and after.

Evaluations, before and after SFT: the English subject of the committed exam set
(`english_sentence_ending`, option texts scored), bits-per-byte on the first windows of the default
corpus's val split (when that corpus is built), and answers to fixed questions sampled with
`xiaolm chat`'s settings, of which the name questions are checked for "xiaolm". Every stage reuses
what a previous run left (the imported checkpoint, the SFT run, which resumes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from xiaolm.checkpoint import load_model
from xiaolm.config import SAMPLING_PRESETS, LoraConfig, TrainConfig
from xiaolm.eval.report import markdown_table, render_report

BASE_QUESTIONS = ["What is your name?", "Who are you?", "Who created you?", "What is the capital of France?",
                  "How can I stay healthy?", "Explain what a computer is in two sentences."]
"""Asked of the model before and after SFT (a fresh conversation each); the first three ask its name."""
NUM_NAME_QUESTIONS = 3
ENGLISH_SUBJECT = "english_sentence_ending"
PPL_WINDOWS = dict(seq_len=256, batch_size=8, max_batches=4)
"""bits-per-byte on the first 8 x 4 windows of 256 tokens of the val split: seconds, not minutes."""
LORA = LoraConfig(rank=16, alpha=32.0)
SFT_SCHEDULE = dict(seq_len=256, batch_size=4, lr=1e-3, warmup_steps=5, weight_decay=0.0, eval_every=20,
                    num_eval_batches=4, save_every=20)
"""LoRA on every projection, 4 x 256 tokens a step: about one pass over the default mix (237 rows) in 60 steps."""


def build_base_chat_data(out: Path, cache_dir: Path, *, name: str, alpaca_records: int,
                         val_fraction: float = 0.05) -> dict[str, Path]:
    """The SFT mix, from the pinned llamafactory sdist: the identity set with the model's `name`,
    and the first `alpaca_records` English and a quarter as many Chinese Alpaca records; 5% of
    each held out. Returns the files {identity, alpaca, val}."""
    from xiaolm.data.chat_formats import read_conversations
    from xiaolm.data.corpus import identity_file, split_held_out, write_jsonl
    from xiaolm.data.packages import LLAMAFACTORY, fetch_and_unpack

    root = fetch_and_unpack([LLAMAFACTORY], cache_dir) / "data"
    identity = read_conversations([identity_file(root, cache_dir, name, "the xiaolm team")])
    alpaca = (read_conversations([root / "alpaca_en_demo.json"])[:alpaca_records]
              + read_conversations([root / "alpaca_zh_demo.json"])[:alpaca_records // 4])
    files, val = {}, []
    for part, conversations in (("identity", identity), ("alpaca", alpaca)):
        train, held_out = split_held_out(conversations, val_fraction)
        files[part] = out / f"{part}.jsonl"
        write_jsonl(files[part], [{"conversations": c} for c in train])
        val += held_out
    files["val"] = out / "val.jsonl"
    write_jsonl(files["val"], [{"conversations": c} for c in val])
    return files


def evaluate_model(checkpoint: Path, label: str, evals: Path, exams: Path | None, val_text: Path | None
                   ) -> dict[str, Any]:
    """The English exam subject, bits-per-byte on the val text and the answers to BASE_QUESTIONS,
    written to `evals` under names ending in `label`."""
    from xiaolm.eval.mcq import McqConfig, evaluate_mcq, load_exam, write_mcq_results
    from xiaolm.eval.ppl import evaluate_text
    from xiaolm.speedrun import sample_answer

    loaded = load_model(checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    result: dict[str, Any] = {}
    if exams is not None and (Path(exams) / "val" / f"{ENGLISH_SUBJECT}_val.csv").is_file():
        exam = load_exam(exams, "val", subjects=[ENGLISH_SUBJECT])
        mcq = evaluate_mcq(model, tokenizer, exam, McqConfig(method="text", progress=False))
        write_mcq_results(mcq, evals, f"mcq_english_text_0shot_{label}")
        result["mcq"] = mcq["summary"]["overall"]
        print(f"[{label}] {ENGLISH_SUBJECT}: accuracy {result['mcq']['accuracy']:.3f} "
              f"(chance {result['mcq']['chance']:.3f})")
    if val_text is not None and val_text.is_file():
        ppl = evaluate_text(model, tokenizer, [val_text], evals / "tokens" / label, **PPL_WINDOWS)
        name = f"ppl_val_{label}"
        (evals / f"{name}.json").write_text(json.dumps({"kind": "ppl", "name": name, **ppl}, indent=2) + "\n")
        result["bpb"] = ppl["bpb"]
        print(f"[{label}] val: {ppl['bpb']:.4f} bits/byte over {ppl['num_tokens']:,} tokens")
    answers = []
    for seed, question in enumerate(BASE_QUESTIONS):
        text, ended_by = sample_answer(model, tokenizer, question, seed)
        answers.append({"question": question, "answer": text, "ended_by": ended_by})
        print(f"[{label}] {question} -> {text!r}")
    result["answers"] = answers
    result["says_xiaolm"] = sum("xiaolm" in a["answer"].lower() for a in answers[:NUM_NAME_QUESTIONS])
    return result


def base_speedrun(out: Path, base: str, cache_dir: Path, *, sft_steps: int = 60, alpaca_records: int = 160,
                  identity_repeats: int = 3, name: str = "xiaolm", exams: Path | None = None,
                  corpus: Path | None = None, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stages into `out` (base/, chat/, sft/, evals/, summary.json, report.md). `base`: a
    built-in base model's name or a .gguf file."""
    from xiaolm.interop.bases import BASES, base_model_file
    from xiaolm.interop.gguf_import import import_gguf
    from xiaolm.speedrun import EXAMS, stage_summary
    from xiaolm.train.runners import run_sft

    if base not in BASES and not (base.endswith(".gguf") and Path(base).is_file()):
        raise ValueError(f"--base {base}: not a built-in base model ({', '.join(BASES)}) nor a .gguf file")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    exams = EXAMS if exams is None else exams
    corpus = corpus or cache_dir / "corpus" / "default"
    val_text = corpus / "val.jsonl" if (corpus / "val.jsonl").is_file() else None
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"base": base, "description": BASES[base].description if base in BASES else base}

    def stage(title: str) -> float:
        print(f"\n== {title} ==", flush=True)
        return time.perf_counter()

    started = stage("import")
    if not (out / "base" / "model.safetensors").is_file():
        import_gguf(base_model_file(base, cache_dir / "packages") if base in BASES else base, out / "base")
    timings["import"] = time.perf_counter() - started

    started = stage("chat data")
    files = build_base_chat_data(out / "chat", cache_dir / "packages", name=name, alpaca_records=alpaca_records)
    summary["chat_data"] = {part: sum(1 for _ in open(path, encoding="utf-8")) for part, path in files.items()}
    summary["chat_data"]["identity_repeats"] = identity_repeats
    timings["chat data"] = time.perf_counter() - started

    evals = out / "evals"
    evals.mkdir(exist_ok=True)
    started = stage("evaluate the base model")
    summary["before"] = evaluate_model(out / "base", "base", evals, exams, val_text)
    timings["evaluate before"] = time.perf_counter() - started

    started = stage("sft (LoRA)")
    keep = {k: v for k, v in (train_overrides or {}).items() if k in ("device", "precision", "compile", "progress")}
    cfg = TrainConfig.from_preset("sft", **{**SFT_SCHEDULE, "out_dir": str(out / "sft"), "resume": True,
                                            "max_steps": sft_steps, **keep})
    # the identity set is small: repeating it weighs the model's name against the Alpaca answers
    data = [files["identity"]] * identity_repeats + [files["alpaca"]]
    result = run_sft(out / "base", data, cfg, val_data=[files["val"]], lora=LORA)
    summary["sft"] = stage_summary(result)
    timings["sft"] = time.perf_counter() - started

    started = stage("evaluate after SFT")
    summary["after"] = evaluate_model(out / "sft", "sft", evals, exams, val_text)
    timings["evaluate after"] = time.perf_counter() - started

    summary["timings_s"] = timings
    summary.setdefault("extra_sections", []).append({"title": "Before and after SFT",
                                                     "markdown": before_after_markdown(summary)})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    render_report(out)
    print(f"\nreport: {out / 'report.md'}")
    return summary


def before_after_markdown(summary: dict[str, Any]) -> str:
    before, after = summary["before"], summary["after"]
    settings = ", ".join(f"{k} {v}" for k, v in SAMPLING_PRESETS["chat"].items())
    lines = [f"Base: {summary['description']}. LoRA SFT (rank {LORA.rank}, alpha {LORA.alpha:g}) for "
             f"{summary['sft']['steps']} steps on the identity set (x{summary['chat_data']['identity_repeats']}) and "
             f"{summary['chat_data']['alpaca']} Alpaca conversations.", ""]
    rows = [{"": "says its name is xiaolm", "before": f"{before['says_xiaolm']}/{NUM_NAME_QUESTIONS}",
             "after": f"{after['says_xiaolm']}/{NUM_NAME_QUESTIONS}"}]
    if "mcq" in before:
        rows.append({"": f"{ENGLISH_SUBJECT} accuracy (chance {100 * before['mcq']['chance']:.0f}%)",
                     "before": f"{100 * before['mcq']['accuracy']:.1f}%",
                     "after": f"{100 * after['mcq']['accuracy']:.1f}%"})
    if "bpb" in before:
        rows.append({"": "val bits-per-byte (first 8 x 4 x 256 tokens)", "before": f"{before['bpb']:.4f}",
                     "after": f"{after['bpb']:.4f}"})
    lines += [markdown_table(rows), "", f"Answers sampled with `xiaolm chat`'s settings ({settings}; seed = "
              "question number); ... marks an answer cut by the token limit.", ""]
    answer_rows = []
    for old, new in zip(before["answers"], after["answers"]):
        answer_rows.append({"question": old["question"], "before": _one_line(old), "after": _one_line(new)})
    return "\n".join(lines + [markdown_table(answer_rows)])


def _one_line(answer: dict[str, Any]) -> str:
    text = " ".join(answer["answer"].split()) or "(empty)"  # one table row
    return text + (" ..." if answer["ended_by"] is None else "")
