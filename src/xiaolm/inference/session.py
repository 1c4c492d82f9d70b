"""Stream completions of a prompt as text."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from xiaolm.inference.generate import SamplingConfig, TextStreamer, generate_tokens
from xiaolm.model.transformer import Transformer
from xiaolm.tokenizer.bpe import XiaoTokenizer

def stream_completion(
    model: Transformer, tokenizer: XiaoTokenizer, prompt: str, sampling: SamplingConfig
) -> Iterator[str]:
    """Continue `prompt`, yielding text pieces as soon as they form whole characters.

    Generation stops at the tokenizer's stop tokens (<|endoftext|>, <|im_end|>, ...); none is printed.
    """
    prompt_ids = tokenizer.encode_prompt(prompt)
    stop_ids = tokenizer.stop_ids
    streamer = TextStreamer(tokenizer.token_bytes(), skip_ids=tokenizer.special_ids)
    with torch.inference_mode():
        for next_ids in generate_tokens(model, prompt_ids, sampling, stop_ids=stop_ids):
            token = int(next_ids[0])
            if token in stop_ids:
                break
            piece = streamer.push(token)
            if piece:
                yield piece
    tail = streamer.flush()
    if tail:
        yield tail
