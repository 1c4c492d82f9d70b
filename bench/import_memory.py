"""Peak memory of `xiaolm import hf` on a model of Qwen2.5-0.5B's shape (494M parameters, tied
embeddings, bf16 safetensors as published), against the model's fp32 size.

A random model of that shape is written once with transformers (bf16, one safetensors file), then
each measured step runs in a fresh process and reports its peak resident memory (ru_maxrss):
an empty process that imports torch and xiaolm (the floor), `load_model` of the folder (weights
streamed into a fp32 model), and `xiaolm import hf` (load, then write a fp32 checkpoint). With
--gguf the same model is also written as a q8_0 GGUF file (`xiaolm export gguf`), and `load_model`
and `xiaolm import gguf` of that file are measured (the floor then imports transformers and gguf).

    python bench/import_memory.py --out /tmp/qwen05b [--gguf]   # about 4 GB of disk (6 with --gguf)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
STEPS = {
    "floor": "import torch, xiaolm.checkpoint",
    "load_model": "from xiaolm.checkpoint import load_model; load_model({folder!r})",
    "import hf": "from xiaolm.interop.hf_import import import_hf; import_hf({folder!r}, {out!r})",
}
GGUF_STEPS = {
    "gguf floor": "import torch, transformers, gguf, xiaolm.checkpoint, xiaolm.interop.gguf_import",
    "load_model gguf": "from xiaolm.checkpoint import load_model; load_model({gguf!r})",
    "import gguf": "from xiaolm.interop.gguf_import import import_gguf; import_gguf({gguf!r}, {out!r})",
}


def write_model(folder: Path) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    import transformers
    from interop_helpers import write_foreign_tokenizer

    write_foreign_tokenizer(folder, "qwen")
    config = transformers.Qwen2Config(**QWEN25_05B)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="4GB")
    return sum(p.numel() for p in model.parameters())


def peak_rss_mb(code: str) -> float:
    """Peak resident memory of a fresh Python running `code`, in MB: VmHWM of its own memory map
    (ru_maxrss would carry over the parent's peak across exec)."""
    report = "; print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    done = subprocess.run([sys.executable, "-c", code + report], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024  # kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder; its model is reused when there")
    parser.add_argument("--gguf", action="store_true", help="also measure the import of the model as a GGUF file")
    args = parser.parse_args()
    folder, checkpoint = args.out / "hf", args.out / "ckpt"
    if (folder / "config.json").is_file():
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            num_params = sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    else:
        num_params = write_model(folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    fp32_mb = num_params * 4 / 2**20
    results = {"parameters": num_params, "fp32_mb": round(fp32_mb)}
    steps = dict(STEPS)
    gguf_file = args.out / "model.gguf"
    if args.gguf:
        if not gguf_file.is_file():
            from xiaolm.interop.gguf_export import export_gguf

            export_gguf(folder, gguf_file, dtype="q8_0")
        steps.update(GGUF_STEPS)
    for name, code in steps.items():
        shutil.rmtree(checkpoint, ignore_errors=True)
        code = code.format(folder=str(folder), out=str(checkpoint), gguf=str(gguf_file))
        results[f"{name}_peak_mb"] = round(peak_rss_mb(code))
    for name, floor in (("load_model", "floor"), ("import hf", "floor"), ("load_model gguf", "gguf floor"),
                        ("import gguf", "gguf floor")):
        if f"{name}_peak_mb" in results:
            extra = results[f"{name}_peak_mb"] - results[f"{floor}_peak_mb"]
            results[f"{name}_over_fp32"] = round(extra / fp32_mb, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
