"""`xiaolm chat`: piped multi-turn input with commands, history trimming to the context window."""

import subprocess
import sys

from xiaolm.inference.chat import ChatSession
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.transformer import Transformer
from xiaolm.train.runners import run_sft

from chat_helpers import SFT_TRAIN, make_checkpoint
from conftest import ROOT, tiny_model_config, tiny_train_config


def test_history_is_trimmed_oldest_turn_first(tokenizer):
    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128)).eval()
    session = ChatSession(model, tokenizer, SamplingConfig(max_new_tokens=16), system="sys")
    for i in range(6):
        session.history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} " * 3}]
    ids = session.prompt_ids("new question")
    assert len(ids) <= 128 - 16 and 0 < session.num_dropped_turns < 6
    assert session.history[-1]["content"] == "a5 " * 3  # the newest turns stay
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nsys") and text.endswith("new question<|im_end|>\n<|im_start|>assistant\n")
    pieces = list(session.reply("new question"))
    assert session.history[-2] == {"role": "user", "content": "new question"}
    assert session.history[-1]["content"] == ("".join(pieces) or " ")


def test_session_records_how_a_reply_ended(tokenizer):
    import torch

    model = Transformer(tiny_model_config(vocab_size=tokenizer.vocab_size, max_seq_len=128,
                                          tie_embeddings=False)).eval()
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    session = ChatSession(model, tokenizer, greedy)
    with torch.no_grad():
        # dimension 0 of the residual stream is the embedding's, 5.0 for every token (no block writes
        # to it), and only it reaches the logits: greedy decoding picks <|im_end|> at once
        model.embed_tokens.weight[:, 0] = 5.0
        for layer in model.layers:
            layer.mlp.down_proj.weight[0].zero_()
            layer.attn.o_proj.weight[0].zero_()
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.end_of_turn_id, 0] = 1.0
    assert "".join(session.reply("hi")) == "" and session.last_stop_id == tokenizer.end_of_turn_id and session.last_stopped
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits equal: greedy takes id 0, <|endoftext|>
    list(session.reply("hi"))
    assert session.last_stop_id == tokenizer.eos_id == 0 and session.last_stopped
    with torch.no_grad():
        model.lm_head.weight[5, 0] = 1.0  # a plain token always wins: the token limit ends the reply
    assert len(list(session.reply("hi"))) >= 1 and session.last_stop_id is None and not session.last_stopped


def test_chat_command_with_piped_input(tmp_path, tokenizer):
    start = make_checkpoint(tmp_path / "start", tokenizer)
    run_sft(start, [SFT_TRAIN], tiny_train_config(tmp_path / "sft", seq_len=64, max_steps=2, eval_every=0))
    lines = "你好\nWho are you?\n/clear\n/system Answer briefly.\n1+1=?\n/bogus\n/quit\nnever read\n"
    result = subprocess.run(
        [sys.executable, "-m", "xiaolm.cli", "chat", "--ckpt", str(tmp_path / "sft"), "--max-new-tokens", "8",
         "--temperature", "0", "--device", "cpu"],
        input=lines, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("assistant> ") == 3 and "you> 你好\n" in out and "you> 1+1=?" in out
    assert "(history cleared)" in out and "(system prompt set; history cleared)" in out
    assert "unknown command /bogus" in out and "never read" not in out
