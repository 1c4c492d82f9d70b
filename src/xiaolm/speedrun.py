"""`xiaolm speedrun`: corpus -> tokenizer -> pretraining -> samples -> report, in one command.

Every stage caches or resumes: running the command again after a kill picks up where it
stopped (the corpus and token shards are reused, pretraining resumes from its checkpoint).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from xiaolm.config import ModelConfig, TrainConfig, to_dict
from xiaolm.data.readers import iter_documents
from xiaolm.data.shards import read_meta, write_shards
from xiaolm.eval.report import markdown_table, read_metrics, write_curves
from xiaolm.inference.generate import SamplingConfig
from xiaolm.inference.session import load_for_inference, stream_completion
from xiaolm.tokenizer.bpe import load_tokenizer, train_tokenizer
from xiaolm.train.pretrain import pretrain
from xiaolm.utils import spread_sample

SAMPLE_PROMPTS = ["中华人民共和国", "三国时期，", "今天天气很好，", "本法所称", "我觉得这本书", "To be, or not to be"]


def speedrun(
    out: Path,
    preset: str = "tiny",
    vocab_size: int = 6400,
    include_npm: bool | None = None,
    corpus: Path | None = None,
    tokenizer_chars: int = 5_000_000,
    cache_dir: Path = Path.home() / ".cache" / "xiaolm",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
        meta = write_shards(iter_documents([file]), tokenizer, shards[split], source_key=json.dumps(key, sort_keys=True) + split)
        print(f"{split}: {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens, "
              f"{meta['num_bytes'] / meta['num_tokens']:.2f} bytes/token")
    summary["tokens"] = {split: {k: read_meta(d)[k] for k in ("num_documents", "num_tokens", "num_bytes")}
                         for split, d in shards.items()}
    timings["tokenize"] = time.perf_counter() - started

    started = stage("pretrain")
    model_cfg = ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, **(model_overrides or {}))
    train_cfg = TrainConfig.from_preset(preset, **{"out_dir": str(out / "pretrain"), "resume": True,
                                                   **(train_overrides or {})})
    result = pretrain(model_cfg, train_cfg, tokenizer, shards["train"], shards["val"])
    timings["pretrain"] = time.perf_counter() - started
    summary["run_info"] = json.loads((out / "pretrain" / "run_info.json").read_text())
    summary["model"] = to_dict(model_cfg)
    summary["train"] = to_dict(train_cfg)
    summary["pretrain"] = {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                           "checkpoint": str(result.checkpoint), **result.last_eval}

    started = stage("samples")
    model, tokenizer = load_for_inference(out / "pretrain", "cpu")
    summary["num_parameters"] = model.num_parameters()
    sampling = SamplingConfig(max_new_tokens=60, temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=0)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        text = "".join(stream_completion(model, tokenizer, prompt, sampling))
        print(f"{prompt}|{text}")
        samples.append({"prompt": prompt, "completion": text})
    summary["samples"] = samples
    timings["samples"] = time.perf_counter() - started
    summary["timings_s"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_speedrun_report(out, summary)
    print(f"\nreport: {out / 'report.md'}")
    return summary


def write_speedrun_report(out: Path, summary: dict[str, Any]) -> None:
    curves = write_curves(out / "pretrain", out)
    metrics = read_metrics(out / "pretrain")
    train_rows = [m for m in metrics if "tok_per_s" in m]
    val_rows = [{"step": m["step"], "val_loss": m["val_loss"], "val_bpb": m["val_bpb"]} for m in metrics if "val_loss" in m]
    tok_per_s = sorted(m["tok_per_s"] for m in train_rows)
    model, train = summary["model"], summary["train"]
    lines = [
        f"# xiaolm speedrun ({summary['preset']})",
        "",
        "## Model",
        f"{summary['num_parameters']:,} parameters: hidden {model['hidden_size']}, {model['num_layers']} layers, "
        f"{model['num_heads']} heads / {model['num_kv_heads']} KV heads, vocab {model['vocab_size']}, "
        f"context {model['max_seq_len']}, tied embeddings {model['tie_embeddings']}.",
        "",
        "## Data",
        markdown_table(summary["corpus"]["sources"]),
        "",
        markdown_table([{"split": k, **v} for k, v in summary["tokens"].items()]),
        "",
        "## Time per stage",
        markdown_table([{"stage": k, "seconds": v} for k, v in summary["timings_s"].items()]),
        "",
        "## Pretraining",
        f"{summary['pretrain']['steps']} steps of {train['batch_size']} x {train['seq_len']} tokens"
        f" (x{train['grad_accum_steps']} accumulation), lr {train['lr']}, precision {summary['run_info']['precision']}"
        f" on {summary['run_info']['device']} ({summary['run_info']['num_threads']} threads).",
    ]
    if tok_per_s:
        lines.append(f"Training throughput: median {tok_per_s[len(tok_per_s) // 2]:,.0f} tokens/s.")
    lines += ["", markdown_table(val_rows), ""]
    lines += [f"![{Path(name).stem}]({name})" for name in curves]
    lines += ["", "## Samples", "", "Prompt, then the model's continuation (temperature 0.8, top-p 0.95, seed 0):", ""]
    for sample in summary["samples"]:
        lines.append(f"- **{sample['prompt']}**{sample['completion'].replace(chr(10), ' ')}")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
