"""Multi-turn chat with a checkpoint: the chat template from the tokenizer, streamed replies, history
trimmed to the context window (oldest turns first), and the `xiaolm chat` terminal loop, which also
works with piped input (one user message a line).

Commands: /clear (forget the history), /system TEXT (set the system prompt; empty clears it),
/quit or /exit (leave; end of input does the same).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from xiaolm.inference.engine import Engine, Request, stream_alone
from xiaolm.inference.sampling import SamplingConfig
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer

HELP = "commands: /clear  forget the conversation, /system TEXT  set the system prompt, /quit  leave"


def chat_prompt_ids(tokenizer: XiaoTokenizer, messages: list[dict[str, str]]) -> list[int]:
    """A conversation rendered with the tokenizer's chat template, ending with the assistant's header:
    the prompt of the next reply (`xiaolm chat` and `xiaolm serve`)."""
    return tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))


class ChatSession:
    """One conversation with a model; `reply` streams the answer and records the turn."""

    def __init__(self, model: Transformer, tokenizer: XiaoTokenizer, sampling: SamplingConfig,
                 system: str | None = None, compile: bool = False) -> None:
        self.model = model
        # compiled: one engine (its cache the whole context) for every turn, compiled at the first
        self.engine = Engine(model, tokenizer, num_slots=1, compile=True) if compile else None
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.system = system
        self.history: list[dict[str, str]] = []
        self.num_dropped_turns = 0
        self.last_stop_id: int | None = None
        """The stop token (end of turn, document end or another of the model's) that ended the latest
        reply; None when the token limit ended it."""

    @property
    def last_stopped(self) -> bool:
        """Whether the model ended the latest reply itself, with either stop token."""
        return self.last_stop_id is not None

    def clear(self) -> None:
        self.history = []

    def reply_budget(self) -> int:
        """Tokens kept free for the reply: max_new_tokens, but at most half the context, so a
        large max_new_tokens does not leave room for no history at all."""
        return max(1, min(self.sampling.max_new_tokens, self.model.config.max_seq_len // 2))

    def prompt_ids(self, user_text: str) -> list[int]:
        """The rendered conversation plus the new message and the assistant header, after dropping
        the oldest (user, assistant) turns until it fits the context with room for the reply."""
        limit = self.model.config.max_seq_len - self.reply_budget()
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}]
        while True:
            ids = chat_prompt_ids(self.tokenizer, system + self.history + user)
            if len(ids) <= limit or not self.history:
                break
            self.history = self.history[2:]  # the oldest user message and its answer
            self.num_dropped_turns += 1
        if len(ids) >= self.model.config.max_seq_len:
            raise ValueError(f"the message is {len(ids)} tokens with the template; the model's context is "
                             f"{self.model.config.max_seq_len}")
        return ids

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's answer; the turn joins the history once it is complete."""
        request = Request(self.prompt_ids(user_text), self.sampling, stop_ids=frozenset(self.tokenizer.stop_ids))
        pieces: list[str] = []
        self.last_stop_id = None
        for piece in stream_alone(self.model, self.tokenizer, request, self.engine):
            pieces.append(piece)
            yield piece
        self.last_stop_id = request.stop_id
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": "".join(pieces) or " "}]


def _lines(stream: TextIO, interactive: bool, out: TextIO) -> Iterator[str]:
    """User messages. Piped input is read as UTF-8 bytes, so a line that is not valid UTF-8 is an
    error naming its number; on a terminal such a line is refused and the chat goes on."""
    if not interactive:
        for number, line in enumerate(getattr(stream, "buffer", stream), start=1):
            text = _decoded(line)
            if text is None:
                raise ValueError(f"stdin line {number} is not valid UTF-8; xiaolm chat reads UTF-8 text")
            yield text
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            text = _decoded(input("you> "))
        except EOFError:
            out.write("\n")
            return
        except UnicodeDecodeError:
            text = None
        if text is None:
            out.write("(that line is not valid UTF-8: check the terminal's encoding)\n")
            continue
        yield text


def _decoded(line: str | bytes) -> str | None:
    """The line as text, or None when it is not valid UTF-8 (bytes that do not decode, or a str that
    carries undecodable bytes as lone surrogates, as Python reads them in a C locale)."""
    try:
        return line.decode("utf-8") if isinstance(line, bytes) else line.encode("utf-8").decode("utf-8")
    except UnicodeError:
        return None


def run_chat(checkpoint: str | Path, sampling: SamplingConfig, *, system: str | None = None, device: str = "auto",
             compile: bool = False, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The `xiaolm chat` loop. Interactive on a terminal; with piped input each line is one user
    message and the transcript (user and assistant lines) goes to stdout."""
    from xiaolm.checkpoint import load_model

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    loaded = load_model(checkpoint, device)
    session = ChatSession(loaded.model, loaded.tokenizer, sampling, system, compile)
    interactive = stdin.isatty()
    if interactive:
        stdout.write(f"xiaolm chat with {checkpoint} ({HELP})\n")
    for line in _lines(stdin, interactive, stdout):
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/clear":
            session.clear()
            stdout.write("(history cleared)\n")
            continue
        if text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            session.clear()
            stdout.write(f"(system prompt {'set' if session.system else 'cleared'}; history cleared)\n")
            continue
        if text.startswith("/"):
            stdout.write(f"(unknown command {text.split()[0]}; {HELP})\n")
            continue
        if not interactive:
            stdout.write(f"you> {text}\n")
        stdout.write("assistant> ")
        stdout.flush()
        dropped = session.num_dropped_turns
        try:
            for piece in session.reply(text):
                stdout.write(piece)
                stdout.flush()
        except ValueError as error:  # a message longer than the context: say so, keep chatting
            stdout.write(f"(error: {error})")
        except KeyboardInterrupt:
            stdout.write(" (interrupted)")
        stdout.write("\n")
        if session.num_dropped_turns > dropped:
            stdout.write(f"(dropped {session.num_dropped_turns - dropped} oldest turn(s) to fit the context)\n")
        stdout.flush()
    return 0
