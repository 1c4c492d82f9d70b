"""Bits-per-byte of an exported base model scored the way a transformers user scores it, against
`xiaolm eval ppl` on the same model and text (issue 14).

The checkpoint is exported (`xiaolm export hf`) and read back with AutoTokenizer and
AutoModelForCausalLM only. Four scores of the held-out split:
- xiaolm: `evaluate_text`, documents packed (each ends with <|endoftext|>) into windows of max_seq_len;
- packed: the same packing done with AutoTokenizer and its `eos_token_id` (the export's eos);
- per document: each document scored alone, after the eos (as a document starts in training),
  its eos included, in windows of max_seq_len: no document sees another, the first tokens of each
  window see less context than in packing;
- packed, eos <|im_end|>: what the export wrote as eos before (the error issue 14 measured).

    python bench/hf_bpb.py --ckpt runs/speedrun/pretrain     # a trained base model
    python bench/hf_bpb.py --train-steps 300                 # or train a small one on data/sample first
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"


def train_small(out: Path, steps: int) -> Path:
    from xiaolm.cli import main

    main(["tokenizer", "train", "--data", str(SAMPLE / "train.jsonl"), "--out", str(out / "tok"), "--vocab-size", "2000"])
    main(["pretrain", "--data", str(SAMPLE / "train.jsonl"), "--tokenizer", str(out / "tok"), "--preset", "tiny",
          "--hidden-size", "128", "--num-layers", "2", "--max-seq-len", "128", "--seq-len", "128",
          "--max-steps", str(steps), "--eval-every", "0", "--save-every", "0", "--no-progress",
          "--out-dir", str(out / "run"), "--device", "cpu"])
    return out / "run"


def score_windows(model, stream: list[int], seq_len: int) -> float:
    """Summed nats of every target in `stream` cut into windows of seq_len targets (the last partial)."""
    nats = 0.0
    for start in range(0, len(stream) - 1, seq_len):
        window = torch.tensor([stream[start:start + seq_len + 1]])
        with torch.no_grad():
            logits = model(window[:, :-1]).logits
        nats += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
    return nats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=None, help="base model checkpoint or run [train one]")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--data", type=Path, default=SAMPLE / "val.jsonl")
    parser.add_argument("--max-documents", type=int, default=200)
    args = parser.parse_args()
    import transformers

    from xiaolm.checkpoint import load_model
    from xiaolm.eval.ppl import evaluate_text
    from xiaolm.interop.hf_export import export_hf

    scratch = Path(tempfile.mkdtemp(prefix="hf_bpb-"))
    checkpoint = args.ckpt or train_small(scratch, args.train_steps)
    documents = [json.loads(line)["text"] for line in args.data.read_text(encoding="utf-8").splitlines()]
    documents = documents[: args.max_documents]
    data = scratch / "val.jsonl"
    data.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents))
    loaded = load_model(checkpoint)
    seq_len = loaded.config.max_seq_len
    ours = evaluate_text(loaded.model, loaded.tokenizer, [data], scratch / "tokens", seq_len=seq_len)

    out = export_hf(checkpoint, scratch / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    encoded = [tokenizer(d)["input_ids"] for d in documents]
    total_bytes = sum(len(d.encode("utf-8")) for d in documents)

    def packed_bpb(eos: int) -> float:
        stream = [t for ids in encoded for t in ids + [eos]]
        end = (len(stream) - 1) // seq_len * seq_len  # whole windows only, as eval ppl scores
        scored = stream[1:end + 1]
        num_bytes = len(tokenizer.decode(scored, skip_special_tokens=True).encode("utf-8"))
        return score_windows(model, stream[:end + 1], seq_len) / math.log(2) / num_bytes

    eos = tokenizer.eos_token_id
    per_document = sum(score_windows(model, [eos] + ids + [eos], seq_len) for ids in encoded)
    results = {
        "checkpoint": str(checkpoint), "documents": len(documents), "seq_len": seq_len,
        "eos_token": tokenizer.eos_token,
        "xiaolm_eval_ppl_bpb": round(ours["bpb"], 4),
        "transformers_packed_bpb": round(packed_bpb(eos), 4),
        "transformers_per_document_bpb": round(per_document / math.log(2) / total_bytes, 4),
        "transformers_packed_bpb_eos_im_end": round(packed_bpb(tokenizer.convert_tokens_to_ids("<|im_end|>")), 4),
        "transformers_version": transformers.__version__,
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
