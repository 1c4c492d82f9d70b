"""`xiaolm speedrun`: corpus -> tokenizer -> pretraining -> samples -> evals -> SFT -> DPO -> chat
samples -> report card, in one command.

Every stage caches or resumes: running the command again after a kill picks up where it
stopped (the corpus and token shards are reused, each training stage resumes from its checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from xiaolm.checkpoint import load_model
from xiaolm.config import (
    SAMPLING_PRESETS,
    SHARED_TRAIN_FIELDS,
    McqConfig,
    ModelConfig,
    TrainConfig,
    default_cache_dir,
    to_dict,
)
from xiaolm.data.readers import iter_documents
from xiaolm.data.shards import read_meta, write_shards
from xiaolm.eval.mcq import evaluate_mcq, load_exam, write_mcq_results
from xiaolm.eval.ppl import evaluate_shards
from xiaolm.eval.report import render_report
from xiaolm.inference.engine import stream_completion
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.tokenizer.bpe import IM_END, load_tokenizer, train_tokenizer
from xiaolm.train.runners import run_pretrain
from xiaolm.utils import spread_sample

SAMPLE_PROMPTS = ["中华人民共和国", "三国时期，", "今天天气很好，", "本法所称", "我觉得这本书", "To be, or not to be"]
EXAMS = Path(__file__).resolve().parents[2] / "data" / "exams"
"""The committed exam set (C-Eval layout); absent from an installed wheel, then the MCQ eval is skipped."""
NUM_EXAM_QUESTIONS_PER_SUBJECT = 40
"""Enough to tell a trained model from chance, and seconds on a CPU."""


def speedrun(
    out: Path,
    preset: str = "tiny",
    vocab_size: int = 6400,
    include_npm: bool | None = None,
    corpus: Path | None = None,
    tokenizer_chars: int = 5_000_000,
    cache_dir: Path | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    exams: Path | None = EXAMS,
    sft_steps: int = 100,
    dpo_steps: int = 30,
    sft_seq_len: int = 128,
    pretrain_minutes: float = 11.0,
) -> dict[str, Any]:
    """The whole pipeline into `out`. `cache_dir` (default: `config.default_cache_dir()`) holds the
    fetched packages and the default corpus; `train_overrides` set pretraining, and of them only
    SHARED_TRAIN_FIELDS reach SFT and DPO, which otherwise run their own presets.

    `pretrain_minutes` sizes pretraining to the machine: a short probe measures the seconds per
    step, and the schedule (max_steps) is set to fill that budget, so the whole run stays under 20
    minutes on a slow CPU and trains more tokens on a fast one. A `max_steps` in `train_overrides`
    (or pretrain_minutes=0: the preset's steps) fixes the schedule instead, for runs that must be
    the same on every machine."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"preset": preset}

    def stage(name: str):
        print(f"\n== {name} ==", flush=True)
        return time.perf_counter()

    started = stage("corpus")
    if corpus is None:
        from xiaolm.data.corpus import build_corpus

        corpus = cache_dir / "corpus" / "default"
        manifest = build_corpus(corpus, include_npm=include_npm, cache_dir=cache_dir / "packages")
    else:
        manifest = json.loads((Path(corpus) / "manifest.json").read_text())
    summary["corpus"] = {"path": str(corpus), "totals": manifest.get("totals"),
                         "sources": [{k: s.get(k) for k in ("name", "version", "status", "num_docs", "num_chars")}
                                     for s in manifest.get("sources", [])]}
    timings["corpus"] = time.perf_counter() - started
    train_file, val_file = Path(corpus) / "train.jsonl", Path(corpus) / "val.jsonl"

    started = stage("tokenizer")
    tokenizer_dir = out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").is_file():
        print(f"reusing {tokenizer_dir}")
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        texts = spread_sample(lambda: iter_documents([train_file]), tokenizer_chars)
        tokenizer = train_tokenizer(texts, vocab_size)
        tokenizer.save(tokenizer_dir)
    timings["tokenizer"] = time.perf_counter() - started

    started = stage("tokenize")
    key = manifest.get("files") or manifest.get("totals")  # the corpus files' sha256
    shards = {}
    for split, file in (("train", train_file), ("val", val_file)):
        shards[split] = out / "tokens" / split
        meta = write_shards(iter_documents([file]), tokenizer, shards[split],
                            source_key=json.dumps(key, sort_keys=True) + split)
        print(f"{split}: {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens, "
              f"{meta['num_bytes'] / meta['num_tokens']:.2f} bytes/token")
    summary["tokens"] = {split: {k: read_meta(d)[k] for k in ("num_documents", "num_tokens", "num_bytes")}
                         for split, d in shards.items()}
    timings["tokenize"] = time.perf_counter() - started

    started = stage("pretrain")
    model_cfg = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, **(model_overrides or {}))
    train_cfg = TrainConfig.from_preset(preset, **{"out_dir": str(out / "pretrain"), "resume": True,
                                                   **pretrain_optimizer(model_cfg, train_overrides or {}),
                                                   **(train_overrides or {})})
    print(f"optimizer {train_cfg.optimizer}, lr {train_cfg.lr:g}")
    if pretrain_minutes > 0 and "max_steps" not in (train_overrides or {}):
        train_cfg = plan_pretraining(out, model_cfg, train_cfg, tokenizer, shards, pretrain_minutes * 60)
    summary["pretrain_plan"] = json.loads((out / PLAN_FILE).read_text()) if (out / PLAN_FILE).is_file() else None
    result = run_pretrain(model_cfg, train_cfg, tokenizer, shards["train"], shards["val"])
    timings["pretrain"] = time.perf_counter() - started
    summary["run_info"] = json.loads((out / "pretrain" / "run_info.json").read_text())
    summary["model"] = to_dict(model_cfg)
    summary["train"] = to_dict(train_cfg)
    summary["pretrain"] = {"steps": result.num_steps, "tokens": result.num_tokens, "seconds": result.seconds,
                           "checkpoint": str(result.checkpoint), **result.last_eval}

    started = stage("samples")
    loaded = load_model(out / "pretrain")
    model, tokenizer = loaded.model, loaded.tokenizer
    summary["num_parameters"] = model.num_parameters()
    sampling = SamplingConfig.from_preset("generate", max_new_tokens=60, seed=0)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        text = "".join(stream_completion(model, tokenizer, prompt, sampling))
        print(f"{prompt}|{text}")
        samples.append({"prompt": prompt, "completion": text})
    summary["samples"] = samples
    timings["samples"] = time.perf_counter() - started

    started = stage("evals")
    evals = out / "evals"
    evals.mkdir(exist_ok=True)
    # the windows validation used during training: the number must match the last val_bpb
    ppl = evaluate_shards(model, tokenizer, shards["val"], seq_len=train_cfg.seq_len, batch_size=train_cfg.batch_size,
                          max_batches=train_cfg.num_eval_batches)
    (evals / "ppl_val.json").write_text(json.dumps({**ppl, "name": "ppl_val"}, indent=2) + "\n")
    print(f"val: loss {ppl['loss']:.4f}, perplexity {ppl['perplexity']:.1f}, {ppl['bpb']:.4f} bits/byte")
    if exams is not None and Path(exams).is_dir():
        exam = load_exam(exams, "val", limit=NUM_EXAM_QUESTIONS_PER_SUBJECT)
        result = evaluate_mcq(model, tokenizer, exam, McqConfig(progress=False))
        write_mcq_results(result, evals, "mcq_exams_val_letter_0shot")
        overall = result["summary"]["overall"]
        print(f"exams: accuracy {overall['accuracy']:.3f} (chance {overall['chance']:.3f}) "
              f"on {overall['num_questions']} questions")
    timings["evals"] = time.perf_counter() - started
    if sft_steps > 0:
        chat_stages(out, summary, timings, corpus=Path(corpus), cache_dir=cache_dir, sft_steps=sft_steps,
                    dpo_steps=dpo_steps, sft_seq_len=sft_seq_len, train_overrides=train_overrides or {})
    summary["timings_s"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    render_report(out)
    print(f"\nreport: {out / 'report.md'}")
    return summary



PLAN_FILE = "pretrain_plan.json"
PROBE_STEPS = 12
EVALS_PER_RUN = 4


SPEEDRUN_MUON_LR = 1e-2
"""Muon's learning rate in the speedrun's pretraining: the better of 3e-3 and 1e-2 in the race."""


def pretrain_optimizer(model_cfg: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The pretraining optimizer, unless the caller chose one: Muon at SPEEDRUN_MUON_LR for a dense
    model where its bf16 Newton-Schulz iterations run natively (a GPU, or a CPU with avx512_bf16 or
    AMX). There it beat AdamW at the preset's lr at equal wall-clock on this pretraining
    (bench/optimizer_race.py, docs/benchmarks.md section 9); elsewhere (bf16 emulated, MoE) it was not
    measured and AdamW stays."""
    from xiaolm.runtime import cpu_has_native_bf16

    if "optimizer" in overrides or model_cfg.num_experts > 0:
        return {}
    if not (torch.cuda.is_available() or cpu_has_native_bf16()):
        return {}
    return {"optimizer": "muon", "lr": SPEEDRUN_MUON_LR}


def plan_pretraining(out: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, tokenizer, shards: dict[str, Path],
                     budget_s: float) -> TrainConfig:
    """The pretraining schedule that fills `budget_s` seconds on this machine.

    A probe trains PROBE_STEPS steps of the same model, batch and precision (the loop's own steps,
    into a scratch folder) and the median step time after the first two sets max_steps; 4
    validations and checkpoints are spread over it, their time taken out of the budget. The plan
    is written to OUT/pretrain_plan.json and reused when the speedrun is run again (a resumed run
    must keep its schedule)."""
    import shutil
    from dataclasses import replace

    plan_file = out / PLAN_FILE
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        print(f"pretraining plan from {plan_file}: {plan['max_steps']} steps")
    else:
        probe_dir = out / "probe"
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe_cfg = replace(train_cfg, out_dir=str(probe_dir), max_steps=PROBE_STEPS, log_every=1, eval_every=0,
                            save_every=0, resume=False, progress=False)
        run_pretrain(model_cfg, probe_cfg, tokenizer, shards["train"])
        records = [json.loads(line) for line in open(probe_dir / "metrics.jsonl")]
        tokens_per_step = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum_steps
        step_s = sorted(tokens_per_step / r["tok_per_s"] for r in records if r.get("tok_per_s"))[2:]
        step_s = step_s[len(step_s) // 2]
        # a validation batch is a forward only (about a third of a step); checkpoints are quick
        eval_steps = EVALS_PER_RUN * train_cfg.num_eval_batches / 3
        max_steps = max(4 * EVALS_PER_RUN, int(budget_s / step_s - eval_steps))
        plan = {"budget_s": budget_s, "probe_step_s": step_s, "max_steps": max_steps,
                "tokens": max_steps * tokens_per_step, "warmup_steps": min(train_cfg.warmup_steps, max_steps // 10)}
        plan_file.write_text(json.dumps(plan, indent=2) + "\n")
        shutil.rmtree(probe_dir, ignore_errors=True)
        print(f"pretraining plan: {step_s:.2f} s per step measured, {max_steps} steps "
              f"({plan['tokens']:,} tokens) in {budget_s / 60:.1f} minutes")
    every = max(1, plan["max_steps"] // EVALS_PER_RUN)
    return replace(train_cfg, max_steps=plan["max_steps"], warmup_steps=plan["warmup_steps"], eval_every=every,
                   save_every=every)


CHAT_QUESTIONS = ["你好，你是谁？", "中国的首都是哪里？", "请写一首关于春天的短诗。", "如何保持身体健康？",
                  "Who are you?", "What is the capital of France?"]
"""Asked of the pretrained, SFT and DPO models in the report (a fresh conversation each)."""


def chat_stages(out: Path, summary: dict[str, Any], timings: dict[str, float], *, corpus: Path, cache_dir: Path,
                sft_steps: int, dpo_steps: int, sft_seq_len: int, train_overrides: dict[str, Any]) -> None:
    """chat data -> SFT -> DPO (train/runners.py) -> answers to CHAT_QUESTIONS before and after each.

    SFT runs at `sft_seq_len` with the tokens per step of the preset (the batch grows as the
    sequence shrinks). Only replies that fit whole are trained on (truncate="turns"), so at 128
    tokens the tiny model learns short answers that end with <|im_end|> (measured against
    replies cut at 256 tokens in docs/benchmarks.md, "Learning to stop").
    """
    from xiaolm.data.corpus import build_chat_data
    from xiaolm.train.runners import run_dpo, run_sft

    def stage(name: str) -> float:
        print(f"\n== {name} ==", flush=True)
        return time.perf_counter()

    started = stage("chat data")
    chat_dir = corpus / "chat"  # `xiaolm data build` puts the chat sets next to the corpus
    if not (chat_dir / "manifest.json").is_file():
        chat_dir = out / "chat"
        build_chat_data(chat_dir, cache_dir / "packages")
    timings["chat data"] = time.perf_counter() - started
    # the pretraining run's device, precision, seed, logging...; the stages' own schedules
    keep = {k: v for k, v in train_overrides.items() if k in SHARED_TRAIN_FIELDS}
    stages = [("pretrain", out / "pretrain")]

    started = stage("sft")
    cfg = sft_config(sft_seq_len, out_dir=str(out / "sft"), resume=True, max_steps=sft_steps, **keep)
    result = run_sft(out / "pretrain", [chat_dir / "sft" / "train.jsonl"], cfg,
                     val_data=[chat_dir / "sft" / "val.jsonl"])
    render_report(out / "sft")  # each stage's folder keeps its own curves
    summary["sft"] = stage_summary(result)
    stages.append(("sft", out / "sft"))
    timings["sft"] = time.perf_counter() - started
    if dpo_steps > 0:
        started = stage("dpo")
        cfg = TrainConfig.from_preset("dpo", **{"out_dir": str(out / "dpo"), "resume": True, "max_steps": dpo_steps,
                                                **keep})
        result = run_dpo(out / "sft", [chat_dir / "dpo" / "train.jsonl"], cfg,
                         val_data=[chat_dir / "dpo" / "val.jsonl"])
        render_report(out / "dpo")
        summary["dpo"] = stage_summary(result)
        stages.append(("dpo", out / "dpo"))
        timings["dpo"] = time.perf_counter() - started

    started = stage("chat samples")
    summary["chat"] = chat_samples(stages, held_out_prompts(chat_dir))
    timings["chat samples"] = time.perf_counter() - started
    summary.setdefault("extra_sections", []).append({"title": "Chat", "markdown": chat_markdown(summary)})


def stage_summary(result) -> dict[str, Any]:
    """What summary.json keeps of a chat stage's run."""
    return {"steps": result.num_steps, "seconds": result.seconds, "checkpoint": str(result.checkpoint),
            **result.last_eval}


def sft_config(seq_len: int, **overrides: Any) -> TrainConfig:
    """The `sft` preset at `seq_len`, with the preset's tokens per step (the batch grows as the
    sequence shrinks)."""
    preset = TrainConfig.from_preset("sft")
    batch_size = max(1, preset.batch_size * preset.seq_len // seq_len)
    return TrainConfig.from_preset("sft", **{"seq_len": seq_len, "batch_size": batch_size, **overrides})


NUM_HELD_OUT_PROMPTS = 30
"""First user messages of this many held-out SFT conversations, asked of the SFT and DPO models:
how often a model ends its answer itself, on more than the fixed questions."""


def held_out_prompts(chat_dir: Path, limit: int = NUM_HELD_OUT_PROMPTS) -> list[str]:
    """The first user message of each of the first `limit` conversations in CHAT/sft/val.jsonl."""
    from xiaolm.data.chat_formats import read_conversations

    return [next(m["content"] for m in conversation if m["role"] == "user")
            for conversation in read_conversations([chat_dir / "sft" / "val.jsonl"])[:limit]]


def sample_answer(model, tokenizer, question: str, seed: int) -> tuple[str, str | None]:
    """A fresh conversation's answer, sampled with `xiaolm chat`'s settings and `seed`, and the stop
    token that ended it (None: the token limit did)."""
    from xiaolm.inference.chat import ChatSession

    session = ChatSession(model, tokenizer, SamplingConfig.from_preset("chat", seed=seed))
    text = "".join(session.reply(question))
    return text, None if session.last_stop_id is None else tokenizer.decode([session.last_stop_id])


def chat_samples(stages: list[tuple[str, Path]], held_out: list[str]) -> dict[str, Any]:
    """Each model's answers (`sample_answer`, seed = question number) and how each ended:
    CHAT_QUESTIONS for every stage, `held_out` for the chat stages (the pretrained model has never
    seen the template)."""
    answers: dict[str, list[dict[str, Any]]] = {}
    held: dict[str, dict[str, int]] = {}
    for name, checkpoint in stages:
        loaded = load_model(checkpoint)
        model, tokenizer = loaded.model, loaded.tokenizer
        answers[name] = []
        for seed, question in enumerate(CHAT_QUESTIONS):
            text, ended_by = sample_answer(model, tokenizer, question, seed)
            answers[name].append({"question": question, "answer": text, "ended_by": ended_by,
                                  "stopped": ended_by == IM_END})
            print(f"[{name}] {question} -> {text!r} (ended by {ended_by or 'the token limit'})")
        if name != "pretrain" and held_out:
            ends = [sample_answer(model, tokenizer, q, seed)[1] for seed, q in enumerate(held_out)]
            held[name] = {"stopped": ends.count(IM_END), "asked": len(held_out)}
            print(f"[{name}] ended {held[name]['stopped']}/{len(held_out)} answers to held-out prompts with {IM_END}")
    return {"answers": answers, "held_out": held}


def chat_markdown(summary: dict[str, Any]) -> str:
    lines = []
    for name in ("sft", "dpo"):
        if name in summary:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary[name].items()
                                if isinstance(v, float) and k.startswith("val_"))
            lines.append(f"- {name.upper()}: {summary[name]['steps']} steps in "
                         f"{summary[name]['seconds']:.0f} s; {metrics}")
    chat = summary["chat"]
    settings = ", ".join(f"{k} {v}" for k, v in SAMPLING_PRESETS["chat"].items())
    lines += ["", f"Answers in the chat template, sampled with `xiaolm chat`'s settings ({settings}; seed = "
              "question number). Stopped: the model ended its answer with <|im_end|> itself (an answer cut by "
              "the token limit ends with ..., one ended by <|endoftext|> is marked so); held out: the first user "
              "messages of held-out SFT conversations.", ""]
    for name, answers in chat["answers"].items():
        stopped = sum(a["stopped"] for a in answers)
        held = chat["held_out"].get(name)
        extra = f"; held out: stopped {held['stopped']}/{held['asked']}" if held else ""
        lines.append(f"**{name}** (stopped {stopped}/{len(answers)}{extra}):")
        lines.append("")
        for item in answers:
            answer = item["answer"].replace("\n", " ").replace("|", "\\|").strip() or "(empty)"
            end = {IM_END: "", None: " ..."}.get(item["ended_by"], f" [{item['ended_by']}]")
            lines.append(f"- {item['question']} -> {answer}{end}")
        lines.append("")
    return "\n".join(lines)
