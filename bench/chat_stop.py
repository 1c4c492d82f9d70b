"""Does the SFT model end its answers by itself? Truncation policy and SFT length compared.

From one pretrained checkpoint (the speedrun's), SFT runs under each variant with the same
tokens per step and number of steps; each SFT model then answers the speedrun's fixed questions
and the first user messages of the held-out SFT conversations, sampled with `xiaolm chat`'s
settings (seed = question number), and the script counts the answers the model ended with
<|im_end|> (the chat format's end; not <|endoftext|>) before the token limit. Variants:

- tokens@256: replies longer than the sequence cut mid-way (what minimind and LLaMA-Factory do);
- turns@256: only replies that fit whole, end token included (xiaolm's default);
- turns@128: the same at 128 tokens, twice the rows per step (the speedrun's SFT).

    python bench/chat_stop.py --pretrain runs/speedrun/pretrain --chat runs/speedrun/chat
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import markdown_table, print_report
from xiaolm.config import SAMPLING_PRESETS
from xiaolm.checkpoint import load_model
from xiaolm.speedrun import CHAT_QUESTIONS, held_out_prompts, sample_answer, sft_config
from xiaolm.tokenizer.bpe import IM_END
from xiaolm.train.runners import run_sft

VARIANTS = {"tokens@256": ("tokens", 256), "turns@256": ("turns", 256), "turns@128": ("turns", 128)}


def stop_counts(checkpoint: Path, questions: dict[str, list[str]]) -> dict[str, tuple[int, int, float]]:
    """Per question set: (answers the model ended with <|im_end|>, questions, mean answer length in
    characters)."""
    loaded = load_model(checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    counts = {}
    for name, prompts in questions.items():
        answers = [sample_answer(model, tokenizer, prompt, seed) for seed, prompt in enumerate(prompts)]
        stopped = sum(ended_by == IM_END for _, ended_by in answers)
        counts[name] = (stopped, len(prompts), sum(len(text) for text, _ in answers) / len(prompts))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=Path, required=True, help="pretrained checkpoint or run folder")
    parser.add_argument("--chat", type=Path, required=True, help="folder with sft/train.jsonl and sft/val.jsonl")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/xiaolm-bench-chat-stop"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    threads = torch.get_num_threads()
    questions = {"fixed": CHAT_QUESTIONS, "held out": held_out_prompts(args.chat)}
    rows = []
    for name in args.variants:
        truncate, seq_len = VARIANTS[name]
        cfg = sft_config(seq_len, out_dir=str(args.work / name.replace("@", "-")), max_steps=args.steps,
                         save_every=args.steps, progress=False, device="cpu")
        result = run_sft(args.pretrain, [args.chat / "sft" / "train.jsonl"], cfg,
                         val_data=[args.chat / "sft" / "val.jsonl"], truncate=truncate)
        counts = stop_counts(result.checkpoint, questions)
        rows.append([name, f"{cfg.batch_size} x {seq_len}", f"{result.last_loss:.3f}",
                     *(f"{s}/{n} ({chars:.0f} chars)" for s, n, chars in counts.values())])
        print(rows[-1], flush=True)
    table = markdown_table(["variant", "rows x tokens per step", "last train loss",
                            "fixed questions ended", "held-out prompts ended"], rows)
    settings = ", ".join(f"{k} {v}" for k, v in SAMPLING_PRESETS["chat"].items())
    print_report("SFT: answers the model ends itself", threads, table,
                 [f"{args.steps} SFT steps from `{args.pretrain}`; answers sampled with {settings}."])


if __name__ == "__main__":
    main()
