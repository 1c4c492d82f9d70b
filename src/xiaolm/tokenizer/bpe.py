"""Byte-level BPE tokenizer (the `tokenizers` library), its special tokens and chat template.

This module is the only place the chat format lives. The tokenizer folder it writes
(tokenizer.json + tokenizer_config.json) loads with `transformers.AutoTokenizer.from_pretrained`
and its `apply_chat_template` renders exactly what `render_chat` renders here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from xiaolm.utils import batched

# Ids 0, 1, 2 in this order (minimind's layout). <|endoftext|> ends every pretraining document
# and pads; <|im_start|>/<|im_end|> frame chat turns (ChatML).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# ChatML. Each message: <|im_start|>{role}\n{content}<|im_end|>\n
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template in Python; tests hold it equal to the Jinja CHAT_TEMPLATE."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table that the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class XiaoTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with xiaolm's special tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special token(s) {missing}; train it with `xiaolm tokenizer train`")
        self.eos_id = tokenizer.token_to_id(ENDOFTEXT)
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.special_ids = frozenset(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
        self._token_bytes: list[bytes] | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The raw bytes each token id stands for (special tokens: their UTF-8 text).

        Used to stream text a token at a time without splitting a multi-byte character,
        and to count the bytes behind each target token for bits-per-byte.
        """
        if self._token_bytes is None:
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            table = [b""] * self.vocab_size
            for token, index in self.tokenizer.get_vocab().items():
                if index in self.special_ids:
                    table[index] = token.encode("utf-8")
                else:
                    table[index] = bytes(byte_of[c] for c in token)
            self._token_bytes = table
        return self._token_bytes

    def save(self, directory: str | Path) -> None:
        save_tokenizer(self.tokenizer, directory)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 6400, min_frequency: int = 2) -> XiaoTokenizer:
    """Train a byte-level BPE on `texts` (any iterable; it is streamed)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + specials)")
    tokenizer = Tokenizer(models.BPE())
    # no normaliser: any normalisation (NFKC, lowercasing) would break decode(encode(x)) == x
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    num_texts = 0

    def counted(texts: Iterable[str]) -> Iterable[str]:
        nonlocal num_texts
        for text in texts:
            num_texts += 1
            yield text

    tokenizer.train_from_iterator(batched(counted(texts), 1000), trainer=trainer)
    if num_texts == 0:
        raise ValueError("no text to train the tokenizer on: the data holds no documents")
    return XiaoTokenizer(tokenizer)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_whole(directory / TOKENIZER_FILE, tokenizer.to_str(pretty=True))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [ENDOFTEXT, IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_whole(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": IM_END, "pad_token": ENDOFTEXT, "additional_special_tokens": SPECIAL_TOKENS}
    _write_whole(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


def _write_whole(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: an interrupted save never leaves half a file where a
    good tokenizer was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_tokenizer(directory: str | Path) -> XiaoTokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"no tokenizer at {path}; train one with `xiaolm tokenizer train`")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises a bare Exception for a file it cannot parse
        raise ValueError(f"{path}: not a readable tokenizer file ({error})") from None
    return XiaoTokenizer(tokenizer)
