"""Byte-level BPE tokenizer (the `tokenizers` library), the roles of its special tokens and its chat
template.

This module is the only place the chat format lives. xiaolm's own tokenizers have three special
tokens (ids 0-2): <|endoftext|> ends every pretraining document and pads, <|im_start|>/<|im_end|>
frame chat turns (ChatML, `CHAT_TEMPLATE`), no BOS. An imported model's tokenizer brings its own
(tokenizer_config.json: BOS and whether it is added, EOS, padding, the Jinja chat template; the
end-of-turn token is read off the template, see `XiaoTokenizer.from_hf_files`); the roles are saved
in the folder's tokenizer_config.json, so every stage reads them from one place. The folder loads
with `transformers.AutoTokenizer.from_pretrained`, whose `apply_chat_template` renders exactly what
`XiaoTokenizer.render_chat` renders here (same Jinja settings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path
from typing import Any

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
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.50 may write the template instead
# xiaolm's own keys in tokenizer_config.json (transformers keeps unknown keys and ignores them)
ROLE_KEYS = {"document_end": "xiaolm_document_end", "end_of_turn": "xiaolm_end_of_turn",
             "stop": "xiaolm_stop_tokens", "add_bos": "xiaolm_add_bos"}


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
    """A `tokenizers.Tokenizer` with the roles of its special tokens and its chat template.

    - `eos_id` ends every pretraining document (and a document starts after it where no BOS is
      used); `bos_id` starts every document and prompt when `add_bos` (Llama 3);
    - `end_of_turn_id` closes an assistant reply (ChatML <|im_end|>, Llama 3's <|eot_id|>);
    - generation stops on any of `stop_ids` (those two and the model's other end tokens);
    - `render_chat` renders messages with the chat template.
    """

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = CHAT_TEMPLATE,
                 document_end: str = ENDOFTEXT, end_of_turn: str = IM_END, bos_token: str | None = None,
                 add_bos: bool = False, pad_token: str | None = None, stop_tokens: Iterable[str] = (),
                 hf_config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.document_end, self.end_of_turn, self.bos_token = document_end, end_of_turn, bos_token
        self.eos_id = self._id(document_end, "document end")
        self.end_of_turn_id = self._id(end_of_turn, "end of turn")
        self.bos_id = self._id(bos_token, "bos_token") if bos_token is not None else None
        if add_bos and self.bos_id is None:
            raise ValueError("tokenizer: add_bos needs a bos_token")
        self.add_bos = add_bos
        self.pad_id = self._id(pad_token, "pad_token") if pad_token is not None else self.eos_id
        self.stop_tokens = list(dict.fromkeys([end_of_turn, document_end, *stop_tokens]))
        self.stop_ids = tuple(self._id(token, "stop token") for token in self.stop_tokens)
        self.special_ids = frozenset(
            index for index, added in tokenizer.get_added_tokens_decoder().items() if added.special
        ) | {self.eos_id, self.end_of_turn_id}
        self.hf_config = hf_config  # an imported tokenizer's tokenizer_config.json, kept on save
        self._token_bytes: list[bytes] | None = None

    def _id(self, token: str, role: str) -> int:
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise ValueError(f"tokenizer: the {role} token {token!r} is not in the vocabulary")
        return index

    @property
    def is_native(self) -> bool:
        """A tokenizer trained by xiaolm (ChatML, <|endoftext|> between documents, no BOS)."""
        return self.hf_config is None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def document_ids(self, ids: list[int]) -> list[int]:
        """A pretraining document's tokens as the model saw them: BOS first when the model uses one,
        the document end last."""
        return ([self.bos_id] if self.add_bos else []) + ids + [self.eos_id]

    def with_document_start(self, ids: list[int]) -> list[int]:
        """`ids` preceded by what precedes a document in training: its BOS, or else the previous
        document's end token (scoring then matches how the model was trained)."""
        if self.add_bos:
            return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids
        return [self.eos_id] + ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain-text prompt to continue: with BOS when the model uses one; an empty prompt
        starts a new document."""
        ids = self.encode(text)
        if self.add_bos:
            return [self.bos_id] + ids
        return ids or [self.eos_id]

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Messages rendered with the chat template (as transformers' apply_chat_template renders
        them); `add_generation_prompt` appends the assistant header."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (a base model's); chat needs one")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.hf_eos_token(), pad_token=self.tokenizer.id_to_token(self.pad_id),
        )

    @cached_property
    def _template(self):
        return compile_chat_template(self.chat_template)

    def hf_eos_token(self) -> str:
        """The token transformers calls eos: the imported tokenizer's own; for xiaolm's, <|im_end|>
        (export writes <|endoftext|> for a base model, interop/hf_export.py)."""
        if self.hf_config is not None:
            return _token_text(self.hf_config.get("eos_token")) or self.document_end
        return IM_END

    def token_bytes(self) -> list[bytes]:
        """The raw bytes each token id stands for (special tokens: their UTF-8 text).

        Used to stream text a token at a time without splitting a multi-byte character,
        and to count the bytes behind each target token for bits-per-byte.
        """
        if self._token_bytes is None:
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            added = {index for index in self.tokenizer.get_added_tokens_decoder()}
            table = [b""] * self.vocab_size
            for token, index in self.tokenizer.get_vocab().items():
                if index in self.special_ids or index in added:
                    table[index] = token.encode("utf-8")
                elif all(c in byte_of for c in token):
                    table[index] = bytes(byte_of[c] for c in token)
                else:
                    raise ValueError(f"tokenizer: token {token!r} (id {index}) is not byte-level BPE; only "
                                     "byte-level BPE tokenizers (GPT-2 style: Qwen, Llama 3, SmolLM) are supported")
            self._token_bytes = table
        return self._token_bytes

    def save(self, directory: str | Path, eos_token: str | None = None) -> None:
        """tokenizer.json and tokenizer_config.json (with the roles); `eos_token`: what transformers
        should call eos there (export: a base model's <|endoftext|>) [xiaolm's: <|im_end|>; an
        imported tokenizer's own]."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        if self.is_native:
            _write_native_config(directory, eos_token or IM_END)
            return
        config = {k: v for k, v in self.hf_config.items() if k not in ROLE_KEYS.values()}
        config["chat_template"] = self.chat_template
        if eos_token is not None:
            config["eos_token"] = eos_token
        config.update({ROLE_KEYS["document_end"]: self.document_end, ROLE_KEYS["end_of_turn"]: self.end_of_turn,
                       ROLE_KEYS["stop"]: self.stop_tokens, ROLE_KEYS["add_bos"]: self.add_bos})
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_hf_files(cls, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None = None,
                      stop_ids: Iterable[int] = ()) -> XiaoTokenizer:
        """An imported tokenizer: tokenizer.json + tokenizer_config.json (+ the model's
        generation_config.json eos ids as `stop_ids`). Roles xiaolm saved before are read back;
        otherwise they are derived:
        - add_bos: whether encoding with special tokens puts the BOS first (tokenizer_config's
          add_bos_token or tokenizer.json's post-processor, as transformers does);
        - end of turn: the first special token after an assistant reply in the rendered template
          (ChatML <|im_end|>, Llama 3 <|eot_id|>), or the eos token without a template;
        - document end: of the eos token and the model's stop tokens, the first that does not end a
          turn (<|endoftext|> for Qwen, <|end_of_text|> for Llama 3 chat models); else the eos.
        """
        chat_template = chat_template or _template_text(config.get("chat_template"))
        eos = _token_text(config.get("eos_token"))
        bos = _token_text(config.get("bos_token"))
        pad = _token_text(config.get("pad_token"))
        stops = [tokenizer.id_to_token(i) for i in stop_ids if tokenizer.id_to_token(i) is not None]
        if ROLE_KEYS["document_end"] in config:
            return cls(tokenizer, chat_template=chat_template, document_end=config[ROLE_KEYS["document_end"]],
                       end_of_turn=config[ROLE_KEYS["end_of_turn"]], bos_token=bos,
                       add_bos=bool(config.get(ROLE_KEYS["add_bos"])), pad_token=pad,
                       stop_tokens=config.get(ROLE_KEYS["stop"], []), hf_config=config)
        if eos is None and not stops:
            raise ValueError("tokenizer_config.json names no eos_token and the model no eos_token_id")
        eos = eos or stops[0]
        add_bos = config.get("add_bos_token")
        if add_bos is None and bos is not None:
            with_specials = tokenizer.encode("a", add_special_tokens=True).ids
            add_bos = bool(with_specials) and with_specials[0] == tokenizer.token_to_id(bos)
        end_of_turn = _end_of_turn(tokenizer, chat_template, bos, eos) if chat_template else eos
        candidates = [eos, *stops, *_KNOWN_DOCUMENT_ENDS]
        document_end = next((t for t in candidates if t != end_of_turn and tokenizer.token_to_id(t) is not None), eos)
        return cls(tokenizer, chat_template=chat_template, document_end=document_end, end_of_turn=end_of_turn,
                   bos_token=bos, add_bos=bool(add_bos), pad_token=pad, stop_tokens=[eos, *stops], hf_config=config)


# tokens that end documents in well-known vocabularies, for chat models whose config names only
# the end-of-turn token (SmolLM2's instruct models: eos <|im_end|>; documents end in <|endoftext|>)
_KNOWN_DOCUMENT_ENDS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _template_text(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates ("default")."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        return named.get("default")
    return value


def _end_of_turn(tokenizer: Tokenizer, chat_template: str, bos: str | None, eos: str) -> str:
    """The first special token the template puts after an assistant reply."""
    probe = "xiaolm-probe-reply"
    text = compile_chat_template(chat_template).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
        add_generation_prompt=False, bos_token=bos or "", eos_token=eos)
    tail = text[text.rindex(probe) + len(probe):]
    specials = sorted((tail.find(added.content), added.content)
                      for added in tokenizer.get_added_tokens_decoder().values()
                      if added.special and added.content in tail)
    return specials[0][1] if specials else eos


def compile_chat_template(template: str):
    """A Jinja chat template compiled as transformers compiles it (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII)."""
    from datetime import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment.from_string(template)


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
    tokenizer.train_from_iterator(batched(texts, 1000), trainer=trainer)
    return XiaoTokenizer(tokenizer)


def _write_native_config(directory: Path, eos_token: str) -> None:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": eos_token,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [ENDOFTEXT, IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"eos_token": eos_token, "pad_token": ENDOFTEXT, "additional_special_tokens": SPECIAL_TOKENS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def load_tokenizer(directory: str | Path, stop_ids: Iterable[int] = ()) -> XiaoTokenizer:
    """The tokenizer in `directory`: xiaolm's own (its ChatML template and three special tokens), or
    an imported one with its tokenizer_config.json (`stop_ids`: the model's eos ids, for an
    imported model's first load)."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"no tokenizer at {path}; train one with `xiaolm tokenizer train`")
    tokenizer = Tokenizer.from_file(str(path))
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = _template_text(config.get("chat_template"))
    if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    native = all(tokenizer.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))
    if native and template in (None, CHAT_TEMPLATE) and ROLE_KEYS["document_end"] not in config:
        return XiaoTokenizer(tokenizer)
    if not config:
        raise ValueError(f"{directory}: {TOKENIZER_CONFIG_FILE} is missing; a tokenizer not trained by xiaolm "
                         "needs it (eos/bos tokens, chat template)")
    return XiaoTokenizer.from_hf_files(tokenizer, config, template, stop_ids)
