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
from xiaolm.config import CHAT_SAMPLING, TrainConfig
from xiaolm.data.chat import read_conversations
from xiaolm.inference.chat import ChatSession
from xiaolm.inference.generate import SamplingConfig
from xiaolm.inference.session import load_for_inference
from xiaolm.speedrun import CHAT_QUESTIONS, HELD_OUT_PROMPTS
from xiaolm.train.align import run_sft

VARIANTS = {"tokens@256": ("tokens", 256), "turns@256": ("turns", 256), "turns@128": ("turns", 128)}


def stop_counts(checkpoint: Path, questions: dict[str, list[str]]) -> dict[str, tuple[int, int, float]]:
    """Per question set: (answers the model ended with <|im_end|>, questions, mean answer length in
    characters)."""
    model, tokenizer = load_for_inference(checkpoint, "cpu")
    counts = {}
    for name, prompts in questions.items():
        stopped, chars = 0, 0
        for seed, prompt in enumerate(prompts):
            session = ChatSession(model, tokenizer, SamplingConfig(**CHAT_SAMPLING, seed=seed))
            chars += len("".join(session.reply(prompt)))
            stopped += session.last_stop_id == tokenizer.im_end_id
        counts[name] = (stopped, len(prompts), chars / len(prompts))
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
    held_out = [next(m["content"] for m in conversation if m["role"] == "user")
                for conversation in read_conversations([args.chat / "sft" / "val.jsonl"])[:HELD_OUT_PROMPTS]]
    questions = {"fixed": CHAT_QUESTIONS, "held out": held_out}
    preset = TrainConfig.from_preset("sft")
    rows = []
    for name in args.variants:
        truncate, seq_len = VARIANTS[name]
        cfg = TrainConfig.from_preset("sft", out_dir=str(args.work / name.replace("@", "-")), max_steps=args.steps,
                                      seq_len=seq_len, batch_size=preset.batch_size * preset.seq_len // seq_len,
                                      save_every=args.steps, progress=False, device="cpu")
        result = run_sft(args.pretrain, [args.chat / "sft" / "train.jsonl"], cfg,
                         val_data=[args.chat / "sft" / "val.jsonl"], truncate=truncate)
        counts = stop_counts(result.checkpoint, questions)
        rows.append([name, f"{cfg.batch_size} x {seq_len}", f"{result.last_loss:.3f}",
                     *(f"{s}/{n} ({chars:.0f} chars)" for s, n, chars in counts.values())])
        print(rows[-1], flush=True)
    table = markdown_table(["variant", "rows x tokens per step", "last train loss",
                            "fixed questions ended", "held-out prompts ended"], rows)
    settings = ", ".join(f"{k} {v}" for k, v in CHAT_SAMPLING.items())
    print_report("SFT: answers the model ends itself", threads, table,
                 [f"{args.steps} SFT steps from `{args.pretrain}`; answers sampled with {settings}."])


if __name__ == "__main__":
    main()
