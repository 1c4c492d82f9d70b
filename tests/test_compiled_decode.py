"""The compiled decode step (inference/compiled.py): the same tokens as eager decoding, one row or
several at different positions, through the engine, chat and `xiaolm generate`; where compiling
fails, eager decoding with the reason said. Compiling runs Inductor's C++ code generation (the
first test pays tens of seconds; later ones reuse its kernels from Inductor's disk cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from chat_helpers import make_checkpoint
from conftest import ROOT, tiny_model_config
from xiaolm.checkpoint import load_model
from xiaolm.cli import main
from xiaolm.inference.chat import ChatSession
from xiaolm.inference.engine import Engine, Request
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.transformer import Transformer


def run_greedy(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    requests = [Request(prompt, SamplingConfig(max_new_tokens=n, temperature=0)) for prompt, n in zip(prompts, lengths)]
    engine.run(requests)
    return [r.output_ids for r in requests]


def test_compiled_engine_decodes_what_the_eager_one_does(tokenizer, capsys):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size)).eval()
    generator = torch.Generator().manual_seed(1)
    # four requests of different lengths in three slots: rows at different positions, one request
    # waiting for a slot, the batch shrinking to one row as the others end
    prompts = [torch.randint(0, tokenizer.vocab_size, (n,), generator=generator).tolist() for n in (5, 23, 9, 2)]
    lengths = [20, 8, 30, 12]
    eager = run_greedy(Engine(model, None, num_slots=3, max_len=60), prompts, lengths)

    engine = Engine(model, None, num_slots=3, max_len=60, compile=True)
    engine.warm_up()  # what a server does before it listens: the several-row graph, also for one row
    assert engine.compiled.compiled_for == {True} and not engine.compiled.failed
    assert run_greedy(engine, prompts, lengths) == eager
    assert run_greedy(engine, prompts[:1], lengths[:1]) == eager[:1]  # the engine is reused, nothing recompiled
    err = capsys.readouterr().err
    assert err.count("decode step compiled in") == 1 and "failed" not in err
    assert not engine.running  # every slot free again


def test_a_mixture_of_experts_model_compiles_and_decodes_what_the_eager_one_does(capsys):
    # routed experts: eagerly each expert runs on its tokens (sizes that are data); compiled, each
    # assignment gathers its expert's weights (moe.gathered_dispatch), sizes a static graph holds
    model = Transformer(tiny_model_config(num_experts=4, num_experts_per_token=2, num_shared_experts=1)).eval()
    prompts, lengths = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [6, 9, 12]
    eager = run_greedy(Engine(model, None, num_slots=2), prompts, lengths)
    engine = Engine(model, None, num_slots=2, compile=True)
    assert run_greedy(engine, prompts, lengths) == eager
    assert not engine.compiled.failed and engine.compiled.compiled_for == {True}
    alone = Engine(model, None, num_slots=1, compile=True)  # one slot: the one-row graph
    assert run_greedy(alone, prompts, lengths) == eager and alone.compiled.compiled_for == {False}
    assert "failed" not in capsys.readouterr().err


def test_without_a_cxx_compiler_generate_decodes_eagerly_and_says_why(tmp_path, tokenizer):
    """A machine without a C++ compiler (CXX names none; an empty Inductor cache): `--compile` says
    why once and `xiaolm generate` prints what it prints without it."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    outputs = []
    for flags in ([], ["--compile"]):
        result = subprocess.run([sys.executable, "-m", "xiaolm.cli", "generate", "--ckpt", str(checkpoint),
                                 "--prompt", "从前", "--temperature", "0", "--max-new-tokens", "10", *flags],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert result.stderr.count("compiling the decode step failed, decoding eagerly") == 1, result.stderr[-2000:]


def test_compiled_chat_and_generate_say_what_eager_ones_do(tmp_path, tokenizer, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    model = load_model(checkpoint, "cpu").model
    sessions = [ChatSession(model, tokenizer, greedy), ChatSession(model, tokenizer, greedy, compile=True)]
    for message in ("你好", "再说一遍", "hello"):  # one engine for every turn of the compiled session
        replies = ["".join(session.reply(message)) for session in sessions]
        assert replies[0] == replies[1]
    assert sessions[1].engine.compiled.compiled_for == {False}

    outputs = []
    for flags in ([], ["--compile"]):
        capsys.readouterr()
        assert main(["generate", "--ckpt", str(checkpoint), "--prompt", "从前", "--prompt", "the",
                     "--temperature", "0", "--max-new-tokens", "10", *flags]) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
    assert outputs[0] == outputs[1]
    assert "decode step compiled in" in captured.err  # once, for both prompts
    assert captured.err.count("compiling the decode step for one row") == 1


def test_a_compiled_server_compiles_before_it_listens_and_answers(tmp_path, tokenizer):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra: pip install 'xiaolm[serve]'")
    import httpx

    from serve_helpers import run_server

    checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)
    body = {"model": "ckpt", "prompt": "从前有", "max_tokens": 8, "temperature": 0}
    answers = []
    for compile in (False, True):
        with run_server(checkpoint, compile=compile, num_slots=4) as running:
            engine = running.server.engine
            assert engine.compiled is None if not compile else engine.compiled.compiled_for == {True}
            reply = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers.append(reply.json()["choices"][0]["text"])
    assert answers[0] == answers[1]
