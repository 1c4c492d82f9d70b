"""Load on `xiaolm serve`: N concurrent streaming clients on loopback, for N = 1, 4, 16, 64.

For each model preset a random-weight checkpoint (weights do not change the cost of a step) is
served by `xiaolm serve` in its own process; every client streams one chat completion of
--max-tokens tokens (seeded sampling, the stop tokens are rare at random weights) and the round's
figures are: aggregate generated tokens/s (all tokens / the round's wall time), time to first
token p50/p95, per-client tokens/s (median over clients, after the first token), failures, and the
server's resident memory before and after. The largest N runs twice, to see memory growth. The
ratio that matters, aggregate tok/s at 16 clients over 1 client, is measured in one run.

    python bench/serve_load.py --presets tiny minimind2-small --clients 1 4 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import markdown_table, print_report
from xiaolm.checkpoint import write_model_folder
from xiaolm.config import ModelConfig, to_dict
from xiaolm.data.readers import iter_documents
from xiaolm.model.transformer import Transformer
from xiaolm.runtime import seeded
from xiaolm.tokenizer.bpe import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["你好，请介绍一下三国。", "What is the capital of France?", "写一首关于春天的诗。", "本法所称的是什么？",
             "Tell me a story about a cat.", "今天天气很好，我们去哪里？", "1+1=?", "Who are you?"]


def make_checkpoint(folder: Path, preset: str, tokenizer) -> Path:
    with seeded(0):
        model = Transformer(ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size))
    write_model_folder(folder, model, tokenizer, {"model": to_dict(model.config)})
    return folder


def start_server(checkpoint: Path, args) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "xiaolm.cli", "serve", "--ckpt", str(checkpoint), "--port", "0", "--device", "cpu",
         "--model-name", "bench", "--num-slots", str(args.num_slots), "--max-waiting", str(max(args.clients)),
         "--max-tokens", str(args.max_tokens), *(["--compile"] if args.compile else [])],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if found:
            # keep draining the server's log so it never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, found.group(1)
    raise RuntimeError("the server did not start")


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def one_client(http: httpx.AsyncClient, url: str, index: int, args) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
            "max_tokens": args.max_tokens, "temperature": 0.8, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"failed": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"failed": chunk["error"]["message"]}
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        return {"failed": f"{type(error).__name__}: {error}"}
    end = time.perf_counter()
    first = first or end
    return {"tokens": tokens, "ttft": first - started,
            "rate": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0}


async def round_of(url: str, num_clients: int, args) -> dict:
    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(http, url, i, args) for i in range(num_clients)))
        seconds = time.perf_counter() - started
    done = [r for r in results if "failed" not in r]
    ttfts = sorted(r["ttft"] for r in done) or [float("nan")]
    return {
        "clients": num_clients, "seconds": seconds, "tokens": sum(r["tokens"] for r in done),
        "aggregate": sum(r["tokens"] for r in done) / seconds,
        "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "per_client": statistics.median([r["rate"] for r in done]) if done else 0.0,
        "failures": [r["failed"] for r in results if "failed" in r],
    }


async def bench_preset(preset: str, tokenizer, folder: Path, args) -> tuple[list[list], str]:
    checkpoint = make_checkpoint(folder / preset, preset, tokenizer)
    process, url = start_server(checkpoint, args)
    rows = []
    try:
        await round_of(url, 1, args)  # warm up: first-call allocations and caches
        rounds = list(args.clients) + [max(args.clients)]  # the largest twice: memory across rounds
        one_client_rate = None
        for num_clients in rounds:
            before = rss_mib(process.pid)
            result = await round_of(url, num_clients, args)
            after = rss_mib(process.pid)
            one_client_rate = one_client_rate or (result["aggregate"] if num_clients == 1 else None)
            ratio = f"{result['aggregate'] / one_client_rate:.2f}x" if one_client_rate else "-"
            rows.append([preset, num_clients, f"{result['aggregate']:,.1f}", ratio,
                         f"{result['ttft_p50'] * 1000:,.0f} / {result['ttft_p95'] * 1000:,.0f}",
                         f"{result['per_client']:,.1f}", len(result["failures"]),
                         f"{before:,.0f} -> {after:,.0f}"])
            print(f"[{preset}] {num_clients} clients: {result['tokens']} tokens in {result['seconds']:.1f} s; "
                  f"failures {result['failures'][:3]}", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return rows, f"{preset}: server process, {args.num_slots} slots"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "minimind2-small"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each client asks for")
    parser.add_argument("--num-slots", type=int, default=16, help="the server's --num-slots")
    parser.add_argument("--compile", action="store_true", help="the server decodes with its compiled step "
                        "(compiled before it listens, not timed)")
    args = parser.parse_args()
    texts = list(iter_documents([ROOT / "data" / "sample" / "train.jsonl"]))
    tokenizer = train_tokenizer(texts[:2000], vocab_size=6400)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as folder:
        for preset in args.presets:
            preset_rows, note = await bench_preset(preset, tokenizer, Path(folder), args)
            rows += preset_rows
            notes.append(note)
    notes.append(f"Each client: one streamed chat completion of {args.max_tokens} tokens (temperature 0.8, its own "
                 f"seed), random-weight model, fp32 on the CPU, decoding {'compiled' if args.compile else 'eager'}; "
                 "the server and the clients share the machine. "
                 "ratio = aggregate tok/s / the 1-client figure of the same run. The last row of each preset "
                 "repeats the largest round (memory growth).")
    table = markdown_table(["preset", "clients", "aggregate tok/s", "vs 1 client", "TTFT p50 / p95 ms",
                            "per-client tok/s", "failures", "server RSS MiB"], rows)
    import torch

    print_report("xiaolm serve under concurrent streaming clients", torch.get_num_threads(), table, notes)


if __name__ == "__main__":
    asyncio.run(main())
