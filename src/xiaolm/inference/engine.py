"""The one decode path of `xiaolm generate`, `chat` and `serve`: continuous batching over a slot pool.

A fixed number of slots share one preallocated KV cache, one row per slot. A new request is
prefilled into a free slot, `prefill_chunk` tokens per forward (memory stays flat however long the
prompt). Then every step runs one forward for all active slots together (each row at its own
position, model/kv_cache.py), samples every row with its own settings
and generator (inference/sampling.py), and streams each request's text a whole character at a
time. A request that ends (a stop token, a stop string, its token limit, the context) or is
cancelled frees its slot at once, and the last active slot moves into the hole, so the active rows
are always rows [0, n) of the cache: a view, with nothing gathered or copied per step.

`xiaolm generate` and `chat` run one request at a time on the calling thread (`stream_alone`: a
batch of one); `xiaolm serve` runs `Engine.run_forever` on its main thread (the one that loaded the
model: serve/app.py says why), which requests from the HTTP thread join at any step (`submit`) and
leave through `Request.cancel`. With `compile` the decode forward is a compiled
step (inference/compiled.py), and generate and chat keep one engine across prompts and turns.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from xiaolm.inference.sampling import SamplingConfig, penalize, sample_rows
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer

FINISH_STOP = "stop"  # a stop token or a stop string
FINISH_LENGTH = "length"  # max_new_tokens, or the context is full
FINISH_CANCELLED = "cancelled"  # the caller went away
FINISH_ERROR = "error"  # the engine failed while the request ran (message in Request.error)
PREFILL_CHUNK = 1024
"""Prompt tokens per prefill forward: longer prompts are prefilled a chunk at a time so memory stays flat
(docs/benchmarks.md, section 9: smaller chunks cost more time on a busy CPU)."""


class QueueFull(Exception):
    """The engine's waiting queue is at its limit; try again later."""


class TextStreamer:
    """Turns token ids into text pieces that never split a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character (a Chinese character
    is 3 bytes); the incremental decoder holds such bytes back until the character completes.
    Invalid sequences become U+FFFD rather than vanishing.
    """

    def __init__(self, token_bytes: Sequence[bytes], skip_ids: frozenset[int] = frozenset()) -> None:
        self.token_bytes = token_bytes
        self.skip_ids = skip_ids
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self.skip_ids:
            return ""
        return self.decoder.decode(self.token_bytes[token_id])

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class StopStrings:
    """Cuts streamed text at the first stop string, which is never emitted, not even in part: the
    tail that could still grow into a stop string (one may span several tokens) is held back until
    the next piece tells."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (the rest is then dropped)."""
        if not self.stops:
            return text, False
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            emitted, self.pending = self.pending[:min(found)], ""
            return emitted, True
        held = 0
        for size in range(min(len(self.pending), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(self.pending[-size:]) for s in self.stops):
                held = size
                break
        emitted, self.pending = self.pending[:len(self.pending) - held], self.pending[len(self.pending) - held:]
        return emitted, False

    def flush(self) -> str:
        """The held-back tail, at the end of a reply that no stop string ended."""
        emitted, self.pending = self.pending, ""
        return emitted


@dataclass(eq=False)
class Request:
    """One generation: what to continue and how; the engine fills in the rest as it runs.

    `listener(request, text)` is called on the engine's thread with each new piece of text, and
    `listener(request, None)` once when the request has finished."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    listener: Callable[[Request, str | None], None] | None = None
    output_ids: list[int] = field(default_factory=list)  # every sampled token, a final stop token included
    finish_reason: str | None = None  # FINISH_*
    stop_id: int | None = None  # the stop token that ended it, if one did
    error: str | None = None
    submitted_at: float = 0.0  # time.perf_counter() seconds
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed at the next step (any thread)."""
        self.cancelled = True


class _Running:
    """A request in a slot: its generator and the state of its text stream (no text without a
    tokenizer: then only the token ids are recorded)."""

    def __init__(self, request: Request, streamer: TextStreamer | None, device: torch.device) -> None:
        self.request = request
        self.streamer = streamer
        self.stops = StopStrings(request.stop_strings)
        seed = request.sampling.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def text(self, token: int) -> tuple[str, bool]:
        """The text `token` completes, safe to emit, and whether a stop string was reached."""
        return self.stops.push(self.streamer.push(token)) if self.streamer is not None else ("", False)

    def tail(self) -> str:
        """What is held back, at the end of a reply that no stop string ended."""
        if self.streamer is None:
            return ""
        return self.stops.push(self.streamer.flush())[0] + self.stops.flush()


class Engine:
    """A slot pool over one KV cache of `num_slots` rows of `max_len` positions (the model's context
    unless smaller). Puts the model in eval mode. Without a tokenizer requests get token ids only."""

    def __init__(self, model: Transformer, tokenizer: XiaoTokenizer | None, num_slots: int = 1,
                 max_len: int | None = None, max_waiting: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, compile: bool = False) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be at least 1")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model.prepare_for_decoding()
        self.tokenizer = tokenizer
        self.num_slots = num_slots
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_waiting = max_waiting
        self.device = model.embed_tokens.weight.device
        # compiled: a spare row and position (inference/compiled.py)
        self.cache = model.allocate_cache(num_slots + int(compile), self.max_len + int(compile))
        self.compiled = None
        if compile:
            from xiaolm.inference.compiled import CompiledDecoder

            self.compiled = CompiledDecoder(model, self.cache)
        vocab_size = model.config.vocab_size
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=self.device)  # prompt + reply
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=self.device)  # reply only
        self.running: list[_Running] = []  # row i of the cache serves running[i]
        self.next_logits: torch.Tensor | None = None  # (len(running), V): what each row samples next
        self.waiting: deque[Request] = deque()
        self.condition = threading.Condition()  # guards `waiting`; wakes the loop thread
        self.token_bytes = tokenizer.token_bytes() if tokenizer is not None else None

    # --- joining and leaving -------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse a request this engine cannot run, with a message for the user."""
        num_prompt = len(request.prompt_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if num_prompt >= self.max_len:
            raise ValueError(f"the prompt is {num_prompt} tokens; the context holds {self.max_len} "
                             "with at least one for the reply")
        vocab_size = self.model.config.vocab_size
        if not all(0 <= token < vocab_size for token in request.prompt_ids):
            raise ValueError(f"token ids must be in [0, {vocab_size})")

    def submit(self, request: Request) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        self.check(request)
        request.submitted_at = time.perf_counter()
        with self.condition:
            free_slots = self.num_slots - len(self.running)
            if self.max_waiting is not None and len(self.waiting) - free_slots >= self.max_waiting:
                raise QueueFull(f"all {self.num_slots} slots are busy and {self.max_waiting} requests wait already")
            self.waiting.append(request)
            self.condition.notify()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _running(self, request: Request) -> _Running:
        streamer = None
        if self.tokenizer is not None:
            streamer = TextStreamer(self.token_bytes, self.tokenizer.special_ids)
        return _Running(request, streamer, self.device)

    def _finish(self, running: _Running, reason: str, tail: str = "") -> None:
        request = running.request
        if tail:
            self._emit(request, tail)
        request.finish_reason, request.finished_at = reason, time.perf_counter()
        if request.listener is not None:
            request.listener(request, None)

    @staticmethod
    def _emit(request: Request, text: str) -> None:
        if text and request.listener is not None:
            request.listener(request, text)

    def _admit(self) -> list[torch.Tensor]:
        """Prefill waiting requests into free slots; their next-token logits (1, V) each."""
        new_logits = []
        while len(self.running) < self.num_slots:
            with self.condition:
                if not self.waiting:
                    break
                request = self.waiting.popleft()
            running = self._running(request)
            if request.cancelled or request.sampling.max_new_tokens == 0:
                self._finish(running, FINISH_CANCELLED if request.cancelled else FINISH_LENGTH)
                continue
            row = len(self.running)
            self.running.append(running)  # first: if the prefill fails, `abort` still ends this request
            prompt = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)  # (1, P)
            self.cache.lengths[row] = 0
            row_cache = self.cache.rows(row, row + 1)
            new_logits.append(self.model.prefill(prompt, row_cache, self.prefill_chunk))  # (1, V)
            self.seen[row] = False
            self.seen[row, prompt[0]] = True
            self.counts[row] = 0
        return new_logits

    def _accept(self, running: _Running, token: int) -> bool:
        """Record a sampled token and stream its text; True when the request is finished."""
        request = running.request
        if request.cancelled:
            self._finish(running, FINISH_CANCELLED)
            return True
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.output_ids.append(token)
        if token in request.stop_ids:
            request.stop_id = token
            self._finish(running, FINISH_STOP, running.tail())
            return True
        text, hit_stop_string = running.text(token)
        self._emit(request, text)
        if hit_stop_string:
            self._finish(running, FINISH_STOP)
            return True
        num_prompt, num_output = len(request.prompt_ids), len(request.output_ids)
        if num_output >= request.sampling.max_new_tokens or num_prompt + num_output >= self.max_len:
            self._finish(running, FINISH_LENGTH, running.tail())
            return True
        return False

    def _release(self, row: int, tokens: list[int] | None = None) -> None:
        """Free `row`: the last active row moves into it, with its pending logits or `tokens` entry."""
        last = len(self.running) - 1
        if row != last:
            self.cache.copy_row(last, row)
            self.seen[row] = self.seen[last]
            self.counts[row] = self.counts[last]
            self.running[row] = self.running[last]
            if self.next_logits is not None:
                self.next_logits[row] = self.next_logits[last]
            if tokens is not None:
                tokens[row] = tokens[last]
        self.running.pop()
        if self.next_logits is not None:
            self.next_logits = self.next_logits[:last]
        if tokens is not None:
            tokens.pop()

    def _drop_cancelled(self) -> None:
        """Free the slots of requests cancelled since the last step, before new ones are admitted."""
        for row in reversed(range(len(self.running))):
            if self.running[row].request.cancelled:
                self._finish(self.running[row], FINISH_CANCELLED)
                self._release(row)

    # --- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests, sample one token for every active row, stream it, free the
        finished rows, and run one forward for the rest. False when there was nothing to do."""
        self._drop_cancelled()
        num_old = len(self.running)
        new_logits = self._admit()
        if not self.running:
            self.next_logits = None
            return False
        parts = ([self.next_logits[:num_old]] if num_old else []) + new_logits
        logits = torch.cat(parts) if len(parts) > 1 else parts[0]  # (n, V)
        self.next_logits = None  # consumed; the forward at the end of the step makes the next
        configs = [r.request.sampling for r in self.running]
        num_rows = len(self.running)
        logits = penalize(logits, configs, self.seen[:num_rows], self.counts[:num_rows])
        tokens = sample_rows(logits, configs, [r.generator for r in self.running])
        index = torch.arange(num_rows, device=self.device)
        token_tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)  # (n,)
        self.seen[index, token_tensor] = True
        self.counts[index, token_tensor] += 1
        finished = [row for row, (running, token) in enumerate(zip(self.running, tokens))
                    if self._accept(running, token)]
        for row in reversed(finished):  # from the end, so a moved row is never one still to free
            self._release(row, tokens)
        if not self.running:
            return True
        if finished:  # rows moved: the tokens of the rows still running, in their new order
            token_tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.next_logits = self.decode(token_tensor)
        return True

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decode forward: one new token for each active row (n,), every row at its own position
        in rows [0, n) of the cache; the logits of what comes next (n, V). Compiled (static shapes,
        inference/compiled.py) when the engine was made with `compile`, unless that failed."""
        num_rows = tokens.shape[0]
        if self.compiled is not None:
            logits = self.compiled(tokens)
            if logits is not None:
                return logits
        cache = self.cache if num_rows == self.cache.batch_size else self.cache.rows(0, num_rows)
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def warm_up(self) -> None:
        """Compile the decode step now (a server does, before it listens), with a two-token request
        of its own (with several slots it runs through the several-row graph: inference/compiled.py);
        nothing to do for an eager engine."""
        if self.compiled is not None:
            self.run([Request([0], SamplingConfig(max_new_tokens=2, temperature=0))])

    def abort(self, reason: str = FINISH_CANCELLED, error: str | None = None) -> None:
        """End every running and waiting request (after an interruption or a failed step)."""
        with self.condition:
            waiting, self.waiting = list(self.waiting), deque()
        for running in self.running + [self._running(request) for request in waiting]:
            if not running.request.finished:
                running.request.error = error
                self._finish(running, reason)
        self.running, self.next_logits = [], None
        self.cache.lengths.zero_()

    # --- drivers -------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> None:
        """Run `requests` together to their end on this thread."""
        for request in requests:
            self.submit(request)
        try:
            while self.step():
                pass
        except BaseException:
            self.abort()
            raise

    def stream(self, request: Request) -> Iterator[str]:
        """Run one request on this thread, yielding its text as it forms. Stopping the iteration
        early (or an interruption) cancels it."""
        pieces: list[str] = []
        request.listener = lambda _, piece: pieces.append(piece) if piece is not None else None
        self.submit(request)
        try:
            while not request.finished:
                self.step()
                yield from pieces
                pieces.clear()
            yield from pieces
        finally:
            if not request.finished:
                self.abort()

    def run_forever(self, stop: threading.Event, on_error: Callable[[BaseException], None] | None = None) -> None:
        """The server's loop: step while there is work, sleep when there is none, until `stop`.
        A failing step ends the requests it held with an error and the loop goes on."""
        while not stop.is_set():
            with self.condition:
                while not self.waiting and not self.running and not stop.is_set():
                    self.condition.wait(timeout=0.5)
            if stop.is_set():
                break
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - the server must outlive any single failure
                self.abort(FINISH_ERROR, f"{type(error).__name__}: {error}")
                if on_error is not None:
                    on_error(error)
        self.abort()

    def wake(self) -> None:
        with self.condition:
            self.condition.notify_all()


def stream_alone(model: Transformer, tokenizer: XiaoTokenizer, request: Request,
                 engine: Engine | None = None) -> Iterator[str]:
    """Decode one request by itself (a batch of one) on this thread: in `engine` (one slot, kept by
    the caller across requests, e.g. compiled), else in a cache sized for it."""
    if engine is None:
        max_len = len(request.prompt_ids) + max(1, request.sampling.max_new_tokens)
        engine = Engine(model, tokenizer, num_slots=1, max_len=max_len)
    yield from engine.stream(request)


def stream_completion(model: Transformer, tokenizer: XiaoTokenizer, prompt: str,
                      sampling: SamplingConfig, engine: Engine | None = None) -> Iterator[str]:
    """Continue `prompt` (`xiaolm generate`), yielding text pieces as soon as they form whole
    characters; generation stops at the tokenizer's stop tokens, which are not printed."""
    prompt_ids = tokenizer.encode_prompt(prompt)
    request = Request(prompt_ids, sampling, stop_ids=frozenset(tokenizer.stop_ids))
    yield from stream_alone(model, tokenizer, request, engine)
